"""DCMTK storescu -> `iscl tunnel client` -> fault proxy -> `iscl tunnel server` -> DCMTK storescp.

A :class:`GatewayPair` is the long-lived part: both tunnels as real commands of one profile and suite,
storescp behind the server tunnel, and the proxy between the tunnels, which gives each new link the
fault :meth:`GatewayPair.plan` chooses (none, a queued one, or a random one for the soak). A store
is one storescu run with one small new object, so one association and one ISCL link.

Each link reaches the server tunnel from its own loopback address, so its log line (and a failed
handshake's, which the tunnel would otherwise merge with others from the same host) is its own. The
client tunnel's lines name only storescu's port, so a pair that checks lines runs one store at a time.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from iscl_hsm.dicom.study import StudySpec, dataset_bytes, write_study
from iscl_hsm.engine import Profile
from iscl_hsm.wire import Encryption, Mac

from ..conftest import Hospitals
from ..gateway.conftest import child_env, dcmtk, free_port, parse_line, wait_listening
from ..proxy import FrameProxy, Handler, Link
from .cli import TIMEOUT, LineLog, Suite, iscl_argv, next_loopback, start_listening, timeout_args
from .faults import Fault, FaultHandler
from .printouts import strays

STORE_BOUND = 60.0
"""Seconds a store may take before it counts as hung: a few ISCL timeouts, and DCMTK's own."""
DCMTK_TIMEOUT = 20
"""storescu's --timeout, --dimse-timeout and --acse-timeout: DICOM's own bound, past the ISCL ones."""
DCMTK_OPTIONS = [
    word for name in ("--timeout", "--dimse-timeout", "--acse-timeout") for word in (name, str(DCMTK_TIMEOUT))
]
GATEWAY_SUITES = (
    Suite(Encryption.DES_CBC, Mac.DES_MAC),
    Suite(Encryption.DES_CBC, Mac.MD5, session_keys=True),
    Suite(Encryption.NONE, Mac.MD5),
    Suite(Encryption.NONE, Mac.DES_MAC, session_keys=True),
)
"""Suites with a MAC (without one, a changed data set is stored as it comes: security.md, "MAC none")."""
ISCL_CODE = re.compile(r"\[ISCL \d{3} [A-Z_]+\]$")


@dataclass(frozen=True)
class GatewayCase:
    profile: Profile
    suite: Suite
    fault: Fault | None

    @property
    def id(self) -> str:
        return f"{self.profile.value}-{self.suite}-{self.fault or 'no-fault'}"


@dataclass
class Store:
    """One storescu run and what came of it."""

    sent: Path
    uid: str
    status: int | None = None
    """storescu's exit status; None: still running after STORE_BOUND (killed)."""
    output: str = ""
    seconds: float = 0.0
    stored: bytes | None = None
    """The file storescp wrote for this object, if any."""
    handler: FaultHandler | None = None
    link: Link | None = None
    lines: dict[str, str] = field(default_factory=dict)
    """The tunnels' link lines ("client", "server"): the result field of each."""

    @property
    def reported_stored(self) -> bool:
        """storescu says so: its C-STORE response came back with status Success."""
        return "Received Store Response (Success)" in self.output

    @property
    def reported_failed(self) -> bool:
        """storescu says something failed: it exits non-zero, or prints an error line ("E: Store
        Failed", ...). DCMTK's storescu exits 0 after an aborted association: its exit status alone is
        no report of success."""
        return self.status != 0 or any(line.startswith("E: ") for line in self.output.splitlines())

    @property
    def identical(self) -> bool:
        return self.stored is not None and dataset_bytes(self.stored) == dataset_bytes(self.sent.read_bytes())


def link_results(tunnel: LineLog) -> list[str]:
    """The result field of each link line the tunnel logged so far, in order (a line that does not
    parse as a link line: the whole line, which no oracle accepts as a result)."""
    return [link_result(line) for line in list(tunnel.lines) if " msg=link " in line]


def link_result(line: str) -> str:
    """A link line's result ("closed", "aborted: why"), or the whole line if it is not one."""
    try:
        return parse_line(line)["result"]
    except AssertionError:
        return line


