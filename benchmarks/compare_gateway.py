"""Old gateway code against new, interleaved: DCMTK storescu -> storescp through an `iscl tunnel` pair
of each tree and through a stunnel TLS 1.3 pair, for small objects and a large study.

Run: python3 benchmarks/compare_gateway.py REV [--profile v1.00|hardened] [--suite none/md5]
        [--rounds 8] [--small 200] [--large 6]

REV (a commit, branch or tag) is checked out into a temporary git worktree and its tunnels run on its
own iscl_hsm; the working tree is the new code (REV needs the tunnel options of today). Every round
sends each study through the three pairs in turn, in alternating order, to one storescp. Printed:
each pair's rate and the CPU its two tunnel processes used per MB (medians), and new ÷ old and
each ÷ stunnel round by round. On a shared machine a rate moves by 5-20% from one minute to the
next: judge a change by the round-by-round ratios and the CPU per MB together (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, Children, CpuMeter, add_profile_option, make_token, suite_label
from benchmarks.compare import alternating, checked_out
from benchmarks.dicom_store import StoreScp, Study, make_studies, timed_store
from benchmarks.gateway_pair import GatewayPair
from benchmarks.stunnel_pair import StunnelPair
from benchmarks.tls import make_credentials
from iscl_hsm.dicom.study import StudySpec
from iscl_hsm.engine import Profile

PAIRS = ("old", "new", "stunnel")
RATIOS = (("new", "old"), ("new", "stunnel"), ("old", "stunnel"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the old code: a commit, branch or tag of this repository")
    parser.add_argument("--suite", default="none/md5", choices=["none/md5", "none/des-mac", "des-cbc/md5",
                                                                "des-cbc/des-mac"], help="(default: %(default)s)")
    add_profile_option(parser, default=Profile.HARDENED.value)
    parser.add_argument("--rounds", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--small", type=int, default=200, help="objects of 32 KiB in the small study (default: 200)")
    parser.add_argument("--large", type=int, default=6, help="objects of 8 MiB in the large study (default: 6)")
    args = parser.parse_args()
    if args.profile == "both":
        parser.error("--profile: choose v1.00 or hardened")
    if min(args.rounds, args.small, args.large) < 1:
        parser.error("--rounds, --small and --large must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    profile = Profile(args.profile)
    # (study name, pair) -> per round: (bytes per second, tunnels' CPU ms per MB)
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with (tempfile.TemporaryDirectory(prefix="iscl-compare-gateway-") as work, checked_out(args.rev, Path(work)) as old,
          Children() as children):  # fmt: skip
        workdir = Path(work)
        token = make_token(workdir / "token")
        studies = make_studies(workdir / "studies", StudySpec(images=args.small, rows=128, columns=128),
                               StudySpec(images=args.large, rows=2048, columns=2048))
        storescp = StoreScp(children, None, workdir / "logs")
        pairs = {name: GatewayPair(children, token, profile, args.suite, storescp.port, workdir / "logs" / name, tree)
                 for name, tree in (("old", old), ("new", REPO))}
        stunnel = StunnelPair(children, make_credentials(workdir / "tls"), storescp.port, workdir / "logs" / "stunnel")
        print(f"# {suite_label(profile, args.suite)} through a tunnel pair of each tree, beside a stunnel pair;"
              f" {args.rounds} rounds; old = {args.rev}, new = the working tree\n", flush=True)
        for round_ in range(args.rounds):
            for study in studies:
                for name in alternating(PAIRS, round_):
                    pair = stunnel if name == "stunnel" else pairs[name]
                    with CpuMeter(pair.pids, own=False) as tunnels:
                        seconds = timed_store(pair.port, study)
                    runs.setdefault((study.name, name), []).append(
                        (study.size / seconds, tunnels.seconds / study.size * 1e9))
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        print_summary(studies, runs)  # (while the study files, which it counts, are there)


def print_summary(studies: list[Study], runs: dict[tuple[str, str], list[tuple[float, float]]]) -> None:
    for study in studies:
        print(f"## {study.name}\n\n| pair | MB/s | files/s | tunnels' CPU ms/MB |\n|---|---|---|---|")
        for name in PAIRS:
            rate = statistics.median(r for r, _ in runs[(study.name, name)])
            cpu = statistics.median(c for _, c in runs[(study.name, name)])
            print(f"| {name} | {rate / 1e6:.1f} | {rate / study.size * len(study.files):.0f} | {cpu:.2f} |")
        print()
        for top, bottom in RATIOS:
            ratios = [t / b for (t, _), (b, _) in zip(runs[(study.name, top)], runs[(study.name, bottom)], strict=True)]
            print(f"{top} ÷ {bottom}, round by round: {' '.join(f'{r:.2f}' for r in ratios)};"
                  f" median {statistics.median(ratios):.3f}")
        print()


if __name__ == "__main__":
    main()
