"""The token goes away in the middle of a link: its files deleted, or its PKCS#11 module failing.

The end that loses its token exits 1 (or logs its link line) with one line that names the token; a
receiver that cannot make a message's key tells the peer so (NAK 103), and the peer's line says that
its peer's key holder failed. What was written is an exact prefix of what was sent.

Which links need the token after the handshake decides which fail. Unique session keys derive every
message's key from encryption key N, a token object; V1.00 with key N uses that token object for
every record when it is not host-readable, or with --record-keys token. Hardened derives its record
keys at the handshake: with --record-keys token they are session objects in the token, which outlive
the token's files, so such a link carries on and ends well, every byte intact.

The failing module is failing_pkcs11.c (see conftest.FailingModule): a real PKCS#11 library in front
of SoftHSM2, loaded by the child with --pkcs11-module, whose key and random-number calls return
CKR_DEVICE_ERROR once the test creates a trigger file. It is used instead of a Python key holder that
raises, because the failure then takes the path a broken device's takes: through python-pkcs11 (and
iscl_hsm.keyholder.p11direct's direct calls) into the key holder's translation of PKCS#11 errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from iscl_hsm import wire
from iscl_hsm.dicom.gateway import Mode, Tunnel
from iscl_hsm.engine import Config, Profile
from iscl_hsm.keyholder.base import KeyHolder

from ..conftest import Hospitals
from ..gateway.conftest import TIMEOUT, StoreScp, TunnelCommand, assert_stored_identical, parse_line
from ..gateway.test_gateway_cli import link_lines as command_link_lines
from ..test_cli import child_env, token_args
from .conftest import FailingModule, LinkEnds, PrivateToken, assert_one_failure_line
from .test_peer_killed import assert_an_intact_prefix, stored_of, storescu, study, wait_until

CROSSED = 1 << 20
TOLD = re.compile(r"^iscl: the peer refused .* \(code 103, REMOTE_KEY_HOLDER\) \[ISCL 103 REMOTE_KEY_HOLDER\]$")
"""The sender's line when the receiver's key holder failed and said so."""

SESSION = ["--enc-key-id", "session"]


@pytest.mark.parametrize(
    ("profile", "options", "fails"),
    [
        pytest.param(Profile.V100, SESSION, True, id="v1.00-session-keys"),
        pytest.param(Profile.HARDENED, SESSION, True, id="hardened-session-keys"),
        pytest.param(Profile.V100, ["--record-keys", "token"], True, id="v1.00-key1-in-token"),
        pytest.param(Profile.HARDENED, ["--record-keys", "token"], False, id="hardened-key1-in-token"),
    ],
)
def test_the_token_files_removed_in_the_middle_of_a_link(
    hospitals: Hospitals, private_token: PrivateToken, link_ends: Callable[..., LinkEnds], profile: Profile,
    options: list[str], fails: bool,
) -> None:  # fmt: skip
    """The server's token is deleted once a megabyte has arrived; the client goes on sending."""
    both = ["--profile", profile.value, *(SESSION if options == SESSION else [])]
    ends = link_ends(
        server=([*private_token.args(), *both, *options], private_token.env),
        client=([*token_args(hospitals, hospitals.b), *both], child_env(hospitals)), server_sends=False,
    )  # fmt: skip
    ends.wait_received("server", CROSSED)

    private_token.remove_files()

    if not fails:  # then the rest of the client's data, and the end of its input
        ends.feeders["client"].end(after=4 * CROSSED)
    server_status, client_status = ends.server.finish(), ends.client.finish()
    ends.feeders["client"].end()
    received, sent = ends.received("server"), ends.sent("client")
    if not fails:
        assert (server_status, client_status) == (0, 0), (ends.server.lines, ends.client.lines)
        assert received == sent
        return
    assert (server_status, client_status) == (1, 1)
    line = assert_one_failure_line(ends.server.lines, f"'{private_token.label}'")
    assert "is no longer" in line and "the token's files may have been removed" in line, line
    assert_one_failure_line(ends.client.lines)
    if options == SESSION:  # the server failed making a key for a message: it told the client why
        assert TOLD.match(ends.client.lines[-1]), ends.client.lines[-1]
    assert CROSSED <= len(received) < len(sent) and sent.startswith(received)


