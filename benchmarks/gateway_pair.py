"""A pair of `iscl tunnel` processes on loopback: client tunnel -> ISCL -> server tunnel -> target."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, BenchToken, Children, child_pids, link_options, wait_until
from iscl_hsm.engine import Profile

_LISTENING = re.compile(r"listening on (\S+):(\d+),")


def gateway_missing() -> str:
    """Why `python3 -m iscl_hsm tunnel` cannot run here, or "" when it can."""
    probe = subprocess.run([sys.executable, "-m", "iscl_hsm", "tunnel", "--help"], cwd=REPO, check=False,
                           capture_output=True, text=True)
    return "" if probe.returncode == 0 else "gateway not available (`python3 -m iscl_hsm tunnel` is missing)"


def tunnel_command(mode: str, listen: str, target: str, token: BenchToken, profile: Profile, suite: str
                   ) -> list[str]:
    target_option = "--connect" if mode == "client" else "--forward"
    return [sys.executable, "-m", "iscl_hsm", "tunnel", mode, "--listen", listen, target_option, target,
            *token.cli_options(), *link_options(profile, suite)]


def start_service(children: Children, command: list[str], token: BenchToken, log_path: Path, tree: Path = REPO
                  ) -> tuple[subprocess.Popen[bytes], int]:
    """Start an `iscl` server command on port 0; returns it and the port its "listening on" line names.

    Its output goes to a file (a pipe nobody reads would fill up and stall it). Another ``tree`` (a
    checkout of an older revision) runs the command on that tree's iscl_hsm.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = token.environment if tree == REPO else {**token.environment, "PYTHONPATH": str(tree)}
    with log_path.open("wb") as log_file:
        process = children.popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment, cwd=tree)
    found: list[int] = []

    def listening() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(command)} ended: {log_path.read_text()}")
        match = _LISTENING.search(log_path.read_text())
        if match:
            found.append(int(match.group(2)))
        return bool(found)

    wait_until(listening, " ".join(command[1:5]))
    return process, found[0]


class GatewayPair:
    """Both tunnels of one profile and suite, started in front of ``target_port``; ``port`` is where
    applications connect. ``tree`` is the checkout whose iscl_hsm they run (this one by default)."""

    def __init__(self, children: Children, token: BenchToken, profile: Profile, suite: str, target_port: int,
                 logs: Path, tree: Path = REPO) -> None:
        self.children = children
        server = tunnel_command("server", "127.0.0.1:0", f"127.0.0.1:{target_port}", token, profile, suite)
        server_process, server_port = start_service(children, server, token, logs / "server.log", tree)
        client = tunnel_command("client", "127.0.0.1:0", f"127.0.0.1:{server_port}", token, profile, suite)
        client_process, self.port = start_service(children, client, token, logs / "client.log", tree)
        self.processes = [server_process, client_process]
        self.commands = [server, client]

    @property
    def pids(self) -> list[int]:
        """Both tunnels' processes: each tunnel's main process and its workers (``--workers``)."""
        return [pid for process in self.processes for pid in (process.pid, *child_pids(process.pid))]

    def stop(self) -> None:
        for process in self.processes:
            self.children.stop(process)
