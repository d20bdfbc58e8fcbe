"""ISCL beside TLS and plain TCP, on one machine in one run: handshakes, record-layer throughput,
throughput against message size, DICOM C-STORE with DCMTK, and N simultaneous gateway links, for the
V1.00 and the hardened wire profile side by side; the gateway pair beside a stunnel TLS 1.3 pair.

Run: python3 benchmarks/run.py [--quick] [--rounds N] [--profile v1.00|hardened|both] [--out DIR]
     (or: make bench / make bench-quick)

Writes DIR/latest.json (every figure, the machine, versions and commands), DIR/latest.md (the
tables, headed by the headline figures of each profile and the gateway beside stunnel) and DIR/latest.png (the plots; needs
matplotlib: pip install 'iscl-hsm[bench]'). Each figure is the median of --rounds runs, and each
ratio the median of per-round ratios. docs/performance.md explains what limits each figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import beside_stunnel, concurrency, dicom_store, headline, latency, report, throughput
from benchmarks.common import (
    PLACEHOLDERS,
    REPO,
    Children,
    Section,
    add_profile_option,
    log,
    make_token,
    profiles_of,
)
from benchmarks.loopback import LoopbackServers
from benchmarks.tls import make_credentials
from iscl_hsm import __version__
from iscl_hsm.allocator import keep_bulk_buffers
from iscl_hsm.dicom.study import StudySpec

SECTIONS = ("handshake", "throughput", "sizes", "dicom", "concurrency")
KIB, MIB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Sizes:
    """How long and how big: the full run (about 10 minutes on 2 cores) or --quick (1..2 minutes)."""

    rounds: int
    handshakes: int
    seconds: float
    sizes: tuple[int, ...]
    size_seconds: float
    small: StudySpec
    large: StudySpec
    counts: tuple[int, ...]
    concurrency_bytes: int


FULL = Sizes(
    rounds=5, handshakes=100, seconds=1.0, sizes=tuple(KIB << (2 * i) for i in range(9)), size_seconds=0.3,
    small=StudySpec(images=200, rows=128, columns=128), large=StudySpec(images=6, rows=2048, columns=2048),
    counts=(1, 16, 64, 256), concurrency_bytes=32 * MIB,
)  # fmt: skip
QUICK = Sizes(
    rounds=3, handshakes=20, seconds=0.3, sizes=(KIB, 16 * KIB, 256 * KIB, 4 * MIB), size_seconds=0.1,
    small=StudySpec(images=20, rows=64, columns=64), large=StudySpec(images=2, rows=1024, columns=1024),
    counts=(1, 16, 64, 256), concurrency_bytes=4 * MIB,
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and 3 rounds (1..2 minutes), for development")
    parser.add_argument("--rounds", type=int, help="runs per figure (default: 5, or 3 with --quick)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--counts", help="simultaneous links for the concurrency section (default: 1,16,64,256)")
    parser.add_argument("--no-card", action="store_true", help="leave out the virtual-card handshake (needs root)")
    add_profile_option(parser)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="folder for latest.json, latest.md and latest.png (default: %(default)s)")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _first_line(command: list[str], pattern: str = r"(\S+)") -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return "not installed"
    match = re.search(pattern, out)
    return match.group(1) if match else "unknown"


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (f"{model.group(1) if model else platform.processor()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM,"
            f" {platform.system()} {platform.release()}")


def versions() -> dict[str, str]:
    return {
        "iscl-hsm": __version__,
        "Python": platform.python_version(),
        "OpenSSL": _first_line(["openssl", "version"], r"OpenSSL (\S+)"),
        "SoftHSM2": _first_line(["softhsm2-util", "--version"]),
        "DCMTK": _first_line(["/usr/bin/storescu", "--version"], r"storescu v(\S+)"),
        "pydicom": _package("pydicom"),
        "cryptography": _package("cryptography"),
    }


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or sizes.rounds
    counts = tuple(int(n) for n in args.counts.split(",")) if args.counts else sizes.counts
    wanted = args.sections.split(",")
    profiles = profiles_of(args.profile)
    keep_bulk_buffers()  # as `iscl` does
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python3", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": describe_machine(), "load_before": _load(), "versions": versions(), "rounds": rounds,
        "profiles": [p.value for p in profiles],
    }  # fmt: skip
    sections: list[Section] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="iscl-bench-") as directory, Children() as children:
        workdir = Path(directory)
        PLACEHOLDERS[directory] = "$WORK"
        token = make_token(workdir / "token")
        credentials = make_credentials(workdir / "tls")
        if {"handshake", "throughput", "sizes"} & set(wanted):
            servers = LoopbackServers(children, token, credentials, profiles)
            if "handshake" in wanted:
                sections.append(latency.run(servers, rounds, sizes.handshakes, card=not args.no_card))
            if "throughput" in wanted:
                sections.append(throughput.run_suites(servers, rounds, sizes.seconds))
            if "sizes" in wanted:
                sections.append(throughput.run_sizes(servers, rounds, sizes.size_seconds, sizes.sizes))
        if "dicom" in wanted:
            sections.append(dicom_store.run(children, token, credentials, workdir, rounds, sizes.small,
                                            sizes.large, profiles))
        if "concurrency" in wanted:
            sections.append(concurrency.run(children, token, credentials, workdir, rounds, counts,
                                            sizes.concurrency_bytes, profiles))
    summaries = [headline.summarize(sections, profiles), beside_stunnel.summarize(sections, profiles)]
    sections[:0] = [summary for summary in summaries if summary is not None]
    meta["load_after"] = _load()
    meta["seconds"] = round(time.monotonic() - started, 1)
    written = report.write(args.out, meta, sections)
    print(report.markdown(meta, sections))
    log(f"wrote {', '.join(map(str, written))} in {meta['seconds']:.0f} s")
    if importlib.util.find_spec("matplotlib") is None:
        log("no plot: matplotlib is not installed (pip install 'iscl-hsm[bench]', or make bench)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
