"""DICOM C-STORE: DCMTK storescu -> storescp directly, over DCMTK's TLS, through a stunnel TLS 1.3 pair
and through the ISCL gateway pair for each profile and suite; and `iscl store` -> `iscl serve`
(pynetdicom speaking ISCL itself) in each profile.

Every DCMTK path also gets its CPU per MB: the whole path's (storescu, storescp and both tunnels) and
the tunnels' alone; and a floor for a tunnel pair that checks MD5 over every byte at each end:
DCMTK's own CPU per MB (the direct path) plus OpenSSL's MD5 twice.

The study is generated (iscl_hsm.dicom.study) in a small-object and a large-object variant.
storescp receives with --ignore (nothing written); `iscl serve` writes to tmpfs (/dev/shm), so the
disk is not measured.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (
    REPO,
    BenchToken,
    Children,
    CpuMeter,
    Section,
    link_options,
    log,
    median,
    on_a_free_port,
    suite_label,
    wait_until,
)
from benchmarks.gateway_pair import GatewayPair, gateway_missing, start_service
from benchmarks.stunnel_pair import StunnelPair, stunnel_missing
from benchmarks.tls import Credentials
from iscl_hsm.dicom.study import StudySpec, write_study
from iscl_hsm.engine import Profile

GATEWAY_SUITES = ("none/md5", "none/des-mac", "des-cbc/md5", "des-cbc/des-mac")
PYNETDICOM_SUITE = "des-cbc/des-mac"
CALLED = "STORESCP"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
"""DCMTK leaves Nagle's algorithm on unless TCP_NODELAY is set; with delayed ACKs that costs about 90 ms
per small object on loopback, which would hide every other cost (docs/performance.md)."""
DIRECT = "direct (plain DICOM)"
STUNNEL = "stunnel TLS 1.3 pair (stunnel4, mutual, RSA 2048)"
FLOOR = "floor of a pair checking MD5 at both ends (DCMTK's own CPU + OpenSSL MD5 twice)"


def gateway_row(profile: Profile, suite: str) -> str:
    return f"ISCL gateway {suite_label(profile, suite)}"


def md5_ms_per_mb(seconds: float = 0.2) -> float:
    """CPU milliseconds OpenSSL's MD5 (through hashlib) takes per MB, on 1 MiB buffers."""
    buffer = os.urandom(1 << 20)
    hashed, started = 0, time.process_time()
    while not hashed or time.process_time() - started < seconds:
        hashlib.md5(buffer).digest()
        hashed += len(buffer)
    return (time.process_time() - started) / hashed * 1e9


@dataclass(frozen=True)
class Study:
    name: str
    files: list[Path]

    @property
    def size(self) -> int:
        return sum(path.stat().st_size for path in self.files)


def dcmtk(tool: str) -> str:
    """DCMTK's own tool (pynetdicom installs Python commands of the same names earlier on PATH)."""
    path = shutil.which(tool, path="/usr/bin:/usr/local/bin")
    if path is None:
        raise FileNotFoundError(f"DCMTK's {tool} is not installed (apt-get install dcmtk)")
    return path


def make_studies(folder: Path, small: StudySpec, large: StudySpec) -> list[Study]:
    studies = []
    for name, spec in (("small", small), ("large", large)):
        files = write_study(folder / name, spec)
        side = f"{spec.rows}x{spec.columns}"
        studies.append(Study(f"{name}: {spec.images} x {side} CT ({files[0].stat().st_size >> 10} KiB each)", files))
    return studies


def _tls_options(credentials: Credentials, end: str) -> list[str]:
    key, cert = (credentials.server_key, credentials.server_cert) if end == "server" else (
        credentials.client_key, credentials.client_cert)
    return ["+tls", str(key), str(cert), "+cf", str(credentials.ca)]


class StoreScp:
    """A DCMTK storescp that receives and discards (--ignore), optionally over TLS."""

    def __init__(self, children: Children, tls: Credentials | None, logs: Path) -> None:
        self.tls = tls
        logs.mkdir(parents=True, exist_ok=True)
        self.port, self.command, self.pid = on_a_free_port(lambda port: self._start(children, port, logs))

    def _start(self, children: Children, port: int, logs: Path) -> tuple[int, list[str], int]:
        """Start storescp on ``port`` and wait until it answers an echo; RuntimeError if it ends first."""
        command = [dcmtk("storescp"), "--ignore", "-aet", CALLED, *(_tls_options(self.tls, "server") if self.tls
                                                                     else []), str(port)]
        log_path = logs / f"storescp-{port}.log"
        with log_path.open("wb") as log_file:
            process = children.popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=DCMTK_ENV)

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"storescp on 127.0.0.1:{port} ended ({process.returncode}): {log_path.read_text()}")
            echo = [dcmtk("echoscu"), "-aec", CALLED, *(_tls_options(self.tls, "client") if self.tls else []),
                    "127.0.0.1", str(port)]
            return subprocess.run(echo, capture_output=True, check=False, env=DCMTK_ENV).returncode == 0

        wait_until(answers, f"storescp on 127.0.0.1:{port}")
        return port, command, process.pid


