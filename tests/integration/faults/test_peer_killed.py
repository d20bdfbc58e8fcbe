"""A peer process killed (SIGKILL) in the middle of a transfer.

`iscl server` and `iscl client` each send random data without end while the other's arrives; one of
them is killed once a megabyte has crossed. The survivor exits 1 with one line within its timeouts, and what
it wrote is an exact prefix of what the dead end sent: only messages whose MAC verified are written.

Through the gateway (DCMTK at both ends): the server tunnel process killed, or one DICOM application
killed (storescu, or the storescp child serving its association), in the middle of a store. storescu
reports the failure; every object stored is whole and byte-identical to the one sent, and the other
association through the same tunnel pair completes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from benchmarks.common import child_pids
from iscl_hsm.dicom.gateway import Mode, Tunnel
from iscl_hsm.dicom.study import StudySpec, write_study
from iscl_hsm.engine import Config, Profile
from iscl_hsm.keyholder.base import KeyHolder

from ..conftest import Hospitals
from ..gateway.conftest import (
    TIMEOUT,
    StoreScp,
    TunnelCommand,
    assert_stored_identical,
    dcmtk,
    parse_line,
    scu,
)
from ..gateway.test_gateway_cli import link_lines as command_link_lines
from ..gateway.test_gateway_cli import start_pair
from ..test_cli import child_env, token_args
from .conftest import LinkEnds, assert_one_failure_line, kill, wait_until

CROSSED = 1 << 20
"""Bytes that have arrived when one end is killed."""

LOST = re.compile(r"^iscl: (?!\[Errno).+ \[ISCL 122 CONNECTION_LOST\]$")
"""The survivor's line: a sentence, not a bare errno, on the connection lost mid-message, between messages
("the peer closed the connection in the middle of a message", "... without disconnecting"), while data
was on its way ("the ISCL link with HOST:PORT failed: Connection reset by peer") or while a request
waited for its answer ("the link ended before the peer answered")."""


@pytest.mark.parametrize("killed", ["client", "server"])
def test_the_survivor_of_a_killed_peer_fails_with_one_line_and_an_exact_prefix(
    hospitals: Hospitals, link_ends: Callable[..., LinkEnds], profile: Profile, killed: str
) -> None:
    env, chosen = child_env(hospitals), ["--profile", profile.value]
    ends = link_ends(server=([*token_args(hospitals, hospitals.a), *chosen], env),
                     client=([*token_args(hospitals, hospitals.b), *chosen], env))  # fmt: skip
    survivor = "server" if killed == "client" else "client"
    ends.wait_received(survivor, CROSSED)

    kill(ends.end(killed).proc)

    assert ends.end(survivor).finish() == 1
    line = assert_one_failure_line(ends.end(survivor).lines)
    assert LOST.match(line), line
    ends.feeders[killed].end()
    received, sent = ends.received(survivor), ends.sent(killed)
    assert CROSSED <= len(received) < len(sent)
    assert sent.startswith(received)  # nothing altered, nothing of a message that did not verify


# --- through the gateway ---------------------------------------------------------------------------


def study(folder: Path, images: int = 40) -> list[Path]:
    """Images of 512 KiB: each a few ISCL messages, and a store long enough (20 MB) to be cut in the
    middle however late the test gets to its fault."""
    return write_study(folder, StudySpec(images=images, rows=512, columns=512))


def storescu(port: int, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [dcmtk("storescu"), "-v", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def stored_of(scp: StoreScp, files: list[Path]) -> list[Path]:
    """Those of ``files`` that ``scp`` holds."""
    return [path for path in files if scp.stored(dcmread(path).SOPInstanceUID).exists()]


def assert_an_intact_prefix(scp: StoreScp, files: list[Path], output: str) -> list[Path]:
    """What a failed store left: whole objects, in order, with nothing after a gap; and storescu said
    Success only for objects that are stored. Returns the stored files."""
    stored = stored_of(scp, files)
    assert len(stored) < len(files)
    assert files[: len(stored)] == stored
    assert_stored_identical(scp, stored)
    assert output.count("Received Store Response (Success)") <= len(stored), output
    return stored


def test_the_server_tunnel_killed_in_the_middle_of_a_store(
    tmp_path: Path, storescp: StoreScp, hospitals: Hospitals, tunnel_command: Callable[..., TunnelCommand],
    profile: Profile,
) -> None:  # fmt: skip
    server, client = start_pair(tunnel_command, hospitals, storescp, profile)
    files = study(tmp_path / "study")
    store = storescu(client.port, files)
    wait_until(lambda: any(storescp.folder.iterdir()), "the first stored image", store)

    workers = child_pids(server.process.pid)
    for worker in workers:  # whichever carries the link (the whole tunnel, but for its supervisor)
        os.kill(worker, signal.SIGKILL)
    output = store.communicate(timeout=TIMEOUT)[0]

    assert store.returncode != 0, output
    assert_an_intact_prefix(storescp, files, output)
    assert client.process.poll() is None  # the client tunnel carries on
    server.wait_output(r"starting another")  # the server tunnel replaces its workers
    assert scu("echoscu", client.port).returncode == 0  # and serves new links
    status, log = client.stop()
    assert status == 0
    line, echo_line = command_link_lines(log)
    assert line["result"].startswith("aborted: ") and line["result"].endswith("[ISCL 122 CONNECTION_LOST]"), line
    assert echo_line["result"] == "closed"


@pytest.mark.parametrize("victim", ["storescu", "storescp"])
def test_an_application_killed_mid_store_leaves_the_other_association_alone(
    tmp_path: Path, storescp: StoreScp, start_tunnel: Callable[..., Tunnel], hospitals: Hospitals,
    holders: Callable[..., KeyHolder], link_lines: Callable[[int], list[str]], victim: str,
) -> None:  # fmt: skip
    """One association's modality (storescu) or its PACS process (storescp's child for it) dies while a
    second association runs through the same tunnel pair.

    The second store starts first and is under way (an image stored) when the first is killed; it
    completes, every one of its images intact. Under storescp --fork only one association is open
    when the PACS side is killed, so there the second store starts after the kill.
    """
    config = Config()
    server = start_tunnel(Mode.SERVER, storescp.port, holders(hospitals.a), config)
    client = start_tunnel(Mode.CLIENT, server.address.port, holders(hospitals.b), config)
    doomed, other = study(tmp_path / "doomed"), study(tmp_path / "other", images=6)
    running_alongside = victim == "storescu"
    second = storescu(client.address.port, other) if running_alongside else None
    if second is not None:
        wait_until(lambda: bool(stored_of(storescp, other[:1])), "the second association's first image", second)
    first = storescu(client.address.port, doomed)
    wait_until(lambda: bool(stored_of(storescp, doomed[:1])), "the first association's first image", first)

    if victim == "storescu":
        kill(first)
    else:
        serving = child_pids(storescp.process.pid)
        assert len(serving) == 1, f"storescp serves {len(serving)} associations, not the one being cut"
        os.kill(serving[0], signal.SIGKILL)
    output = first.communicate(timeout=TIMEOUT)[0]
    if second is None:
        second = storescu(client.address.port, other)
    second_output = second.communicate(timeout=TIMEOUT)[0]

    assert first.returncode != 0, output
    assert_an_intact_prefix(storescp, doomed, output)
    assert second.returncode == 0, second_output
    assert_stored_identical(storescp, other)
    results = [parse_line(line)["result"] for line in link_lines(4)]
    # The second association closed at both tunnels. The first ended as its dead end's kernel closed
    # the socket: a FIN from a killed storescu is a clean end of stream to its tunnel (DICOM, not
    # TCP, knows that the release was missing), and then the server tunnel fails the link if storescp
    # still sends (its abort), saying so: never as a send on a closed link (BAD_STATE), which the server
    # tunnel once said when storescp's bytes came before it had taken the peer's disconnection.
    assert results.count("closed") >= 2, results
    for result in results:
        assert result == "closed" or re.fullmatch(r"aborted: .* \[ISCL \d+ [A-Z_]+\]", result), result
        assert "BAD_STATE" not in result, result