def test_a_module_that_fails_in_the_middle_of_a_link(
    hospitals: Hospitals, failing_module: FailingModule, link_ends: Callable[..., LinkEnds], profile: Profile
) -> None:
    """The server's module starts failing once a megabyte has arrived: under unique session keys its next
    message's key cannot be made; it says so in one line naming the token, and tells the client."""
    both = ["--profile", profile.value, *SESSION]
    server_args = [*token_args(hospitals, hospitals.a), "--pkcs11-module", failing_module.path, *both]
    ends = link_ends(
        server=(server_args, failing_module.env(child_env(hospitals))),
        client=([*token_args(hospitals, hospitals.b), *both], child_env(hospitals)), server_sends=False,
    )  # fmt: skip
    ends.wait_received("server", CROSSED)

    failing_module.fail()

    assert (ends.server.finish(), ends.client.finish()) == (1, 1)
    assert_one_failure_line(
        ends.server.lines, f"PKCS#11 token '{hospitals.a.label}' (module {failing_module.path})", "(DeviceError)",
        "[ISCL 102 LOCAL_KEY_HOLDER]",
    )  # fmt: skip
    assert TOLD.match(assert_one_failure_line(ends.client.lines)), ends.client.lines[-1]
    ends.feeders["client"].end()
    received, sent = ends.received("server"), ends.sent("client")
    assert CROSSED <= len(received) < len(sent) and sent.startswith(received)


def test_a_client_tunnel_whose_module_fails_mid_store_leaves_the_server_tunnels_other_links_alone(
    tmp_path: Path, storescp: StoreScp, start_tunnel: Callable[..., Tunnel], hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]],
    tunnel_command: Callable[..., TunnelCommand], failing_module: FailingModule,
) -> None:  # fmt: skip
    """Two client tunnels, one whose module fails mid-store, to one server tunnel in front of storescp.

    A tunnel's key holder serves every link of that tunnel, so a failing token there fails them all;
    the server tunnel and its other links must not notice. Under unique session keys the failing
    tunnel needs its token for every message it sends or receives.
    """
    config = Config(enc_key_id=wire.SESSION_KEYS)
    server = start_tunnel(Mode.SERVER, storescp.port, holders(hospitals.a), config)
    healthy = start_tunnel(Mode.CLIENT, server.address.port, holders(hospitals.b), config)
    failing = tunnel_command(
        "client", hospitals.b, "--pkcs11-module", failing_module.path, *SESSION,
        "--listen", "127.0.0.1:0", "--connect", f"127.0.0.1:{server.address.port}",
        env=failing_module.env(child_env(hospitals)),
    )  # fmt: skip
    doomed, other = study(tmp_path / "doomed"), study(tmp_path / "other", images=6)
    second = storescu(healthy.address.port, other)
    wait_until(lambda: bool(stored_of(storescp, other[:1])), "the healthy tunnel's first image", second)
    first = storescu(failing.port, doomed)
    wait_until(lambda: bool(stored_of(storescp, doomed[:1])), "the failing tunnel's first image", first)

    failing_module.fail()
    output, second_output = first.communicate(timeout=TIMEOUT)[0], second.communicate(timeout=TIMEOUT)[0]

    assert first.returncode != 0, output
    assert_an_intact_prefix(storescp, doomed, output)
    assert second.returncode == 0, second_output
    assert_stored_identical(storescp, other)
    status, log = failing.stop()
    assert status == 0  # a failed link does not stop the tunnel
    (failed,) = command_link_lines(log)
    assert failed["result"].startswith(f"aborted: PKCS#11 token '{hospitals.b.label}' (module {failing_module.path})")
    assert failed["result"].endswith("(DeviceError); check the token and its keys [ISCL 102 LOCAL_KEY_HOLDER]")
    results = [parse_line(line)["result"] for line in link_lines(3)]
    assert results.count("closed") == 2, results  # the healthy tunnel's link, at both tunnels
    (told,) = [result for result in results if result != "closed"]
    # The server tunnel's line for the failed link: told by a NAK when the failing tunnel was receiving,
    # or the connection dropped when it was sending (a sender has no message that says why).
    assert re.fullmatch(r"aborted: .* \[ISCL (103 REMOTE_KEY_HOLDER|122 CONNECTION_LOST)\]", told), told
