"""Several worker processes sharing one listening socket (``iscl tunnel --workers N``).

One asyncio process uses one core; the gateway's work (MACs, DES, the relay) is CPU-bound, so N
processes accept from one socket the supervisor bound before forking them (the kernel hands each new
connection to one of them). Each worker opens its own key-holder session: a token session is not
shared across processes, and PKCS#11 must be initialised in the process that uses it.

The supervisor starts them one at a time, each once the one before has opened its token (SoftHSM2's
file store fails a process that initialises while another does: "could not list its tokens"), says
"ready" once every one has its keys and listens, passes SIGHUP on
(each worker reloads), turns SIGTERM or SIGINT into a drain of all of them, and starts a new worker
in place of one that dies. A worker that fails before it is ready (a wrong PIN, a missing key) stops
them all, and its exit status is the supervisor's: a restart could not mend it.

POSIX only (``os.fork``); with one worker nothing is forked.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from ..logs import fields

log = logging.getLogger(__name__)

Worker = Callable[[int, Callable[[], None]], int]
"""``worker(number, ready)``: serve until told to stop, calling ``ready()`` once listening; its exit status."""

_PR_SET_PDEATHSIG = 1

KILL_GRACE = 10.0
"""Seconds beyond the drain timeout a stopping worker gets before it is killed."""


@dataclass
class _Child:
    number: int
    ready: bool = False


@dataclass
class Supervisor:
    """Runs ``count`` copies of ``worker``; see the module's docstring."""

    count: int
    worker: Worker
    listener: socket.socket
    """The socket the workers accept from; closed here on SIGTERM, so that new connections are refused."""
    on_ready: Callable[[], None]
    """Called once, when every worker has called its ``ready()``."""
    on_stopping: Callable[[], None]
    """Called once, when the tunnel stops after it was ready (SIGTERM, SIGINT, a worker that fails)."""
    on_reload: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    """Entered around passing SIGHUP on (e.g. to tell systemd of the reload)."""
    on_exit: Callable[[int], None] = lambda pid: None
    """Called with the pid of each worker that exited (e.g. to drop its live metrics)."""
    drain_timeout: float = 30.0
    _children: dict[int, _Child] = field(default_factory=dict)
    _stopping_since: float | None = None
    _waiting: list[int] = field(default_factory=list)
    """Numbers of the workers to start, the next once every running one is ready."""
    _announced: bool = False
    """Whether ``on_ready`` was called: until then a failure is the start's, reported by the worker."""

    @property
    def started(self) -> bool:
        """Whether every worker was ready at some point (``on_ready`` was called)."""
        return self._announced

    def run(self) -> int:
        """Start the workers and supervise them until they have all ended; the exit status."""
        ready_in, ready_out = os.pipe()
        wake_in, wake_out = os.pipe()
        os.set_blocking(wake_out, False)
        os.set_blocking(wake_in, False)
        previous = {signum: signal.signal(signum, _note) for signum in _handled()}
        old_wakeup = signal.set_wakeup_fd(wake_out)
        try:
            self._waiting = list(range(1, self.count + 1))
            return self._supervise(ready_in, wake_in, ready_out)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for fd in (ready_in, ready_out, wake_in, wake_out):
                os.close(fd)

    def _start(self, number: int, ready_out: int) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                signal.set_wakeup_fd(-1)
                for signum in _handled():
                    signal.signal(signum, signal.SIG_DFL)
                _stop_with(supervisor)

                def ready() -> None:
                    os.write(ready_out, bytes([number]))

                status = self.worker(number, ready)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)  # not the supervisor's clean-up (atexit, its sockets' shutdown)
        self._children[pid] = _Child(number)

    def _supervise(self, ready_in: int, wake_in: int, ready_out: int) -> int:
        status = 0
        with selectors.DefaultSelector() as selector:
            selector.register(ready_in, selectors.EVENT_READ)
            selector.register(wake_in, selectors.EVENT_READ)
            while True:
                if self._stopping_since is None and all(c.ready for c in self._children.values()):
                    if self._waiting:
                        self._start(self._waiting.pop(0), ready_out)  # one at a time, see above
                    elif not self._announced:
                        self._announced = True
                        self.on_ready()
                if not self._children:
                    break
                timeout = None
                if self._stopping_since is not None:
                    timeout = max(0.0, self._stopping_since + self.drain_timeout + KILL_GRACE - time.monotonic())
                    if timeout == 0:
                        self._signal_all(signal.SIGKILL)
                        timeout = 1.0
                for key, _ in selector.select(timeout):
                    if key.fd == ready_in:
                        numbers = set(os.read(ready_in, 64))
                        for child in self._children.values():
                            child.ready |= child.number in numbers
                    else:
                        for signum in _drain(wake_in):
                            self._on_signal(signum)
                failed = self._reap()
                if failed is not None and status == 0:
                    status = failed
        return status

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            with self.on_reload():
                self._signal_all(signal.SIGHUP)
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self._stop()

    def _stop(self) -> None:
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
            self.listener.close()  # (each worker closes its own copy as it stops)
            if self._announced:
                self.on_stopping()
        self._signal_all(signal.SIGTERM)

    def _reap(self) -> int | None:
        """Collect the workers that exited; the status to end with if one failed before it was ready."""
        failed = None
        while self._children:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            child = self._children.pop(pid, None)
            if child is None:
                continue
            self.on_exit(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if self._stopping_since is not None:
                if code != 0:
                    log.warning("worker %d exited with status %d while stopping", child.number, code,
                                extra=fields(worker=child.number, status=code))  # fmt: skip
                continue
            if not child.ready:
                failed = code if code > 0 else 1
                if self._announced:  # (before that, the worker's own line says why the tunnel did not start)
                    log.error("worker %d failed as it started (status %d); stopping the others", child.number,
                              code, extra=fields(worker=child.number, status=code))  # fmt: skip
                self._stop()
                continue
            log.warning("worker %d exited with status %d; starting another", child.number, code,
                        extra=fields(worker=child.number, status=code))  # fmt: skip
            self._waiting.append(child.number)  # started once the others are ready, one at a time
        return failed

    def _signal_all(self, signum: int) -> None:
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def _handled() -> tuple[signal.Signals, ...]:
    """The signals the supervisor acts on (named here, not at import: Windows has no SIGHUP)."""
    return signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD


def _stop_with(supervisor: int) -> None:
    """Have this worker sent SIGTERM (a drain) when its supervisor dies without stopping it (killed, say),
    so that no orphan keeps the port (Linux's PR_SET_PDEATHSIG; elsewhere, nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _note(signum: int, frame: object) -> None:
    """A handler that does nothing: the wake-up pipe carries the signal to the supervisor's loop."""


def _drain(fd: int) -> bytes:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 64):
            data += chunk
    return data
