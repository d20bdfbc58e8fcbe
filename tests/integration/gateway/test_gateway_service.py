"""`iscl tunnel` as a service: worker processes on one port, SIGHUP reload, metrics, and log formats."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import child_pids
from iscl_hsm.cli.main import EXIT_CONFIG
from iscl_hsm.dicom.study import StudySpec, write_study
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.keyholder.provision import ensure_token
from iscl_hsm.keys.components import ALGORITHMS
from iscl_hsm.keys.store import ROTATE, KeyStore

from ... import logfmt
from ..conftest import HOSPITAL_KEYS, STRANGER_AUTH_1, Hospitals, SoftHsm, SoftHsmToken
from .conftest import REPO, TIMEOUT, StoreScp, TunnelCommand, assert_stored_identical, child_env, dcmtk, scu
from .test_gateway_cli import link_lines, wait_for

Start = Callable[..., TunnelCommand]


def workers_of(tunnel: TunnelCommand) -> list[int]:
    return child_pids(tunnel.process.pid)


def echo(client: TunnelCommand) -> subprocess.CompletedProcess[str]:
    return scu("echoscu", client.port)


def count(output: str, pattern: str) -> int:
    return len(re.findall(pattern, output))


def write_config(path: Path, storescp: StoreScp, **settings: object) -> Path:
    settings = {"listen": "127.0.0.1:0", "forward": f"127.0.0.1:{storescp.port}"} | settings
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items()))
    return path


def test_workers_share_the_port_and_a_dead_worker_is_replaced(
    tunnel_command: Start, hospitals: Hospitals, storescp: StoreScp
) -> None:
    server = tunnel_command("server", hospitals.a, "--listen", "127.0.0.1:0", "--forward",
                            f"127.0.0.1:{storescp.port}", "--workers", "2")  # fmt: skip
    client = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect",
                            f"127.0.0.1:{server.port}", "--workers", "2")  # fmt: skip
    assert len(workers_of(server)) == len(workers_of(client)) == 2
    assert all(echo(client).returncode == 0 for _ in range(6))

    victim = workers_of(server)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_output(r"msg=\"worker \d exited with status -9; starting another\"")
    wait_for(lambda: len(workers_of(server)) == 2 and victim not in workers_of(server), "a new worker")
    assert all(echo(client).returncode == 0 for _ in range(6))  # whichever worker takes them

    client_status, client_output = client.stop()
    server_status, server_output = server.stop()
    assert client_status == server_status == 0, client_output + server_output
    assert count(server_output, r"stopped \(0 link\(s\) aborted\)\" worker=\d") == 2
    lines = link_lines(client_output)
    assert len(lines) == 12 and {line["result"] for line in lines} == {"closed"}
    assert "Traceback" not in client_output + server_output


def test_a_worker_that_cannot_open_its_token_stops_the_tunnel_at_once(
    hospitals: Hospitals, storescp: StoreScp, tmp_path: Path
) -> None:
    wrong_pin = tmp_path / "wrong.pin"
    wrong_pin.write_text("000000\n")
    result = subprocess.run(
        [sys.executable, "-m", "iscl_hsm", "tunnel", "server", "--token", hospitals.a.label, "--pin-file",
         str(wrong_pin), "--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{storescp.port}", "--workers", "2"],
        check=False, env=child_env(hospitals), cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == EXIT_CONFIG  # (the units never restart on it)
    assert re.fullmatch(r"iscl: wrong PIN for PKCS#11 token .*\n", result.stderr), result.stderr  # that line only


def test_an_ic_card_is_refused_more_than_one_worker(hospitals: Hospitals, capsys: pytest.CaptureFixture[str]) -> None:
    from iscl_hsm.cli.main import main

    status = main(["tunnel", "server", "--card", "--workers", "2", "--forward", "127.0.0.1:104"])
    assert status != 0 and "an IC card serves one process at a time" in capsys.readouterr().err


def test_sighup_rereads_the_config_file_in_every_worker_and_a_bad_file_changes_nothing(
    tunnel_command: Start, hospitals: Hospitals, storescp: StoreScp, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "server.toml", storescp, **{"allow-key-id": [1]})
    server = tunnel_command("server", hospitals.a, "--config", config, "--workers", "2")
    client = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect",
                            f"127.0.0.1:{server.port}", "--auth-key-id", "2", "--workers", "1")  # fmt: skip
    assert echo(client).returncode != 0  # key pair 2 is not allowed yet

    write_config(config, storescp, **{"allow-key-id": [1, 2]})
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: count(server.output(), r'result=reloaded changed="allow-key-id=1,2"') == 2, "both workers reloaded")
    assert all(echo(client).returncode == 0 for _ in range(4))

    config.write_text("allow-key-id = [1,\n")  # not TOML
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: count(server.output(), rf"result=failed error=\"the config file {re.escape(str(config))} is not"
                                            r" valid TOML") == 2, "both workers refusing the file")  # fmt: skip
    assert echo(client).returncode == 0  # the settings of the last good reload still hold

    write_config(config, storescp, listen="127.0.0.1:1", **{"allow-key-id": [1, 2]})
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: count(server.output(), r"listen changed in the config file; it takes effect at the next restart")
             == 2, "the restart-only warning")  # fmt: skip
    assert echo(client).returncode == 0

    status, output = server.stop()
    assert status == 0 and "Traceback" not in output


def fresh_token(softhsm: SoftHsm, tmp_path: Path) -> tuple[SoftHsmToken, Path]:
    """A token of its own (this test changes its keys) with the hospitals' keys, and its PIN file."""
    token = softhsm.take()
    pin_file = tmp_path / f"{token.label}.pin"
    pin_file.write_text(token.pin + "\n")
    ensure_token(softhsm.data_dir, token.label, pin_file, HOSPITAL_KEYS, host_readable=True)
    return token, pin_file


