"""The benchmark producer itself (benchmarks/run.py): a --quick run on tiny sizes, one round.

No timing is asserted: only that every section is there, that every row was measured (the real
SoftHSM2, DCMTK, pcscd + vpcd and the gateway are all required) and that every figure is a positive
number, and that bad options are refused with their message.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ["handshake", "throughput", "sizes", "dicom", "concurrency"]


def run_bench(tmp_path: Path, *options: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "benchmarks/run.py", *options], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "TMPDIR": str(tmp_path)}, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    folder = tmp_path_factory.mktemp("bench")
    result = run_bench(folder, "--quick", "--rounds", "1", "--counts", "16", "--out", str(folder / "out"))
    if result.returncode != 0:
        pytest.fail(f"benchmarks/run.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return folder / "out", result


def figures_of(row: dict[str, Any]) -> dict[str, float]:
    assert "unavailable" not in row, f"row not measured: {row['label']}: {row['unavailable']}"
    figures: dict[str, float] = row["figures"]
    return figures


def test_every_section_and_figure(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_run
    results = json.loads((out / "latest.json").read_text())
    assert [section["key"] for section in results["sections"]] == SECTIONS
    meta = results["meta"]
    assert meta["rounds"] == 1
    assert meta["command"].startswith("python3 benchmarks/run.py --quick")
    assert {"iscl-hsm", "Python", "OpenSSL", "SoftHSM2", "DCMTK"} <= set(meta["versions"])
    assert "cores" in meta["machine"]
    for section in results["sections"]:
        assert section["rows"], f"section {section['key']} has no rows"
        columns = [key for key, _ in section["columns"]]
        for row in section["rows"]:
            figures = figures_of(row)
            assert figures, row["label"]
            assert set(figures) <= set(columns), row["label"]
            for name, value in figures.items():
                assert isinstance(value, float | int) and math.isfinite(value) and value > 0, (row["label"], name)


def test_rows_compare_like_with_like(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_run
    sections = {s["key"]: s for s in json.loads((out / "latest.json").read_text())["sections"]}
    labels = {key: [row["label"] for row in section["rows"]] for key, section in sections.items()}
    assert any("SoftHSM2" in label for label in labels["handshake"])
    assert any("virtual IC card" in label for label in labels["handshake"])
    assert any("TLS 1.3" in label for label in labels["handshake"])
    for suite in ("none/md5", "none/des-mac", "des-cbc/md5", "des-cbc/des-mac"):
        assert f"ISCL {suite}" in labels["throughput"]
        assert sum(f"ISCL gateway {suite}" in label for label in labels["dicom"]) == 2  # small and large study
    assert {"plain TCP", "TLS 1.3", "openssl des-cbc", "openssl md5"} <= set(labels["throughput"])
    assert sum("DCMTK TLS" in label for label in labels["dicom"]) == 2
    assert labels["concurrency"] == ["N=16, ISCL gateway", "N=16, plain TCP (no gateway)"]
    # a ratio to itself is 1 whatever the speed: proves the ratios are taken against the named column
    tcp = next(row for row in sections["throughput"]["rows"] if row["label"] == "plain TCP")
    assert tcp["figures"]["vs_tcp"] == pytest.approx(1.0)
    assert len(sections["sizes"]["series"]["ISCL des-cbc/des-mac"]["x"]) == 4  # the --quick sizes


def test_markdown_and_plot(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, result = quick_run
    markdown = (out / "latest.md").read_text()
    assert markdown.startswith("# iscl-hsm benchmark, ")
    for title in ("## Handshake latency", "## Record-layer throughput", "## Throughput against message size",
                  "## DICOM C-STORE", "## N simultaneous links"):
        assert title in markdown
    assert "python3 -m iscl_hsm tunnel server --listen 127.0.0.1:PORT" in markdown  # commands, placeholders
    assert markdown in result.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "latest.png").exists()
        assert "no plot: matplotlib is not installed (pip install 'iscl-hsm[bench]', or make bench)" in result.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--sections", "handshake,bogus"], ("unknown section(s) bogus; choose from handshake, throughput, sizes,"
                                            " dicom, concurrency")),
        (["--rounds", "0"], "--rounds must be at least 1"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, options: list[str], message: str) -> None:
    result = run_bench(tmp_path, *options, "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_row_that_could_not_run_says_why() -> None:
    from benchmarks.common import Section
    from benchmarks.report import markdown

    section = Section("concurrency", "N simultaneous links", [("mb_s", "aggregate MB/s"), ("p50", "p50 ms")])
    section.add("N=1, plain TCP (no gateway)", mb_s=512.0, p50=1.5)
    section.unavailable("N=1, ISCL gateway", "gateway not available (`python3 -m iscl_hsm tunnel` is missing)")
    meta = {"date": "d", "command": "c", "machine": "m", "load_before": "0", "load_after": "0", "versions": {},
            "rounds": 1}
    text = markdown(meta, [section])
    assert "| N=1, plain TCP (no gateway) | 512 | 1.50 |" in text
    assert "| N=1, ISCL gateway | not measured: gateway not available (`python3 -m iscl_hsm tunnel` is missing) |  |" in text
    assert section.to_json()["rows"][1] == {
        "label": "N=1, ISCL gateway", "unavailable": "gateway not available (`python3 -m iscl_hsm tunnel` is missing)"
    }


@pytest.mark.parametrize("transport", ["blocking", "asyncio"])
def test_compare_measures_an_old_revision_beside_the_working_tree(tmp_path: Path, transport: str) -> None:
    """benchmarks/compare.py: each tree measured in its own processes, the summary table and the
    round-by-round ratio printed, and the temporary worktree removed afterwards."""
    result = subprocess.run(
        [sys.executable, "benchmarks/compare.py", "HEAD", "--rounds", "1", "--seconds", "0.2", "--size", "65536",
         "--suite", "des-cbc/des-mac", "--transport", transport],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)}, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    for name in ("old", "new"):
        rate, sender, receiver = (float(cell) for cell in rows[name].split("|")[2:5])
        assert rate > 0 and sender > 0 and receiver > 0
    assert "new ÷ old rate, round by round:" in result.stdout
    worktrees = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True, check=True)
    assert str(tmp_path) not in worktrees.stdout
