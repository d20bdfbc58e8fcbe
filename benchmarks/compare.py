"""Old code against new, interleaved: one suite's loopback rate and each end's CPU per MiB.

Run: python3 benchmarks/compare.py REV [--profile v1.00|hardened] [--suite des-cbc/md5]
        [--transport blocking|asyncio] [--rounds 6] [--seconds 2] [--size BYTES]

REV (a commit, branch or tag) is checked out into a temporary git worktree; the working tree is the
new code. Every round measures both, in alternating order, each in a fresh process that imports its
own tree's iscl_hsm and talks to a server process of the same tree over loopback (one link per
measurement, both ends on the SoftHSM2 token this script makes). On a shared
machine a rate moves by 5-20% from one minute to the next; CPU per MiB moves much less, and
interleaving puts the same noise on both sides. Judge a change by both (docs/performance.md).

Both trees speak --profile (V1.00's none/md5 is the SDK's plain MD5, allowed knowingly). A revision
from before the wire profiles has no Config.profile: it speaks its only wire, the hardened one, and
the output says so; with --profile v1.00 that compares V1.00 in the working tree against the old wire.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SUITES = ("none/none", "none/md5", "none/des-mac", "des-cbc/md5", "des-cbc/des-mac")
"""As benchmarks/common.py names them (not imported: this file also runs against old trees)."""
PROFILES = ("v1.00", "hardened")
WIRE_BEFORE_PROFILES = "hardened"
"""The wire of every revision from before Config.profile existed."""
TOKEN_LABEL = "compare"
_MEASURE = "--measure-in"
"""First argument of the measuring process (internal)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the old code: a commit, branch or tag of this repository")
    parser.add_argument("--suite", default="des-cbc/md5", choices=list(SUITES), help="encryption/MAC")
    parser.add_argument("--profile", default=PROFILES[0], choices=PROFILES,
                        help="wire profile of both trees (default: %(default)s; a revision without profiles"
                        f" speaks {WIRE_BEFORE_PROFILES})")
    parser.add_argument("--rounds", type=int, default=6, help="measurements of each tree (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (default: %(default)s)")
    parser.add_argument("--size", type=int, default=1 << 20, help="message size in bytes (default: 1 MiB)")
    parser.add_argument("--transport", choices=("blocking", "asyncio"), default="blocking",
                        help="both ends' transport (default: %(default)s)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from benchmarks.common import make_token  # (the new tree's; measurements import their own)

    with tempfile.TemporaryDirectory(prefix="iscl-compare-") as work, checked_out(args.rev, Path(work)) as old:
        token = make_token(Path(work) / "token")
        trees = {"old": old, "new": REPO}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        wires: dict[str, str | None] = {}
        print(f"# {args.suite}, {args.profile} profile, {args.transport} transport, {args.size} B messages,"
              f" {args.rounds} rounds of {args.seconds:g} s; old = {args.rev}, new = the working tree")
        for round_ in range(args.rounds):
            for name in alternating(trees, round_):
                figures, wires[name] = _measure(trees[name], token.environment, token.label, token.pin, args)
                results[name].append(figures)
                print(f"round {round_ + 1} {name}: {figures['rate'] / 1e6:.1f} MB/s, sender"
                      f" {figures['sender']:.2f} ms/MiB, receiver {figures['receiver']:.2f} ms/MiB", flush=True)
    _summary(results)
    print(_wire_line(wires, args.rev))


@contextlib.contextmanager
def checked_out(rev: str, folder: Path) -> Iterator[Path]:
    """``rev`` checked out into a temporary git worktree in ``folder`` (removed again on the way out)."""
    tree = folder / "old"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def alternating(names: Iterable[str], round_: int) -> list[str]:
    """``names`` in order on even rounds and reversed on odd ones, so neither side always goes first."""
    ordered = list(names)
    return ordered if round_ % 2 == 0 else ordered[::-1]


def _wire_line(wires: dict[str, str | None], rev: str) -> str:
    """Which wire each tree spoke (None: an old tree without profiles, which the line explains)."""
    old = wires["old"] or (f"{WIRE_BEFORE_PROFILES} ({rev} has no Config.profile: its only wire is the"
                           f" {WIRE_BEFORE_PROFILES} one)")
    return f"wire profile: old {old}, new {wires['new']}"


def _measure(tree: Path, environment: dict[str, str], label: str, pin: str, args: argparse.Namespace
             ) -> tuple[dict[str, float], str | None]:
    """One measurement in a fresh process that imports iscl_hsm from ``tree`` only; its figures and the
    wire profile it spoke (None: the tree has no profiles)."""
    command = [sys.executable, __file__, _MEASURE, str(tree), label, args.suite, str(args.seconds), str(args.size),
               args.transport, args.profile]
    env = {**environment, "PYTHONPATH": str(tree), "ISCL_PIN": pin}  # (not in argv, where `ps` shows it)
    out = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the measurement in {tree} failed:\n{out.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if not figures.pop("module").startswith(str(tree)):
        raise RuntimeError(f"the measurement in {tree} imported iscl_hsm from elsewhere")
    wire: str | None = figures.pop("wire")
    return figures, wire


def _summary(results: dict[str, list[dict[str, float]]]) -> None:
    ratios = [new["rate"] / old["rate"] for old, new in zip(results["old"], results["new"], strict=True)]
    print("\n| code | MB/s (median) | sender CPU ms/MiB | receiver CPU ms/MiB |\n|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r['rate'] for r in rows) / 1e6:.1f} |"
              f" {statistics.median(r['sender'] for r in rows):.2f} | {statistics.median(r['receiver'] for r in rows):.2f} |")
    print(f"\nnew ÷ old rate, round by round: {' '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")


# --- the measuring process (runs with the tree under test first on sys.path) -------------------------


def _serve(listener: Any, label: str, pin: str, suite: str, size: int, transport: str, profile: str) -> None:
    """Server process: accept one link and read every message until the line is disconnected.

    Like the measuring process, it imports iscl_hsm from the tree under test (first on sys.path).
    """
    import asyncio

    from iscl_hsm.allocator import keep_bulk_buffers
    from iscl_hsm.engine import Config, Role
    from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
    from iscl_hsm.transport import aio
    from iscl_hsm.transport.blocking import IsclSocket

    keep_bulk_buffers()  # as `iscl` does, and as the measuring process does
    sock, _ = listener.accept()
    holder, config = Pkcs11KeyHolder(label, pin), _config(Config, suite, size, profile)
    if transport == "blocking":
        link = IsclSocket.accept(sock, key_holder=holder, config=config)
        while link.recv() is not None:
            pass
        return

    async def read_all() -> None:
        stream = await aio.handshake_on(sock, Role.SERVER, key_holder=holder, config=config)
        while await stream.recv() is not None:
            pass

    asyncio.run(read_all())


def _config(config_type: Any, suite: str, size: int, profile: str) -> Any:
    """The tree's Config for ``suite`` ("des-cbc/md5") in ``profile``, taking messages of ``size`` bytes.

    Only the settings the tree's Config knows are given: a tree from before the profiles has no
    ``profile`` (it speaks hardened) and no ``allow_unkeyed_md5``. V1.00's plain MD5 is allowed when the
    tree's Config says the suite sends it (``sends_unkeyed_md5``).
    """
    import dataclasses

    from iscl_hsm.cli.options import ENCRYPTIONS, MACS  # the names `iscl --encryption/--mac` take

    encryption, mac = suite.split("/")
    settings: dict[str, Any] = {"encryption": ENCRYPTIONS[encryption], "mac": MACS[mac],
                                "max_message": max(1 << 20, size)}
    known = {f.name for f in dataclasses.fields(config_type)}
    if "profile" in known:
        settings["profile"] = profile  # (Config takes the value: "v1.00", "hardened")
    if "allow_unkeyed_md5" in known:
        settings["allow_unkeyed_md5"] = config_type(**settings, allow_unkeyed_md5=True).sends_unkeyed_md5
    return config_type(**settings)


def _wire(config: Any) -> str | None:
    """The wire profile ``config`` speaks ("v1.00"), or None for a tree from before the profiles."""
    profile = getattr(config, "profile", None)
    return None if profile is None else str(profile.value)


def _measure_here() -> None:
    import asyncio
    import multiprocessing
    import socket

    import iscl_hsm
    from iscl_hsm.allocator import keep_bulk_buffers
    from iscl_hsm.engine import Config
    from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
    from iscl_hsm.transport import aio
    from iscl_hsm.transport.blocking import IsclSocket

    _tree, label, suite, seconds, size_text, transport, profile = sys.argv[2:9]
    pin, size = os.environ["ISCL_PIN"], int(size_text)
    keep_bulk_buffers()
    listener = socket.create_server(("127.0.0.1", 0))
    server = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(listener, label, pin, suite, size, transport, profile), daemon=True
    )
    server.start()
    assert server.pid is not None
    server_pid = server.pid
    address, holder = listener.getsockname(), Pkcs11KeyHolder(label, pin)
    config = _config(Config, suite, size, profile)
    payload = os.urandom(size)

    async def transfer() -> dict[str, float]:
        """Send for ``seconds`` after a warm-up; the same loop for both transports."""
        if transport == "blocking":
            link = IsclSocket.connect(*address, key_holder=holder, config=config)

            async def send(data: bytes) -> None:
                link.send(data)

            async def close() -> None:
                link.close()
        else:
            stream = await aio.open_connection(*address, key_holder=holder, config=config)
            send, close = stream.send, stream.close
        warm_up = time.perf_counter() + 0.3  # fresh processes first fault in their buffers and caches
        while time.perf_counter() < warm_up:
            await send(payload)
        own, theirs, started = _own_cpu(), _cpu(server_pid), time.perf_counter()
        sent = 0
        while not sent or time.perf_counter() - started < float(seconds):
            await send(payload)
            sent += len(payload)
        await close()  # returns once the server has verified every message
        elapsed = time.perf_counter() - started
        mib = sent / (1 << 20)
        return {"rate": sent / elapsed, "sender": (_own_cpu() - own) / mib * 1000,
                "receiver": (_cpu(server_pid) - theirs) / mib * 1000}

    figures = asyncio.run(transfer())
    server.join(10)
    print(json.dumps({**figures, "module": iscl_hsm.__file__, "wire": _wire(config)}))


# The two below repeat benchmarks/common.py's CPU reading on purpose: the measuring process imports
# nothing from the benchmarks package, whose old versions lack it.


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    if sys.argv[1:2] == [_MEASURE]:
        _measure_here()
    else:
        main()