def test_sighup_makes_new_links_use_a_rotated_key_while_an_open_link_finishes_on_the_old(
    tunnel_command: Start, hospitals: Hospitals, softhsm: SoftHsm, storescp: StoreScp, tmp_path: Path
) -> None:
    token, pin_file = fresh_token(softhsm, tmp_path)
    server = tunnel_command("server", None, "--token", token.label, "--pin-file", pin_file, "--listen", "127.0.0.1:0",
                            "--forward", f"127.0.0.1:{storescp.port}", "--workers", "1")  # fmt: skip
    old_keys = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect", f"127.0.0.1:{server.port}")
    new_keys = tunnel_command("client", hospitals.stranger, "--listen", "127.0.0.1:0", "--connect",
                              f"127.0.0.1:{server.port}")  # fmt: skip (the stranger's auth key 1 is the rotated one)
    assert echo(old_keys).returncode == 0 and echo(new_keys).returncode != 0

    files = write_study(tmp_path / "study", StudySpec(images=40, rows=256, columns=256))
    store = subprocess.Popen(  # an association open across the rotation and the reload
        [dcmtk("storescu"), "127.0.0.1", str(old_keys.port), *map(str, files)], stdout=subprocess.DEVNULL
    )
    wait_for(lambda: any(storescp.folder.iterdir()), "the first stored image")
    with Pkcs11KeyHolder(token.label, token.pin, token.module) as holder:
        KeyStore(holder).create("auth", 1, ALGORITHMS["des"], STRANGER_AUTH_1, mode=ROTATE,
                                grace=datetime.timedelta(days=1))  # fmt: skip
    assert echo(new_keys).returncode != 0  # the running tunnel still uses the key it looked up
    server.process.send_signal(signal.SIGHUP)
    server.wait_output(r'result=reloaded changed=-')

    assert store.wait(TIMEOUT) == 0
    assert_stored_identical(storescp, files)
    assert echo(new_keys).returncode == 0 and echo(old_keys).returncode != 0