def pynetdicom_row(profile: Profile) -> str:
    return f"iscl store -> iscl serve (pynetdicom, {suite_label(profile, PYNETDICOM_SUITE)})"


class IsclServe:
    """`iscl serve` (pynetdicom behind ISCL, no gateway), storing into a tmpfs folder emptied after each run."""

    def __init__(self, children: Children, token: BenchToken, profile: Profile, suite: str, workdir: Path
                 ) -> None:
        shm = Path("/dev/shm")
        self.output = Path(tempfile.mkdtemp(prefix="iscl-bench-serve-", dir=shm if shm.is_dir() else workdir))
        options = [*token.cli_options(), *link_options(profile, suite)]
        self.command = [sys.executable, "-m", "iscl_hsm", "serve", "--output", str(self.output),
                        "--listen", "127.0.0.1:0", *options]
        log_path = workdir / "logs" / f"iscl-serve-{profile.value}.log"
        _, self.port = start_service(children, self.command, token, log_path)
        self.store = [sys.executable, "-m", "iscl_hsm", "store", *options, "127.0.0.1"]
        self.environment = token.environment
        self.startups: dict[str, list[float]] = {}

    def timed_store(self, study: Study) -> float:
        command = [*self.store, str(self.port), *map(str, study.files)]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=self.environment, cwd=REPO)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"iscl store to 127.0.0.1:{self.port} failed ({result.returncode}): {result.stderr[-2000:]}")
        for path in self.output.iterdir():
            path.unlink()
        self.startups.setdefault(study.name, []).append(self._startup())
        return elapsed

    def _startup(self) -> float:
        """Seconds to start Python and import `iscl store`'s modules (pynetdicom among them)."""
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "iscl_hsm", "store", "--help"], capture_output=True, check=True, cwd=REPO)
        return time.perf_counter() - started

    def close(self) -> None:
        shutil.rmtree(self.output, ignore_errors=True)


def store_command(port: int, files: Sequence[Path], tls: Credentials | None) -> list[str]:
    return [dcmtk("storescu"), "-aet", "BENCH", "-aec", CALLED, *(_tls_options(tls, "client") if tls else []),
            "127.0.0.1", str(port), *map(str, files)]


def timed_store(port: int, study: Study, tls: Credentials | None = None) -> float:
    """Seconds for one storescu run sending the whole study in one association."""
    command = store_command(port, study.files, tls)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=DCMTK_ENV)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to 127.0.0.1:{port} failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed


@dataclass
class Route:
    """One way from storescu to storescp: how a study runs through it, and the processes it keeps busy."""

    run: Callable[[Study], float]
    servers: list[int] = field(default_factory=list)
    """storescp (and whatever else serves the route), counted in the path's CPU."""
    tunnels: list[int] = field(default_factory=list)
    metered: bool = True
    """False where a run starts more than storescu (the pynetdicom rows time a Python start-up too)."""


