"""The benchmark producer itself (benchmarks/run.py): a --quick run on tiny sizes, one round, of both
wire profiles; and benchmarks/compare.py.

No timing is asserted: only that every section is there, that every row was measured in each
profile (the real SoftHSM2, DCMTK, pcscd + vpcd and the gateway are all required), that every figure
is a positive number and every ratio is taken against the row it names, and that bad options are
refused with their message.
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
SECTIONS = ["headline", "stunnel", "handshake", "throughput", "sizes", "dicom", "concurrency"]
PROFILES = ["v1.00", "hardened"]
SUITES = ("none/md5", "none/des-mac", "des-cbc/md5", "des-cbc/des-mac")
PLAIN_MD5 = "(the SDK's plain MD5, unkeyed)"
STUNNEL = "stunnel TLS 1.3 pair (stunnel4, mutual, RSA 2048)"
FLOOR = "floor of a pair checking MD5 at both ends (DCMTK's own CPU + OpenSSL MD5 twice)"
HEADLINE = {  # headline row: (section, row label with {profile}, figure)
    "handshake on SoftHSM2 (des-cbc/des-mac), median ms": (
        "handshake", "ISCL {profile}, SoftHSM2 token (des-cbc/des-mac)", "median_ms"),
    "handshake ÷ Python TLS 1.3 mutual handshake": (
        "handshake", "ISCL {profile}, SoftHSM2 token (des-cbc/des-mac)", "vs_tls"),
    "des-cbc/des-mac, MB/s": ("throughput", "ISCL {profile} des-cbc/des-mac", "mb_s"),
    "des-cbc/des-mac ÷ openssl speed des-cbc": ("throughput", "ISCL {profile} des-cbc/des-mac", "vs_des"),
    "des-cbc/md5, MB/s": ("throughput", "ISCL {profile} des-cbc/md5", "mb_s"),
    "des-cbc/md5 ÷ openssl speed des-cbc": ("throughput", "ISCL {profile} des-cbc/md5", "vs_des"),
    "none/md5, MB/s": ("throughput", "ISCL {profile} none/md5", "mb_s"),
    "none/md5 ÷ openssl speed md5": ("throughput", "ISCL {profile} none/md5", "vs_md5"),
}


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


def sections_of(out: Path) -> dict[str, dict[str, Any]]:
    return {section["key"]: section for section in json.loads((out / "latest.json").read_text())["sections"]}


def row_of(section: dict[str, Any], label: str) -> dict[str, float]:
    """The figures of the one row of ``section`` whose label is ``label``, or of the V1.00 none/md5 row
    that ``label`` names without its plain-MD5 note."""
    rows = [row for row in section["rows"] if row["label"] in (label, f"{label} {PLAIN_MD5}")]
    assert len(rows) == 1, (label, [row["label"] for row in section["rows"]])
    return figures_of(rows[0])


def assert_positive(label: str, figures: dict[str, float]) -> None:
    for name, value in figures.items():
        assert isinstance(value, float | int) and math.isfinite(value) and value > 0, (label, name, value)


def test_every_section_and_figure(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_run
    results = json.loads((out / "latest.json").read_text())
    assert [section["key"] for section in results["sections"]] == SECTIONS
    meta = results["meta"]
    assert meta["rounds"] == 1
    assert meta["profiles"] == PROFILES
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
            assert_positive(row["label"], figures)


@pytest.mark.parametrize("profile", PROFILES)
def test_rows_compare_like_with_like(quick_run: tuple[Path, subprocess.CompletedProcess[str]], profile: str
                                     ) -> None:
    """Every ISCL row is there once per profile, beside the same references."""
    out, _ = quick_run
    sections = sections_of(out)
    labels = {key: [row["label"] for row in section["rows"]] for key, section in sections.items()}
    handshake = row_of(sections["handshake"], f"ISCL {profile}, SoftHSM2 token (des-cbc/des-mac)")
    assert set(handshake) == {"median_ms", "p99_ms", "per_s", "vs_tls"}
    card = [label for label in labels["handshake"] if label.startswith(f"ISCL {profile}, virtual IC card")]
    assert len(card) == 1
    assert ("session keys" in card[0]) == (profile == "v1.00")  # a card gives no key out: V1.00 needs session keys
    for suite in ("none/none", *SUITES):
        assert set(row_of(sections["throughput"], f"ISCL {profile} {suite}")) == {
            "mb_s", "vs_tcp", "vs_tls", "vs_des", "vs_md5"}
    for suite in SUITES:
        gateway = [label for label in labels["dicom"] if f"ISCL gateway {profile} {suite}" in label]
        assert [label.split(",")[0] for label in gateway] == ["small: 20 x 64x64 CT (8 KiB each)",
                                                             "large: 2 x 1024x1024 CT (2048 KiB each)"]
    pynetdicom = f"iscl store -> iscl serve (pynetdicom, {profile} des-cbc/des-mac)"
    assert sum(label.endswith(pynetdicom) for label in labels["dicom"]) == 2
    assert sum(label.endswith(f"{pynetdicom}, less Python start-up") for label in labels["dicom"]) == 2
    assert f"N=16, ISCL gateway {profile}" in labels["concurrency"]
    assert len(sections["sizes"]["series"][f"ISCL {profile} des-cbc/des-mac"]["x"]) == 4  # the --quick sizes


def test_references_are_shared_by_both_profiles(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_run
    sections = sections_of(out)
    labels = {key: [row["label"] for row in section["rows"]] for key, section in sections.items()}
    assert {"plain TCP", "TLS 1.3", "openssl des-cbc", "openssl md5"} <= set(labels["throughput"])
    assert sum("TLS 1.3, mutual" in label for label in labels["handshake"]) == 1
    assert sum("DCMTK TLS" in label for label in labels["dicom"]) == 2
    assert labels["concurrency"] == ["N=16, ISCL gateway v1.00", "N=16, ISCL gateway hardened",
                                     "N=16, stunnel TLS 1.3 pair", "N=16, plain TCP (no gateway)"]
    assert row_of(sections["concurrency"], "N=16, stunnel TLS 1.3 pair")["all_up_vs_stunnel"] == pytest.approx(1.0)
    for study in ("small: 20 x 64x64 CT (8 KiB each)", "large: 2 x 1024x1024 CT (2048 KiB each)"):
        stunnel = row_of(sections["dicom"], f"{study}, {STUNNEL}")
        assert stunnel["vs_stunnel"] == pytest.approx(1.0)
        assert set(stunnel) == {"files_s", "mb_s", "vs_direct", "vs_stunnel", "path_ms_mb", "tunnels_ms_mb"}
        assert set(row_of(sections["dicom"], f"{study}, {FLOOR}")) == {"path_ms_mb"}
    # a ratio to itself is 1 whatever the speed: proves the ratios are taken against the named column
    assert row_of(sections["throughput"], "plain TCP")["vs_tcp"] == pytest.approx(1.0)
    assert row_of(sections["throughput"], "openssl des-cbc")["vs_des"] == pytest.approx(1.0)
    assert row_of(sections["handshake"], "Python ssl TLS 1.3, mutual (client and server certificates, RSA 2048)"
                  )["vs_tls"] == pytest.approx(1.0)


def test_only_v100_none_md5_is_the_plain_md5(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """V1.00's none/md5 runs as the SDK's unkeyed MD5 (allowed knowingly) and every table says so."""
    out, _ = quick_run
    sections = sections_of(out)
    marked = [row["label"] for key in ("throughput", "sizes", "dicom") for row in sections[key]["rows"]
              if PLAIN_MD5 in row["label"]]
    assert marked == ["ISCL v1.00 none/md5 " + PLAIN_MD5, "ISCL v1.00 none/md5 " + PLAIN_MD5,
                      "small: 20 x 64x64 CT (8 KiB each), ISCL gateway v1.00 none/md5 " + PLAIN_MD5,
                      "large: 2 x 1024x1024 CT (2048 KiB each), ISCL gateway v1.00 none/md5 " + PLAIN_MD5]
    tunnels = [command for command in sections["dicom"]["commands"] if "iscl_hsm tunnel" in command]
    unkeyed = [command for command in tunnels if "--allow-unkeyed-md5" in command]
    assert len(tunnels) == 16 and len(unkeyed) == 2
    assert all("--profile v1.00 --encryption none --mac md5 --allow-unkeyed-md5" in command for command in unkeyed)
    assert "plain, unkeyed MD5" in " ".join(sections["headline"]["notes"])


def test_headline_puts_the_profiles_side_by_side(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """One column per profile; each figure is the one of the row it names (ratios taken in the rounds)."""
    out, result = quick_run
    sections = sections_of(out)
    headline = sections["headline"]
    assert headline["columns"] == [["v100", "v1.00"], ["hardened", "hardened"]]
    assert [row["label"] for row in headline["rows"]] == list(HEADLINE)
    for row in headline["rows"]:
        figures = figures_of(row)
        assert set(figures) == {"v100", "hardened"}, row["label"]
        assert_positive(row["label"], figures)
        section, label, figure = HEADLINE[row["label"]]
        for column, profile in (("v100", "v1.00"), ("hardened", "hardened")):
            assert figures[column] == row_of(sections[section], label.format(profile=profile))[figure]
    notes = " ".join(headline["notes"])
    tls = row_of(sections["handshake"], "Python ssl TLS 1.3, mutual (client and server certificates, RSA 2048)")
    assert f"Python ssl TLS 1.3 mutual handshake {tls['median_ms']:.2f} ms" in notes
    assert "## Headline figures, the wire profiles side by side\n\n| | v1.00 | hardened |" in result.stdout


def test_the_gateway_beside_stunnel(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """The stunnel summary repeats the DICOM and concurrency rows it names, and its ratios are theirs."""
    out, result = quick_run
    sections = sections_of(out)
    rows = {row["label"]: figures_of(row) for row in sections["stunnel"]["rows"]}
    assert list(rows) == [
        "small, hardened none/md5, files/s", "large, hardened none/md5, MB/s",
        "small, v1.00 des-cbc/des-mac, files/s", "large, v1.00 des-cbc/des-mac, MB/s",
        "small, hardened des-cbc/des-mac, files/s", "large, hardened des-cbc/des-mac, MB/s",
        "large, hardened none/md5, CPU ms per MB, whole path", "large, hardened none/md5, CPU ms per MB, the two tunnels",
        next(label for label in rows if label.startswith("large, floor of an MD5-checking pair, CPU ms per MB")),
        "large, hardened none/md5, whole path's CPU ÷ the floor",
        "N=16 links at once, v1.00 des-cbc/des-mac, ms until all are up",
        "N=16 links at once, hardened des-cbc/des-mac, ms until all are up",
    ]
    large = "large: 2 x 1024x1024 CT (2048 KiB each)"
    gateway = row_of(sections["dicom"], f"{large}, ISCL gateway hardened none/md5")
    stunnel = row_of(sections["dicom"], f"{large}, {STUNNEL}")
    assert rows["large, hardened none/md5, MB/s"] == {
        "gateway": gateway["mb_s"], "stunnel": stunnel["mb_s"], "ratio": gateway["vs_stunnel"], "target": 0.8}
    des = rows["large, hardened des-cbc/des-mac, MB/s"]
    engine = row_of(sections["throughput"], "ISCL hardened des-cbc/des-mac")["mb_s"]
    assert des["vs_engine"] == pytest.approx(des["gateway"] / engine)
    floor = row_of(sections["dicom"], f"{large}, {FLOOR}")["path_ms_mb"]
    assert rows["large, hardened none/md5, whole path's CPU ÷ the floor"]["gateway"] == pytest.approx(
        gateway["path_ms_mb"] / floor)
    all_up = rows["N=16 links at once, hardened des-cbc/des-mac, ms until all are up"]
    assert all_up["ratio"] == row_of(sections["concurrency"], "N=16, ISCL gateway hardened")["all_up_vs_stunnel"]
    assert "## The ISCL gateway beside a stunnel TLS 1.3 pair" in result.stdout
    assert any(command.startswith("stunnel4 ") or "/stunnel4 " in command
               for command in sections["dicom"]["commands"])


def test_one_profile_alone(tmp_path: Path) -> None:
    """--profile hardened: no V1.00 row anywhere, and a headline of one column."""
    out = tmp_path / "out"
    result = run_bench(tmp_path, "--quick", "--rounds", "1", "--sections", "handshake", "--no-card",
                       "--profile", "hardened", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "latest.json").read_text())
    assert results["meta"]["profiles"] == ["hardened"]
    sections = {section["key"]: section for section in results["sections"]}
    assert list(sections) == ["headline", "handshake"]
    assert [row["label"] for row in sections["handshake"]["rows"]] == [
        "ISCL hardened, SoftHSM2 token (des-cbc/des-mac)",
        "Python ssl TLS 1.3, mutual (client and server certificates, RSA 2048)", "plain TCP connect",
        "ISCL hardened, virtual IC card (pcscd + vpcd, des-cbc/des-mac)"]
    assert sections["handshake"]["rows"][-1]["unavailable"] == "left out (--no-card)"
    assert sections["headline"]["columns"] == [["hardened", "hardened"]]
    assert [row["label"] for row in sections["headline"]["rows"]] == list(HEADLINE)[:2]  # no throughput ran
    assert "plain, unkeyed MD5" not in " ".join(sections["headline"]["notes"])


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
        (["--profile", "v1.0"], "argument --profile: invalid choice: 'v1.0'"),
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


def test_a_tool_given_a_port_another_process_took_starts_again_on_another() -> None:
    """storescp and stunnel cannot listen on port 0: they race other programs for a free port."""
    from benchmarks.common import PORT_TAKEN, on_a_free_port

    ports: list[int] = []

    def taken_once(port: int) -> int:
        ports.append(port)
        if len(ports) == 1:
            raise RuntimeError(f"storescp on 127.0.0.1:{port} ended (1): E: ... {PORT_TAKEN}")
        return port

    assert on_a_free_port(taken_once) == ports[-1]
    assert len(ports) == 2

    def always_taken(port: int) -> int:
        ports.append(port)
        raise RuntimeError(PORT_TAKEN)

    ports.clear()
    with pytest.raises(RuntimeError, match=PORT_TAKEN):
        on_a_free_port(always_taken, attempts=3)
    assert len(ports) == 3

    def broken(port: int) -> int:
        ports.append(port)
        raise RuntimeError("stunnel4 ended (1): Configuration failed")

    ports.clear()
    with pytest.raises(RuntimeError, match="Configuration failed"):
        on_a_free_port(broken)
    assert len(ports) == 1  # any other failure is not retried


def run_compare(tmp_path: Path, rev: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "benchmarks/compare.py", rev, "--rounds", "1", "--seconds", "0.2", "--size", "65536",
         *options],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)}, check=False,
    )  # fmt: skip


def assert_compared(result: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    """Both trees measured, the summary table and the round-by-round ratio printed, the worktree gone."""
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    for name in ("old", "new"):
        rate, sender, receiver = (float(cell) for cell in rows[name].split("|")[2:5])
        assert rate > 0 and sender > 0 and receiver > 0
    assert "new ÷ old rate, round by round:" in result.stdout
    worktrees = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True, check=True)
    assert str(tmp_path) not in worktrees.stdout


@pytest.mark.parametrize("transport", ["blocking", "asyncio"])
def test_compare_measures_an_old_revision_beside_the_working_tree(tmp_path: Path, transport: str) -> None:
    """benchmarks/compare.py: each tree measured in its own processes, both in the profile asked for."""
    result = run_compare(tmp_path, "HEAD", "--suite", "des-cbc/des-mac", "--transport", transport,
                         "--profile", "hardened")
    assert_compared(result, tmp_path)
    assert result.stdout.startswith("# des-cbc/des-mac, hardened profile, ")
    assert result.stdout.rstrip().endswith("wire profile: old hardened, new hardened")


def test_compare_runs_a_revision_from_before_the_profiles(tmp_path: Path) -> None:
    """A revision whose Config has no profile still runs, on its only wire (hardened), and the output says
    so; the working tree speaks V1.00, here its plain MD5 (allowed knowingly, as Config demands)."""
    introduced = subprocess.run(
        ["git", "-C", str(REPO), "log", "--reverse", "--format=%H", "-S", "class Profile", "--",
         "iscl_hsm/engine/config.py"], capture_output=True, text=True, check=True,
    ).stdout.split()[0]  # fmt: skip
    before = f"{introduced}^"
    config = subprocess.run(["git", "-C", str(REPO), "show", f"{before}:iscl_hsm/engine/config.py"],
                            capture_output=True, text=True, check=True).stdout
    assert "profile" not in config  # the premise: that revision knows no profiles
    result = run_compare(tmp_path, before, "--suite", "none/md5", "--profile", "v1.00")
    assert_compared(result, tmp_path)
    assert result.stdout.rstrip().endswith(
        f"wire profile: old hardened ({before} has no Config.profile: its only wire is the hardened one),"
        " new v1.00")


def run_compare_gateway(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "benchmarks/compare_gateway.py", "HEAD", *options], cwd=REPO, capture_output=True,
        text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)}, check=False,
    )  # fmt: skip


def test_compare_gateway_measures_both_trees_tunnels_beside_stunnel(tmp_path: Path) -> None:
    """benchmarks/compare_gateway.py: a tunnel pair of each tree and a stunnel pair, both studies."""
    result = run_compare_gateway(tmp_path, "--rounds", "1", "--small", "3", "--large", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("# hardened none/md5 through a tunnel pair of each tree, beside a stunnel pair;")
    for study in ("small: 3 x 128x128 CT (32 KiB each)", "large: 1 x 2048x2048 CT (8192 KiB each)"):
        table = result.stdout.split(f"## {study}\n", 1)[1].split("\n## ", 1)[0]
        rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
        for name in ("old", "new", "stunnel"):
            assert all(float(cell) > 0 for cell in rows[name].split("|")[2:5]), rows[name]
        for ratio in ("new ÷ old", "new ÷ stunnel", "old ÷ stunnel"):
            assert f"{ratio}, round by round: " in table
    worktrees = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True, check=True)
    assert str(tmp_path) not in worktrees.stdout


def test_compare_gateway_refuses_both_profiles_at_once(tmp_path: Path) -> None:
    result = run_compare_gateway(tmp_path, "--profile", "both")
    assert result.returncode == 2
    assert "--profile: choose v1.00 or hardened" in result.stderr


def test_compare_refuses_an_unknown_profile(tmp_path: Path) -> None:
    result = run_compare(tmp_path, "HEAD", "--profile", "both")
    assert result.returncode == 2
    assert "argument --profile: invalid choice: 'both'" in result.stderr
