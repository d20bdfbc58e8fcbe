"""Scale-out behind HAProxy (docs/scale-out.md): Debian's haproxy in TCP mode in front of two `iscl tunnel
server` processes, each with --proxy-protocol and its own storescp; a client tunnel pointing at haproxy.
One server process is killed (SIGKILL) in the middle of a store: that association is aborted with an
intact prefix stored, and every new association still succeeds through the other, byte-identical.

storescu -> client tunnel (hospital B) -> haproxy (send-proxy-v2, from 127.0.0.2) -> server tunnel a | b
(hospital A's token, shared as one network HSM would be) -> storescp a | b

haproxy connects from 127.0.0.2 and the client tunnel from 127.0.0.1, and the servers allow only
127.0.0.1: a link that gets through, logged from 127.0.0.1, was named and checked by its PROXY header.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import Hospitals
from ..faults.conftest import kill, wait_until
from ..faults.test_peer_killed import assert_an_intact_prefix, stored_of, storescu, study
from .conftest import (
    TIMEOUT,
    StoreScp,
    TunnelCommand,
    assert_stored_identical,
    free_port,
    running_storescp,
    scu,
)
from .test_gateway_cli import link_lines

HAPROXY_CONFIG = """\
defaults
    mode tcp
    timeout connect 2s
    timeout client 13h
    timeout server 13h
    timeout tunnel 13h
    timeout check 2s
    retries 3
    option redispatch 1
frontend iscl
    bind 127.0.0.1:{port}
    default_backend tunnels
backend tunnels
    balance roundrobin
    default-server send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 1 source 127.0.0.2
{servers}
"""
"""What docs/scale-out.md shows, with round robin (so both instances take links in turn), checks every
200 ms, and haproxy's outgoing address set apart."""


def haproxy_path() -> str:
    """Debian's haproxy; the test fails when it is not installed."""
    path = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(path, os.X_OK):
        pytest.fail("HAProxy is not installed: apt-get install haproxy")
    return path


def wait_bound(port: int, process: subprocess.Popen[bytes]) -> None:
    """Wait until ``process`` listens on 127.0.0.1:``port``, seen in /proc/net/tcp: a probe connection
    would be relayed to a server tunnel, which would log it as a failed link."""
    listening = f" 0100007F:{port:04X} 00000000:0000 0A "
    deadline = time.monotonic() + TIMEOUT
    while listening not in Path("/proc/net/tcp").read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{process.args!r} (status {process.returncode}) does not listen on {port}")
        time.sleep(0.02)


@dataclass
class HaProxy:
    port: int
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[dict[str, int]], HaProxy]]:
    """``haproxy({name: port})``: haproxy in the foreground (-db) with a config in ``tmp_path``, balancing
    over those servers; stopped by its PID after the test."""
    started: list[HaProxy] = []

    def start(servers: dict[str, int]) -> HaProxy:
        port = free_port()
        config = tmp_path / "haproxy.cfg"
        lines = "\n".join(f"    server {name} 127.0.0.1:{server_port}" for name, server_port in servers.items())
        config.write_text(HAPROXY_CONFIG.format(port=port, servers=lines))
        log = tmp_path / "haproxy.log"
        with log.open("wb") as output:
            process = subprocess.Popen([haproxy_path(), "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                                       stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
        started.append(HaProxy(port, process, log))
        wait_bound(port, process)
        return started[-1]

    yield start
    for proxy in started:
        proxy.process.terminate()
        proxy.process.wait(TIMEOUT)


def store_through(port: int, files: list[Path], scps: list[StoreScp]) -> StoreScp:
    """Store ``files`` in one association; all must succeed. The SCP that holds them, checked identical."""
    done = scu("storescu", port, *files)
    assert done.returncode == 0 and "E: " not in done.stdout, done.stdout
    assert done.stdout.count("Received Store Response (Success)") == len(files), done.stdout
    (scp,) = [scp for scp in scps if stored_of(scp, files)]
    assert_stored_identical(scp, files)
    return scp


def test_two_server_tunnels_behind_haproxy_one_killed_in_the_middle_of_a_store(
    tmp_path: Path, hospitals: Hospitals, tunnel_command: Callable[..., TunnelCommand],
    haproxy: Callable[[dict[str, int]], HaProxy],
) -> None:  # fmt: skip
    with ExitStack() as stack:
        scps = {name: stack.enter_context(running_storescp(tmp_path / f"stored-{name}")) for name in "ab"}
        servers: dict[str, TunnelCommand] = {}
        for name, scp in scps.items():
            config = tmp_path / f"server-{name}.toml"
            config.write_text(f'listen = "127.0.0.1:0"\nforward = "127.0.0.1:{scp.port}"\nproxy-protocol = true\n'
                              'allow-from = ["127.0.0.1/32"]\nworkers = 1\n')  # fmt: skip (one process: killed whole)
            servers[name] = tunnel_command("server", hospitals.a, "--config", config)
        proxy = haproxy({name: server.port for name, server in servers.items()})
        client = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect", f"127.0.0.1:{proxy.port}")
        small = [study(tmp_path / f"small-{n}", images=2) for n in range(10)]

        used = {store_through(client.port, files, list(scps.values())).folder for files in small[:4]}
        assert used == {scp.folder for scp in scps.values()}  # round robin: both instances take links

        files = study(tmp_path / "large")
        store = storescu(client.port, files)
        wait_until(lambda: any(stored_of(scp, files[:1]) for scp in scps.values()), "the first stored image", store)
        (victim,) = [name for name, scp in scps.items() if stored_of(scp, files[:1])]
        kill(servers[victim].process)
        output = store.communicate(timeout=TIMEOUT)[0]
        (survivor,) = set(scps) - {victim}

        assert store.returncode != 0 or "E: " in output, output  # storescu saw its association aborted
        assert_an_intact_prefix(scps[victim], files, output)
        for files in small[4:]:  # new associations: all through the survivor, the first ones too
            assert store_through(client.port, files, list(scps.values())) is scps[survivor]
        status, survivor_log = servers[survivor].stop()

    assert status == 0 and "Traceback" not in survivor_log, survivor_log
    lines = link_lines(survivor_log)
    assert len(lines) == 2 + 6  # its two small stores before the kill, all six after; no refusal, no health check
    for log in (survivor_log, servers[victim].output()):
        for line in link_lines(log):
            assert line["source"].startswith("127.0.0.1:"), line  # the client tunnel, not haproxy at 127.0.0.2
    assert {line["result"] for line in lines} == {"closed"}
