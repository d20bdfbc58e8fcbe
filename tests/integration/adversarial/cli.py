"""Real `iscl server` and `iscl client` processes with the fault proxy between them.

A *two-way* case runs a fresh `iscl server` (one link, stdin and stdout) and an `iscl client`, each
sending a few short messages. A *one-way* case runs only the client, against a long-lived
`iscl server --accept-many DIR` of the same profile and suite: the server sends nothing, and writes
what each link brings to its own file, with one line per link on stderr. Each link of the proxy
comes from its own loopback address, so the server's lines of every link can be told apart (and
none is merged into the once-a-minute summary of repeated handshake failures). That halves the
process start-ups, which dominate a case (about 0.7 s of CPU each), and keeps the oracle exact.

Every wait on the peer is short (``TIMEOUT``), so a fault ends a case within seconds; the idle
timeout stays at its default of 12 h, so a link that waits for nothing and never ends shows up as a
hang (``BOUND``) instead of being tidied away.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iscl_hsm.engine import Profile
from iscl_hsm.wire import Encryption, Mac

from ..conftest import Hospitals
from ..proxy import FrameProxy, Link
from ..test_cli import child_env as plain_child_env
from ..test_cli import token_args
from .faults import Fault, FaultHandler

TIMEOUT = 2.0
"""Seconds for --answer-timeout, --message-timeout and --close-timeout."""
HANDSHAKE_TIMEOUT = 5.0
DELAY = TIMEOUT + 1.5
"""How long Kind.DELAY holds a frame: beyond every timeout a receiver may be waiting under."""
BOUND = 30.0
"""Seconds an end may take, fault or not, before the case counts it as hung. The longest chain of
waits a single fault can cause is a few timeouts; a link left waiting with nothing owed (idle, 12 h)
is what this catches."""
STOP_GRACE = 10.0
"""Seconds a command may take to stop after SIGTERM."""
MAX_MESSAGE = 64
"""--max-message on both ends: stdin goes out in messages of at most this many bytes."""
CLIENT_SENDS = (64, 40)
SERVER_SENDS = (64, 40)
"""Message sizes (multiples of 8, at least four DES blocks: see faults.flipped)."""


TOKEN_RACE = re.compile(
    r"PKCS#11 (token '[^']*' not found in module|module \S+ could not list its tokens"
    r"|token '[^']*' \(module \S+\) refused to open a session)"
)
"""What an `iscl` command says when SoftHSM2 showed it a token file that another process was rewriting
(before any link: the token is missing, unlistable, or refuses a session):
SoftHSM2 rewrites token.object at every login, so among many processes logging in to one token at
once, one now and then reads it half written. That is this test bed, not the case: such a case runs
again (``ATTEMPTS``)."""
ATTEMPTS = 3


def child_env(hospitals: Hospitals) -> dict[str, str]:
    """The environment of every `iscl` command here: the hospitals' tokens, and faulthandler on, so
    that an end that hangs dumps its threads' stacks when it is stopped (:func:`stop_hung`)."""
    return {**plain_child_env(hospitals), "PYTHONFAULTHANDLER": "1"}


def stop_hung(process: subprocess.Popen[bytes]) -> None:
    """Stop a command that outlived its bound: SIGABRT first, so that faulthandler writes every
    thread's stack to its stderr (which the case's failure message shows), then SIGKILL."""
    process.send_signal(signal.SIGABRT)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def token_race(lines: list[str]) -> bool:
    return any(TOKEN_RACE.search(line) for line in lines)


def timeout_args(handshake: float) -> list[str]:
    """The timeout options of every end here: ``handshake`` for the handshake, TIMEOUT for the rest."""
    limits = {"handshake": handshake, "answer": TIMEOUT, "message": TIMEOUT, "close": TIMEOUT}
    return [word for name, limit in limits.items() for word in (f"--{name}-timeout", f"{limit:g}")]


def data(name: str, sizes: tuple[int, ...]) -> bytes:
    """The fixed input of one end: the same on every run, different at each end."""
    return hashlib.shake_256(name.encode()).digest(sum(sizes))


@dataclass(frozen=True)
class Suite:
    """Encryption, MAC and encryption key mode (key 1, or a session key per message)."""

    encryption: Encryption
    mac: Mac
    session_keys: bool = False

    def __str__(self) -> str:
        names = (self.encryption.name, self.mac.name, "session" if self.session_keys else "key1")
        return ".".join(name.lower().replace("_", "-") for name in names)

    def args(self) -> list[str]:
        """The link options of this suite (both ends alike)."""
        names = {
            Encryption.NONE: "none",
            Encryption.DES_CBC: "des-cbc",
            Mac.NONE: "none",
            Mac.MD5: "md5",
            Mac.DES_MAC: "des-mac",
        }
        out = [
            "--encryption",
            names[self.encryption],
            "--mac",
            names[self.mac],
            "--enc-key-id",
            "session" if self.session_keys else "1",
        ]
        if (self.encryption, self.mac) == (Encryption.NONE, Mac.MD5):
            out.append("--allow-unkeyed-md5")  # V1.00's plain MD5 (hardened keys it anyway)
        return out