class GatewayPair:
    """storescp, both tunnels and the proxy between them, for one profile and suite."""

    def __init__(self, hospitals: Hospitals, profile: Profile, suite: Suite, folder: Path) -> None:
        self.profile, self.suite, self.folder = profile, suite, folder
        (folder / "stored").mkdir(parents=True)
        self.stored = folder / "stored"
        self._queue: deque[Fault | None] = deque()
        self.plan: Callable[[Link], Fault | None] = lambda link: (
            self._queue.popleft() if self._queue else None
        )
        self.handlers: dict[int, FaultHandler] = {}
        """The fault handler of each link that had a fault, by link number."""
        self.scp_port = free_port()
        self.scp = subprocess.Popen(
            [dcmtk("storescp"), "--fork", "-od", str(self.stored), str(self.scp_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.scp_port, self.scp)
        link_options = ["--profile", profile.value, *suite.args(), "--listen", "127.0.0.1:0"]
        link_options += [*timeout_args(2 * TIMEOUT), "--workers", "1"]  # one process: a hang's traceback is its
        self.server, server_port = self._tunnel(
            hospitals, "server", "--forward", f"127.0.0.1:{self.scp_port}", *link_options
        )
        self.proxy = FrameProxy(server_port, self._handler, source_host=next_loopback)
        self.client, self.port = self._tunnel(
            hospitals, "client", "--connect", f"127.0.0.1:{self.proxy.port}", *link_options
        )

    @staticmethod
    def _tunnel(hospitals: Hospitals, mode: str, *options: str) -> tuple[LineLog, int]:
        token = hospitals.a if mode == "server" else hospitals.b
        argv = iscl_argv(
            "tunnel", mode, "--token", token.label, "--pin-file", hospitals.pin_file(token), *options
        )
        return start_listening(
            argv, child_env(hospitals), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )

    def _handler(self, link: Link) -> Handler:
        fault = self.plan(link)
        if fault is None:
            return Handler()
        self.handlers[link.number] = handler = FaultHandler(fault, self.profile)
        return handler

    def store(self, work: Path, fault: Fault | None = None, *, lines: bool = True) -> Store:
        """Send one new object with storescu; with ``lines``, wait for both tunnels' lines of its link
        (one store at a time, see the module's docstring)."""
        (sent,) = write_study(work, StudySpec(images=1, rows=16, columns=16))
        store = Store(sent, read_file_meta_info(sent).MediaStorageSOPInstanceUID)
        if lines:
            self._queue.append(fault)
            links_before = len(self.proxy.links)
            client_lines_before = self._client_lines()
        started = time.monotonic()
        argv = [dcmtk("storescu"), "-v", *DCMTK_OPTIONS, "127.0.0.1", str(self.port), str(sent)]
        try:
            done = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=STORE_BOUND,
                check=False,
            )
            store.status, store.output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as exc:
            store.output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        store.seconds = time.monotonic() - started
        if lines:
            self._collect_lines(store, links_before, client_lines_before, started)
        path = self.stored / f"CT.{store.uid}"
        store.stored = path.read_bytes() if path.exists() else None
        return store

    def _client_lines(self) -> int:
        return len(link_results(self.client))

    def _collect_lines(self, store: Store, links_before: int, client_before: int, started: float) -> None:
        """The link's lines: the server tunnel's by the address the link came from, the client's by count."""
        deadline = started + STORE_BOUND
        while len(self.proxy.links) <= links_before and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(self.proxy.links) <= links_before:
            return  # the client tunnel never connected
        store.link = link = self.proxy.links[links_before]
        store.handler = self.handlers.get(link.number)
        address = re.escape(link.server_side)
        left = max(0.0, deadline - time.monotonic())
        if match := self.server.wait_for(rf"^.* msg=link (?:.* )?from={address} .*$", left):
            store.lines["server"] = link_result(match.group(0))
        while self._client_lines() <= client_before and time.monotonic() < deadline:
            time.sleep(0.01)
        client = link_results(self.client)
        if len(client) > client_before:
            store.lines["client"] = client[client_before]

    def stop(self) -> list[str]:
        """Stop everything; what went wrong (a tunnel that did not stop cleanly, a traceback)."""
        problems = []
        for name, tunnel in (("client", self.client), ("server", self.server)):
            tunnel.process.terminate()
            status = tunnel.process.wait(120)
            tunnel.wait_for(r"^$", 30)
            if status != 0:
                problems.append(f"tunnel {name}: exit {status}")
            if stray := strays(tunnel.lines):
                problems.append(f"tunnel {name}: {stray}")
        self.proxy.close()
        self.scp.terminate()
        self.scp.wait(120)
        return problems