def metric_samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_sum_every_workers_links_bytes_and_timings(
    tunnel_command: Start, hospitals: Hospitals, storescp: StoreScp, tmp_path: Path
) -> None:
    server = tunnel_command("server", hospitals.a, "--listen", "127.0.0.1:0", "--forward",
                            f"127.0.0.1:{storescp.port}", "--workers", "2", "--metrics", "127.0.0.1:0")  # fmt: skip
    port = int(server.wait_output(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
    client = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect", f"127.0.0.1:{server.port}")
    stranger = tunnel_command("client", hospitals.stranger, "--listen", "127.0.0.1:0", "--connect",
                              f"127.0.0.1:{server.port}")  # fmt: skip
    files = write_study(tmp_path / "study", StudySpec(images=3, rows=64, columns=64))
    assert all(echo(client).returncode == 0 for _ in range(5))
    assert scu("storescu", client.port, *files).returncode == 0
    assert echo(stranger).returncode != 0
    wait_for(lambda: len(link_lines(server.output())) == 7, "seven link lines")

    samples = metric_samples(port)
    server_mode = ("mode", "server")

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset({server_mode, *labels.items()}))]

    assert value("iscl_links_total", result="closed", code="") == 6
    failures = [v for (name, labels), v in samples.items() if name == "iscl_links_total" and ("result", "aborted") in labels]
    assert sum(failures) == 1
    assert value("iscl_links_open") == 0
    assert value("iscl_handshake_seconds_count") == 6
    sent = sum(f.stat().st_size for f in files)
    assert value("iscl_bytes_total", direction="iscl_to_plain") > sent  # the data sets, and the DICOM around them
    assert value("iscl_message_bytes_count", direction="iscl_to_plain") >= 6
    assert value("iscl_key_holder_call_seconds_count", operation="get_challenge") >= 6  # one per handshake
    server.stop()


def test_log_format_json_writes_one_object_per_line_with_the_logfmt_keys(
    tunnel_command: Start, hospitals: Hospitals, storescp: StoreScp
) -> None:
    server = tunnel_command("server", hospitals.a, "--listen", "127.0.0.1:0", "--forward",
                            f"127.0.0.1:{storescp.port}", "--workers", "1", "--log-format", "json")  # fmt: skip
    client = tunnel_command("client", hospitals.b, "--listen", "127.0.0.1:0", "--connect",
                            f"127.0.0.1:{server.port}", "--workers", "1")  # fmt: skip
    assert echo(client).returncode == 0
    client_status, client_text = client.stop()
    server_status, server_json = server.stop()
    assert client_status == server_status == 0

    records = [json.loads(line) for line in server_json.splitlines()]
    (link,) = [r for r in records if r["msg"] == "link"]
    assert link["result"] == "closed" and link["from"].startswith("127.0.0.1:") and link["iscl_to_plain"] > 0
    assert all({"time", "level", "logger", "msg"} <= record.keys() for record in records)
    text_lines = [logfmt.parse(line) for line in client_text.splitlines()]
    (text_link,) = [line for line in text_lines if line["msg"] == "link"]
    assert text_link.keys() - {"time", "level", "logger", "msg"} == link.keys() - {"time", "level", "logger", "msg"}


def test_workers_stop_when_their_supervisor_is_killed(tunnel_command: Start, hospitals: Hospitals, storescp: StoreScp) -> None:
    server = tunnel_command("server", hospitals.a, "--listen", "127.0.0.1:0", "--forward",
                            f"127.0.0.1:{storescp.port}", "--workers", "2")  # fmt: skip
    orphans = workers_of(server)
    server.process.kill()
    server.process.wait(TIMEOUT)

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # (a zombie nobody reaps yet)
        except FileNotFoundError:
            return True

    wait_for(lambda: all(map(gone, orphans)), "the workers to stop")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT).close()