SUITES = tuple(Suite(e, m, s) for s in (False, True) for e in Encryption for m in Mac)
"""Every encryption x MAC, each with key 1 and with session keys (12)."""


@dataclass(frozen=True)
class CliCase:
    profile: Profile
    suite: Suite
    fault: Fault | None
    two_way: bool

    @property
    def id(self) -> str:
        way = "two-way" if self.two_way else "one-way"
        return f"{way}-{self.profile.value}-{self.suite}-{self.fault or 'no-fault'}"

    def link_args(self) -> list[str]:
        options = ["--profile", self.profile.value, "--max-message", str(MAX_MESSAGE), *self.suite.args()]
        return options + timeout_args(HANDSHAKE_TIMEOUT)

    @property
    def sent(self) -> dict[str, bytes]:
        """What each end has on stdin."""
        return {
            "client": data("client", CLIENT_SENDS),
            "server": data("server", SERVER_SENDS) if self.two_way else b"",
        }


@dataclass
class End:
    """What one end did: ``status`` None means it was still running after BOUND (and was killed)."""

    name: str
    sent: bytes
    output: bytes = b""
    status: int | None = None
    seconds: float = 0.0
    stderr: list[str] = field(default_factory=list)


@dataclass
class CliResult:
    case: CliCase
    server: End
    client: End
    handler: FaultHandler | None
    link: Link | None

    def ends(self) -> tuple[End, End]:
        return self.server, self.client


_addresses = itertools.count(1)
_addresses_lock = threading.Lock()


def next_loopback() -> str:
    """A loopback address no link of this process has come from yet (127.0.0.2, 127.0.0.3, ...)."""
    with _addresses_lock:
        n = next(_addresses)
    return f"127.{n // 64516 % 256}.{n // 254 % 254}.{n % 254 + 1}"


def start_proxy(port: int, case: CliCase) -> tuple[FrameProxy, FaultHandler | None]:
    """A proxy to ``port`` that applies the case's fault to its one link."""
    handler = None if case.fault is None else FaultHandler(case.fault, case.profile)
    if handler is None:
        return FrameProxy(port, source_host=next_loopback), None
    return FrameProxy(port, lambda link: handler, source_host=next_loopback), handler


def iscl_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "iscl_hsm", *map(str, args)]


def run_end(end: End, argv: list[str], env: dict[str, str], stdin: Path, stdout: Path) -> None:
    """Run a command to its end or BOUND; fill in ``end``'s status, time, output and stderr."""
    started = time.monotonic()
    with open(stdin, "rb") as source, open(stdout, "wb") as sink:
        process = subprocess.Popen(argv, env=env, stdin=source, stdout=sink, stderr=subprocess.PIPE)
    try:
        _, err = process.communicate(timeout=BOUND)
        end.status = process.returncode
    except subprocess.TimeoutExpired:
        stop_hung(process)
        _, err = process.communicate()
    end.seconds = time.monotonic() - started
    end.stderr = err.decode("utf-8", "replace").splitlines()
    end.output = stdout.read_bytes()


class LineLog:
    """A command's stderr, line by line, which many threads may wait on."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # the end
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """The first line (seen or still to come) that matches ``pattern``; None after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        with self._changed:
            while True:
                for line in self.lines:
                    if match := compiled.search(line):
                        return match
                if self.process.poll() is not None and self.lines and self.lines[-1] == "":
                    return None
                left = deadline - time.monotonic()
                if left <= 0 or not self._changed.wait(left):
                    return None


def start_listening(argv: list[str], env: dict[str, str], **streams: Any) -> tuple[LineLog, int]:
    """Start a command that prints "listening on 127.0.0.1:PORT"; its log and port. A start that
    lost the SoftHSM2 token race (TOKEN_RACE) is tried again."""
    for _ in range(ATTEMPTS):
        log = LineLog(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, **streams))
        if match := log.wait_for(r"listening on 127\.0\.0\.1:(\d+)", 120):
            return log, int(match.group(1))
        if not token_race(log.lines):
            break
    raise AssertionError(f"{argv[3:5]} did not start: {log.lines}")


