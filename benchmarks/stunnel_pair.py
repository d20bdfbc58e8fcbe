"""A pair of stunnel4 processes on loopback, the TLS tunnel a site would otherwise deploy in front of
DICOM: client stunnel (plain in) -> TLS 1.3 -> server stunnel (TLS in) -> target.

Both ends authenticate each other with the run's RSA 2048 certificates (benchmarks/tls.py), as the
ISCL tunnels authenticate both ends; TLS 1.3 only, stunnel's default cipher suite order (AES-256-GCM
first) and its default TCP_NODELAY on both sides of each tunnel. stunnel runs a thread per connection.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from benchmarks.common import Children, on_a_free_port, wait_until
from benchmarks.tls import Credentials

STUNNEL = "stunnel4"
_LISTEN = "0A"
"""TCP_LISTEN, as /proc/net/tcp writes a socket's state."""


def stunnel_missing() -> str:
    """Why stunnel4 cannot run here, or "" when it can."""
    return "" if shutil.which(STUNNEL) else "stunnel4 is not installed (apt-get install stunnel4)"


def stunnel_config(end: str, accept: int, connect: int, credentials: Credentials) -> str:
    """stunnel's configuration for one ``end`` ("client" or "server") of the pair."""
    key, cert = ((credentials.client_key, credentials.client_cert) if end == "client"
                 else (credentials.server_key, credentials.server_cert))
    lines = [
        "foreground = yes", "pid =", "debug = notice", "[dicom]", f"client = {'yes' if end == 'client' else 'no'}",
        f"accept = 127.0.0.1:{accept}", f"connect = 127.0.0.1:{connect}", f"cert = {cert}", f"key = {key}",
        f"CAfile = {credentials.ca}", "verifyChain = yes", "sslVersionMin = TLSv1.3", "sslVersionMax = TLSv1.3",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def listening(port: int) -> bool:
    """True when a socket listens on 127.0.0.1:``port`` (from /proc/net/tcp)."""
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == _LISTEN:
            return True
    return False


class StunnelPair:
    """Both stunnels, started in front of ``target_port``; ``port`` is where applications connect,
    ``server_port`` where the server stunnel takes TLS.

    The same shape as :class:`benchmarks.gateway_pair.GatewayPair` (``port``, ``pids``, ``commands``,
    ``stop()``), so a benchmark runs either.
    """

    def __init__(self, children: Children, credentials: Credentials, target_port: int, folder: Path) -> None:
        if missing := stunnel_missing():
            raise FileNotFoundError(missing)
        folder.mkdir(parents=True, exist_ok=True)
        self.children = children
        self.processes: list[subprocess.Popen[bytes]] = []
        self.commands: list[list[str]] = []
        self.server_port = on_a_free_port(lambda port: self._start("server", port, target_port, credentials, folder))
        self.port = on_a_free_port(lambda port: self._start("client", port, self.server_port, credentials, folder))

    def _start(self, end: str, accept: int, connect: int, credentials: Credentials, folder: Path) -> int:
        """Start one end's stunnel and wait until it listens on ``accept`` (read from /proc: a probe
        connection would itself open a TLS session or fail one); RuntimeError if it ends first."""
        config = folder / f"{end}.conf"
        config.write_text(stunnel_config(end, accept, connect, credentials))
        command = [shutil.which(STUNNEL) or STUNNEL, str(config)]
        log_path = folder / f"{end}.log"
        with log_path.open("wb") as log_file:
            process = self.children.popen(command, stdout=log_file, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} ended ({process.returncode}): {log_path.read_text()[-2000:]}")
            return listening(accept)

        wait_until(ready, " ".join(command))
        self.processes.append(process)
        self.commands.append(command)
        return accept

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            self.children.stop(process)
