"""A private pcscd with only the vsmartcard virtual reader, for tests and benchmarks.

pcscd's socket path (/run/pcscd/pcscd.comm) is compiled in, so a second pcscd needs its own mount
namespace: ``unshare -m`` mounts a private tmpfs on /run/pcscd for it alone (root only). Clients
find it through PCSCLITE_CSOCK_NAME, which libpcsclite reads once per process; it points at a
symbolic link that :meth:`PrivatePcscd.start` re-aims at each new daemon, so a process can stop
and restart pcscd under the same name. The vpcd readers listen on a free pair of TCP ports, so
nothing clashes with a system pcscd or another test run.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Final

from ..errors import KeyHolderError

VPCD_DRIVER: Final = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
READER_NAMES: Final = ("Virtual PCD 00 00", "Virtual PCD 00 01")
"""The two readers vpcd registers, on ``port`` and ``port + 1``."""
SOCKET_ENV: Final = "PCSCLITE_CSOCK_NAME"


def free_port_pair() -> int:
    """A port P such that P and P + 1 are free on every interface (vpcd binds 0.0.0.0)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("0.0.0.0", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("0.0.0.0", port + 1))
                except OSError:
                    continue
                return port
    raise KeyHolderError("found no free pair of TCP ports for the virtual reader")


def missing_components() -> list[str]:
    """What this machine lacks to run a private pcscd with the virtual reader."""
    missing = [name for name in ("pcscd", "unshare") if shutil.which(name) is None]
    if not VPCD_DRIVER.exists():
        missing.append(f"vsmartcard-vpcd ({VPCD_DRIVER})")
    return missing


class PrivatePcscd:
    """pcscd in its own mount namespace, reached through ``socket_link`` (use as PCSCLITE_CSOCK_NAME)."""

    def __init__(self, directory: Path, *, virtual_reader: bool = True) -> None:
        self.directory = directory
        self.socket_link = directory / "pcscd.comm"
        self.log = directory / "pcscd.log"
        self.port = free_port_pair()
        self.process: subprocess.Popen[bytes] | None = None
        config = directory / "reader.conf.d"
        config.mkdir(parents=True, exist_ok=True)
        if virtual_reader:  # without it: a pcscd with no reader at all
            (config / "vpcd").write_text(
                'FRIENDLYNAME "Virtual PCD"\n'
                f"DEVICENAME   /dev/null:0x{self.port:04X}\n"
                f"LIBPATH      {VPCD_DRIVER}\n"
                f"CHANNELID    0x{self.port:04X}\n"
            )
        self._config = config

    def reader_port(self, reader: int) -> int:
        """The TCP port of reader 0 or 1, to which a virtual card connects."""
        return self.port + reader

    def start(self, timeout: float = 20.0) -> None:
        """Start pcscd and wait until its socket answers; raise KeyHolderError if it does not."""
        Path("/run/pcscd").mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["unshare", "-m", "sh", "-c",
                 f"mount -t tmpfs tmpfs /run/pcscd && exec pcscd -f -c {self._config}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        target = Path(f"/proc/{self.process.pid}/root/run/pcscd/pcscd.comm")
        with contextlib.suppress(FileNotFoundError):
            self.socket_link.unlink()
        self.socket_link.symlink_to(target)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise KeyHolderError(f"the private pcscd did not start; see {self.log}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket_link))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """Stop pcscd by its PID (SIGTERM, then SIGKILL) and wait for it."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None