class AcceptManyServer:
    """`iscl server --accept-many DIR` of one profile and suite, serving every one-way case of it."""

    def __init__(self, hospitals: Hospitals, case: CliCase, folder: Path) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        argv = iscl_argv(
            "server",
            "--listen",
            "127.0.0.1:0",
            "--accept-many",
            folder,
            *token_args(hospitals, hospitals.a),
            *case.link_args(),
        )
        self.log, self.port = start_listening(
            argv, child_env(hospitals), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )

    def link_end(self, end: End, link: Link, started: float) -> None:
        """Fill in ``end`` with what the server did with ``link``: the file and the lines of the link."""
        address = re.escape(link.server_side)
        final = self.log.wait_for(
            rf"^iscl server: link (\d+) from {address}(: (\d+) bytes in (\S+)| failed: .*)$"
            rf"|^iscl server: link from {address} failed during the handshake: ",
            BOUND,
        )
        end.seconds = time.monotonic() - started
        end.stderr = [line for line in list(self.log.lines) if f" {link.server_side}" in line]
        if final is None:
            return  # status None: no end of this link within BOUND
        if final.group(1) is not None:
            end.output = (self.folder / f"link-{final.group(1)}.bin").read_bytes()
        end.status = 0 if final.group(3) is not None else 1

    def stop(self) -> tuple[int, list[str]]:
        """SIGTERM; its exit status and every line it printed."""
        self.log.process.terminate()
        status = self.log.process.wait(BOUND)
        self.log.wait_for(r"^$", BOUND)
        return status, [line for line in self.log.lines if line]


def run_case(case: CliCase, hospitals: Hospitals, tmp: Path, server: AcceptManyServer | None) -> CliResult:
    """Run one case (again if an end lost the SoftHSM2 token race: TOKEN_RACE); ``server`` is the
    accept-many server of a one-way case (None: two-way)."""
    for attempt in range(ATTEMPTS):
        result = run_once(case, hospitals, tmp / f"attempt-{attempt}", server)
        if not any(token_race(end.stderr) for end in result.ends()):
            break
    return result


def run_once(case: CliCase, hospitals: Hospitals, tmp: Path, server: AcceptManyServer | None) -> CliResult:
    tmp.mkdir(parents=True)
    env = child_env(hospitals)
    sent = case.sent
    for name, content in sent.items():
        (tmp / f"{name}.in").write_bytes(content)
    ends = {name: End(name, sent[name]) for name in ("server", "client")}
    two_way = None
    if server is None:
        two_way = TwoWayServer(hospitals, case, tmp, ends["server"])
        port = two_way.port
    else:
        port = server.port
    proxy, handler = start_proxy(port, case)
    started = time.monotonic()
    try:
        run_end(
            ends["client"],
            iscl_argv(
                "client", "127.0.0.1", proxy.port, *token_args(hospitals, hospitals.b), *case.link_args()
            ),
            env,
            tmp / "client.in",
            tmp / "client.out",
        )
        if two_way is not None:
            two_way.finish()
        link = proxy.links[0] if proxy.links else None
        if server is not None and link is not None:
            server.link_end(ends["server"], link, started)
        elif server is not None:
            ends["server"].status = 1  # never connected (cannot happen: the client reached the proxy)
    finally:
        proxy.close()
    return CliResult(case, ends["server"], ends["client"], handler, proxy.links[0] if proxy.links else None)


class TwoWayServer:
    """A fresh `iscl server` for one link, its stdin and stdout in ``tmp``."""

    def __init__(self, hospitals: Hospitals, case: CliCase, tmp: Path, end: End) -> None:
        self.end = end
        self.tmp = tmp
        argv = iscl_argv(
            "server", "--listen", "127.0.0.1:0", *token_args(hospitals, hospitals.a), *case.link_args()
        )
        with open(tmp / "server.in", "rb") as source, open(tmp / "server.out", "wb") as sink:
            self.log, self.port = start_listening(argv, child_env(hospitals), stdin=source, stdout=sink)
        self.started = time.monotonic()
        """BOUND counts from here: a start slowed by a loaded machine is not the link's time."""

    def finish(self) -> None:
        """Wait for the server to end. One whose only link failed its handshake keeps listening for a
        client that authenticates (test_cli.py::test_the_server_survives_failed_handshakes): it is
        stopped with SIGTERM, and must say that no link was made."""
        process = self.log.process
        deadline = self.started + BOUND
        while process.poll() is None and time.monotonic() < deadline:
            if self.log.wait_for(r"failed during the handshake", 0.05) is not None:
                process.terminate()
                break
        try:
            self.end.status = process.wait(max(STOP_GRACE, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_hung(process)
        self.log.wait_for(r"^$", BOUND)
        self.end.seconds = time.monotonic() - self.started
        self.end.stderr = [line for line in self.log.lines if line]
        self.end.output = (self.tmp / "server.out").read_bytes()


def frames_summary(link: Link | None) -> Iterator[str]:
    """The frames of a link, one line each, for a failure message."""
    from iscl_hsm.wire import MessageId

    for seen in [] if link is None else link.seen:
        try:
            name = MessageId(seen.frame.message_id).name
        except ValueError:
            name = hex(seen.frame.message_id)
        yield f"{seen.direction}#{seen.index} {name} {len(seen.frame.payload)}B"
