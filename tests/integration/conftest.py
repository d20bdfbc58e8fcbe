"""Fixtures for tests against real components.

SoftHSM2 reads SOFTHSM2_CONF once, when a process first loads libsofthsm2.so, and never looks for
tokens created after that. So the session-scoped ``softhsm`` fixture points SOFTHSM2_CONF at a
private token directory and creates a pool of tokens (random labels, random PINs) before anything in
the test process loads the module; a test takes fresh tokens with ``softhsm.take()``. The fixture
fails, never skips, when SoftHSM2 is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

from iscl_hsm.engine import Profile
from iscl_hsm.keyholder.base import KeyHolder
from iscl_hsm.keyholder.pkcs11 import (
    DEFAULT_MODULE,
    Pkcs11KeyHolder,
    is_module_loaded,
    key_id,
    key_label,
    key_policy,
)
from iscl_hsm.keyholder.provision import init_token, softhsm_environment
from iscl_hsm.wire import SESSION_KEYS, Encryption, Mac

from .proxy import FrameProxy, Handler, Link, Seen

TOKEN_POOL_SIZE = 40
"""Tokens made up front; raise it when tests need more (each costs about 40 ms)."""


@dataclass(frozen=True)
class SoftHsmToken:
    """One initialised token: its label and PINs (test PINs, random per run)."""

    label: str
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)
    module: str = DEFAULT_MODULE


@dataclass
class SoftHsm:
    """The private SoftHSM2 installation of this test session."""

    data_dir: Path
    env: dict[str, str]
    pool: list[SoftHsmToken]
    module: str = DEFAULT_MODULE

    def take(self) -> SoftHsmToken:
        """A token no other test has used."""
        if not self.pool:
            pytest.fail(f"the SoftHSM2 token pool is used up; raise TOKEN_POOL_SIZE in {__file__}")
        return self.pool.pop()

    def tool_env(self) -> dict[str, str]:
        """Environment for command-line clients (pkcs11-tool, softhsm2-util) of these tokens."""
        return {**os.environ, **self.env}

    def slot_id(self, label: str) -> str:
        """Slot id (hex) of the token labelled exactly ``label``, from ``pkcs11-tool -L``."""
        listing = subprocess.run(
            ["pkcs11-tool", "--module", self.module, "-L"],
            env=self.tool_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        slot = None
        for line in listing.splitlines():
            match = re.match(r"Slot \d+ \((0x[0-9a-fA-F]+)\)", line)
            if match:
                slot = match.group(1)
            elif line.strip().startswith("token label") and line.split(":", 1)[1].strip() == label:
                assert slot is not None
                return slot
        pytest.fail(f"pkcs11-tool -L does not list a token labelled {label!r}:\n{listing}")


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    if not os.path.isfile(DEFAULT_MODULE):
        pytest.fail(f"SoftHSM2 is not installed ({DEFAULT_MODULE} missing): apt-get install softhsm2")
    if shutil.which("softhsm2-util") is None:
        pytest.fail("softhsm2-util is not installed: apt-get install softhsm2")
    if is_module_loaded(DEFAULT_MODULE):
        pytest.fail("libsofthsm2.so was loaded before the softhsm fixture could set SOFTHSM2_CONF")
    made = make_softhsm(tmp_path_factory.mktemp("softhsm"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", made.env["SOFTHSM2_CONF"])
        yield made


def make_softhsm(data_dir: Path, tokens: int = TOKEN_POOL_SIZE) -> SoftHsm:
    """A private SoftHSM2 installation in ``data_dir`` with ``tokens`` fresh tokens (what the
    ``softhsm`` fixture gives; also for runners outside pytest, such as adversarial/soak.py)."""
    env = softhsm_environment(data_dir)
    pool = []
    for _ in range(tokens):
        token = SoftHsmToken(
            label=f"iscl-test-{secrets.token_hex(4)}",
            pin=secrets.token_hex(8),
            so_pin=secrets.token_hex(8),
        )
        init_token(token.label, token.so_pin, token.pin, env=env)
        pool.append(token)
    return SoftHsm(data_dir=data_dir, env=env, pool=pool)


def pkcs11_tool(softhsm: SoftHsm, label: str, pin: str, *args: str) -> subprocess.CompletedProcess[str]:
    """OpenSC's pkcs11-tool logged in to token ``label`` (found by slot: --token-label matches prefixes)."""
    slot = softhsm.slot_id(label)
    return subprocess.run(
        ["pkcs11-tool", "--module", softhsm.module, "--slot", slot, "--login", "--pin", pin, *args],
        env=softhsm.tool_env(),
        capture_output=True,
        text=True,
        check=False,
    )