def run(children: Children, token: BenchToken, credentials: Credentials, workdir: Path, rounds: int,
        small: StudySpec, large: StudySpec, profiles: Sequence[Profile]) -> Section:
    section = Section(
        "dicom", "DICOM C-STORE over loopback, one association per study (DCMTK storescu -> storescp)",
        [("files_s", "files/s"), ("mb_s", "MB/s"), ("vs_direct", "÷ direct"), ("vs_stunnel", "÷ stunnel"),
         ("path_ms_mb", "path CPU ms/MB"), ("tunnels_ms_mb", "tunnels' CPU ms/MB")],
    )  # fmt: skip
    studies = make_studies(workdir / "studies", small, large)
    logs = workdir / "logs"
    plain = StoreScp(children, None, logs)
    secure = StoreScp(children, credentials, logs)
    routes: dict[str, Route] = {
        DIRECT: Route(lambda study: timed_store(plain.port, study), [plain.pid]),
        "DCMTK TLS (BCP 195 profile)": Route(lambda study: timed_store(secure.port, study, credentials), [secure.pid]),
    }
    section.command(["TCP_NODELAY=1", *plain.command])
    section.command(["TCP_NODELAY=1", *secure.command])
    missing = {STUNNEL: stunnel_missing(), "ISCL gateway": gateway_missing()}
    pairs: list[StunnelPair | GatewayPair] = []
    if not missing[STUNNEL]:
        stunnel = StunnelPair(children, credentials, plain.port, logs / "stunnel")
        pairs.append(stunnel)
        routes[STUNNEL] = Route(functools.partial(timed_store, stunnel.port), [plain.pid], stunnel.pids)
    if not missing["ISCL gateway"]:
        for profile in profiles:
            for suite in GATEWAY_SUITES:
                gateway = GatewayPair(children, token, profile, suite, plain.port,
                                      logs / f"{profile.value}-{suite.replace('/', '-')}")
                pairs.append(gateway)
                routes[gateway_row(profile, suite)] = Route(functools.partial(timed_store, gateway.port), [plain.pid],
                                                            gateway.pids)
    for pair in pairs:
        for command in pair.commands:
            section.command(command)
    serves = {pynetdicom_row(profile): IsclServe(children, token, profile, PYNETDICOM_SUITE, workdir)
              for profile in profiles}
    for row, serve in serves.items():
        routes[row] = Route(serve.timed_store, metered=False)
        section.command(serve.command)
    times: dict[tuple[str, str], list[float]] = {}
    path_cpu: dict[tuple[str, str], list[float]] = {}  # ms per MB
    tunnel_cpu: dict[tuple[str, str], list[float]] = {}
    md5: list[float] = []
    for round_number in range(rounds):
        log(f"dicom: round {round_number + 1}/{rounds}")
        md5.append(md5_ms_per_mb())
        for study in studies:
            for name, route in routes.items():
                with CpuMeter(route.servers + route.tunnels) as path, CpuMeter(route.tunnels, own=False) as tunnels:
                    times.setdefault((study.name, name), []).append(route.run(study))
                if route.metered:
                    path_cpu.setdefault((study.name, name), []).append(path.seconds / study.size * 1e9)
                if route.tunnels:
                    tunnel_cpu.setdefault((study.name, name), []).append(tunnels.seconds / study.size * 1e9)
    for study in studies:
        section.command(["TCP_NODELAY=1", *store_command(plain.port, study.files[:1], None), "..."])
        rows = {name: times[(study.name, name)] for name in routes}
        for row, serve in serves.items():
            section.command([*serve.store, str(serve.port), str(study.files[0]), "..."])
            rows[f"{row}, less Python start-up"] = [
                run - startup for run, startup in zip(rows[row], serve.startups[study.name], strict=True)
            ]
        for name, runs in rows.items():
            t = median(runs)
            figures = {"files_s": len(study.files) / t, "mb_s": study.size / t / 1e6,
                       "vs_direct": median([d / r for d, r in zip(rows[DIRECT], runs, strict=True)])}
            if STUNNEL in rows:
                figures["vs_stunnel"] = median([s / r for s, r in zip(rows[STUNNEL], runs, strict=True)])
            for figure, cpu in (("path_ms_mb", path_cpu), ("tunnels_ms_mb", tunnel_cpu)):
                if (study.name, name) in cpu:
                    figures[figure] = median(cpu[(study.name, name)])
            section.add(f"{study.name}, {name}", **figures)
        for name, reason in missing.items():
            if reason:
                section.unavailable(f"{study.name}, {name}", reason)
        floor = [direct + 2 * one for direct, one in zip(path_cpu[(study.name, DIRECT)], md5, strict=True)]
        section.add(f"{study.name}, {FLOOR}", path_ms_mb=median(floor))
    for pair in pairs:
        pair.stop()
    for serve in serves.values():
        serve.close()
    section.notes.append(
        f"Median of {rounds} storescu runs per row, all paths in turn within each round; the time includes"
        " starting storescu and the association. '÷ direct' and '÷ stunnel' are each run's rate over the"
        " direct run's and the stunnel pair's of the same round. DCMTK's default PDU size (16 KiB)"
        " everywhere, TCP_NODELAY=1 for every DCMTK process. The 'less Python start-up' rows subtract,"
        " round by round, the time of `python3 -m iscl_hsm store --help` (starting Python and importing"
        " pynetdicom), which DCMTK's storescu barely pays."
    )
    section.notes.append(
        "CPU per MB (10^6 bytes of study files): 'path' is storescu, storescp and both tunnels (user plus"
        " system time, from getrusage and each process's CPU clock), 'tunnels'' is the two tunnel processes alone."
        f" The floor row is, round by round, the direct path's CPU per MB plus twice the CPU per MB of"
        f" OpenSSL's MD5 through hashlib (this run: {median(md5):.2f} ms/MB): the least a pair of tunnels"
        " that checks every byte with MD5 at each end could add, before any copy, socket or interpreter."
    )
    return section