def secret_key_objects(softhsm: SoftHsm, label: str, pin: str) -> list[dict[str, str]]:
    """The secret keys pkcs11-tool lists on token ``label``: "type" (DES, DES3...), then each line."""
    done = pkcs11_tool(softhsm, label, pin, "--list-objects", "--type", "secrkey")
    assert done.returncode == 0, done.stderr
    objects: list[dict[str, str]] = []
    for line in done.stdout.splitlines():
        if line.startswith("Secret Key Object"):
            objects.append({"type": line.split(";")[1].strip()})
        elif ":" in line and objects:
            name, value = line.split(":", 1)
            objects[-1][name.strip()] = value.strip()
    return objects


def pre_v100_enc_key(index: int, value: bytes) -> dict[Attribute, Any]:
    """The template of single-DES enc key ``index`` as releases before the V1.00 profile made it:
    today's policy less ENCRYPT and DECRYPT, so DERIVE only."""
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType._DES,
        Attribute.VALUE: value,
        Attribute.LABEL: key_label("enc", index),
        Attribute.ID: key_id("enc", index),
        **key_policy("enc"),
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
    }


# --------------------------------------------------------------------------------------------------
# Two hospitals holding the same keys, and a stranger (transport and command-line tests)


def _known_key(name: str) -> bytes:
    """A fixed single-DES test key (not weak: fix_parity of a SHA-256 prefix)."""
    import hashlib

    from iscl_hsm.crypto.des import fix_parity, is_weak

    value = fix_parity(hashlib.sha256(f"iscl-hsm test key {name}".encode()).digest()[:8])
    assert not is_weak(value)
    return value


HOSPITAL_KEYS: dict[tuple[str, int], bytes] = {
    (purpose, index): _known_key(f"{purpose}-{index}") for purpose in ("auth", "enc") for index in range(1, 9)
}
"""The 16 keys both hospitals imported (what two sites agree on in a key ceremony)."""

STRANGER_AUTH_1 = _known_key("stranger auth-1")
STRANGER_MISSING = (("auth", 3), ("enc", 3))
"""The stranger holds the hospitals' keys except: its auth key 1 differs, auth 3 and enc 3 are absent."""


@dataclass(frozen=True)
class Hospitals:
    """Tokens of two hospitals with the same keys, and a stranger's token; each with a PIN file."""

    a: SoftHsmToken
    b: SoftHsmToken
    stranger: SoftHsmToken
    pin_files: dict[str, Path] = field(repr=False)
    softhsm_conf: str = ""

    def pin_file(self, token: SoftHsmToken) -> Path:
        return self.pin_files[token.label]

    def holder(self, token: SoftHsmToken, record_keys: str = "host") -> Pkcs11KeyHolder:
        """A new key holder on ``token`` (use it in a ``with`` block)."""
        return Pkcs11KeyHolder(token.label, token.pin, token.module, record_keys=record_keys)


@pytest.fixture(scope="session")
def hospitals(softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> Hospitals:
    """Hospital A and B import HOSPITAL_KEYS through ensure_token; the stranger through store_key.

    A's encryption keys are host-readable, B's are not: a V1.00 link with a fixed key id uses A's key
    with OpenSSL and B's inside the token, so every A-B link also checks that the two agree.
    """
    return make_hospitals(softhsm, tmp_path_factory.mktemp("pins"))


def make_hospitals(softhsm: SoftHsm, pins: Path) -> Hospitals:
    """The ``hospitals`` fixture's tokens, from ``softhsm``'s pool, with PIN files in ``pins``.

    Loads libsofthsm2.so in this process: SOFTHSM2_CONF must point at ``softhsm`` already.
    """
    from iscl_hsm.keyholder.provision import ensure_token, store_key

    a, b, stranger = softhsm.take(), softhsm.take(), softhsm.take()
    pin_files = {}
    for token in (a, b, stranger):
        path = pins / f"{token.label}.pin"
        path.write_text(token.pin + "\n")
        path.chmod(0o600)
        pin_files[token.label] = path
    check_values = []
    for token, readable in ((a, True), (b, False)):
        label, _, kcvs = ensure_token(
            softhsm.data_dir, token.label, pin_files[token.label], HOSPITAL_KEYS, host_readable=readable
        )
        assert label == token.label and len(kcvs) == 16
        check_values.append(kcvs)
        # Idempotent: a second run finds the same keys and creates nothing.
        assert ensure_token(softhsm.data_dir, token.label, pin_files[token.label], HOSPITAL_KEYS)[2] == kcvs
    assert check_values[0] == check_values[1]
    with Pkcs11KeyHolder(stranger.label, stranger.pin, stranger.module) as holder:
        for (purpose, index), value in HOSPITAL_KEYS.items():
            if (purpose, index) in STRANGER_MISSING:
                continue
            store_key(holder, purpose, index, STRANGER_AUTH_1 if (purpose, index) == ("auth", 1) else value)
    return Hospitals(a, b, stranger, pin_files, softhsm.env["SOFTHSM2_CONF"])


# --------------------------------------------------------------------------------------------------
# A man in the middle


class TamperingProxy(FrameProxy):
    """A relay between ISCL clients and a server that may rewrite whole frames in flight.

    ``tamper(direction, frame)`` gets each complete frame ("c2s" or "s2c", a tests.helpers.Frame) and
    returns the bytes to forward instead (it may sleep: that direction waits). An end of stream is
    passed on as a half-close; ``frames`` lists what passed (before tampering), link after link.
    """

    def __init__(self, upstream_port: int, tamper: Callable[[str, Any], bytes]) -> None:
        super().__init__(upstream_port, lambda link: _Rewrite(tamper))

    @property
    def frames(self) -> list[tuple[str, Any]]:
        return [(seen.direction, seen.frame) for link in self.links for seen in list(link.seen)]


class _Rewrite(Handler):
    def __init__(self, tamper: Callable[[str, Any], bytes]) -> None:
        self._tamper = tamper

    def frame(self, link: Link, seen: Seen) -> None:
        link.send(seen.direction, self._tamper(seen.direction, seen.frame))


@pytest.fixture
def mitm() -> Iterator[Callable[[int, Callable[[str, Any], bytes]], TamperingProxy]]:
    """Factory: ``mitm(server_port, tamper)`` starts a TamperingProxy; all are closed after the test."""
    proxies: list[TamperingProxy] = []

    def start(port: int, tamper: Callable[[str, Any], bytes]) -> TamperingProxy:
        proxy = TamperingProxy(port, tamper)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


# --------------------------------------------------------------------------------------------------
# Shared by the transport tests

SUITES = [
    pytest.param(enc, mac, key, id=f"{enc.name}-{mac.name}-{'session' if key == SESSION_KEYS else 'key1'}")
    for enc in Encryption
    for mac in Mac
    for key in (1, SESSION_KEYS)
]
"""Every encryption x MAC x key mode (key 1, or unique session keys), as (Encryption, Mac, enc key id)."""
MAC_SUITES = [p for p in SUITES if p.values[1] is not Mac.NONE]
"""The suites with a MAC, which detect tampering."""


@pytest.fixture(params=list(Profile), ids=lambda p: p.value)
def profile(request: pytest.FixtureRequest) -> Profile:
    """Each wire profile in turn, for a test of what both profiles must do."""
    return request.param  # type: ignore[no-any-return]


@dataclass
class Outcome:
    """What one end of a link returned, or what it raised."""

    value: Any = None
    error: BaseException | None = None

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def failed(self, kind: type[BaseException], code: Any) -> Any:
        """Assert that this end raised ``kind`` with ErrorCode ``code``; return the exception."""
        assert isinstance(self.error, kind), f"expected {kind.__name__} {code.name}, got {self.error!r}"
        assert self.error.code is code, f"expected {code.name}, got {self.error!r}"  # type: ignore[attr-defined]
        return self.error


@pytest.fixture
def holders(hospitals: Hospitals) -> Iterator[Callable[..., Pkcs11KeyHolder]]:
    """``holders(token, record_keys="host")`` opens a key holder that is closed after the test."""
    with contextlib.ExitStack() as stack:

        def open_holder(token: SoftHsmToken, record_keys: str = "host") -> Pkcs11KeyHolder:
            return stack.enter_context(hospitals.holder(token, record_keys))

        yield open_holder


def header(mid: int, length: int) -> bytes:
    """A bare 32-byte ISCL header (what a forger or a confused peer might send)."""
    import struct

    return struct.pack(">8I", 0, mid, length, 0, 0, 0, 0, 0)


def raw_client_handshake(
    port: int, holder: KeyHolder, config: Any, timeout: float = 60.0, *, receive_buffer: int | None = None,
    preamble: bytes = b"",
) -> tuple[socket.socket, Any]:
    """A client that runs the engine by hand on a plain socket, so that it can misbehave afterwards.

    ``receive_buffer`` shrinks the socket's receive buffer (set before connecting, so the window stays small);
    ``preamble`` is sent first (a PROXY protocol header, as a load balancer would).
    """
    from iscl_hsm.engine import Connection, Role, State

    sock = socket.socket()
    sock.settimeout(timeout)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    sock.sendall(preamble)
    conn = Connection(Role.CLIENT, holder, config)
    while conn.state is not State.READY:
        conn.receive_data(sock.recv(1 << 16))
        sock.sendall(conn.data_to_send())
    return sock, conn


def raw_sealed_message(sock: socket.socket, conn: Any, message: bytes) -> bytes:
    """Ask the peer to take ``message``, wait for its ACK, and return the sealed frames unsent."""
    from iscl_hsm.engine import MessageSent

    conn.send_message(message)
    sock.sendall(conn.data_to_send())  # MESSAGE_TRANSMISSION_RQ
    while not any(isinstance(event, MessageSent) for event in conn.receive_data(sock.recv(1 << 16))):
        pass
    stream = b""
    while out := conn.data_to_send():
        stream += out
    return stream
