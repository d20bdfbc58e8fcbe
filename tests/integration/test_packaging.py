"""The package as a new user gets it.

`python3 -m build` makes an sdist and a wheel that `twine check --strict` passes. The wheel, installed into
a clean virtual environment (no system site-packages, not this checkout) with only its declared core
dependencies, starts every command, says in one line which extra a DICOM command needs, and carries
LICENSE and the documentation its help texts point at. The build and the install use the package index
pip is configured with (PyPI in CI); nothing is skipped when a tool is missing: the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from iscl_hsm import __version__

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "iscl_hsm", "docs", "softhsm")
"""What the build reads: copied out, so that the build's egg-info and build/ never land in the checkout."""
EXTRA_MODULES = ("pydicom", "pynetdicom", "smartcard")
DOCS = sorted(path.name for path in (REPO / "docs").glob("*.md"))
TIMEOUT = 300.0
"""Seconds a build or an install may take: a safety net against hangs, never an assertion."""

EVERY_HELP = """
import argparse, contextlib, io, json, sys
from iscl_hsm.cli.main import build_parser, main

def commands(parser, path):
    yield path
    for sub in [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]:
        for name, child in sub.choices.items():
            yield from commands(child, [*path, name])

helps = {}
for path in commands(build_parser(), []):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*path, "--help"])
    helps[" ".join(path)] = out.getvalue()
print(json.dumps(helps))
"""


def run(args: Sequence[object], what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT, check=False,
                          stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]  # fmt: skip
    assert done.returncode == 0, f"{what} failed ({' '.join(map(str, args))}):\n{done.stdout}\n{done.stderr}"
    return done  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built from a copy of the sources."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "build", "--outdir", out, source],
        "python3 -m build (pip install build, or the test extra)")  # fmt: skip
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (path,) = dist.glob("iscl_hsm-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding the wheel and its core dependencies, and nothing of this checkout."""
    home = tmp_path_factory.mktemp("venv") / "env"
    run([sys.executable, "-m", "venv", "--without-pip", home], "python3 -m venv")
    python = home / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-input", "--disable-pip-version-check",
         "--root-user-action=ignore", wheel], "pip install of the wheel")  # fmt: skip
    return home


def user_env(home: Path) -> dict[str, str]:
    """A new user's environment: no PYTHONPATH (it would put this checkout first), no SoftHSM2 or PIN
    settings of the test session, the virtual environment's bin first on PATH."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "SOFTHSM2_CONF", "OPENSSL_CONF", "ISCL_PIN", "XDG_DATA_HOME")}  # fmt: skip
    env["PATH"] = f"{home / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def iscl(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([home / "bin" / "iscl", *args], capture_output=True, text=True, timeout=TIMEOUT,
                          check=False, env=user_env(home) | env, cwd=home, stdin=subprocess.DEVNULL)  # fmt: skip


def test_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    files = sorted(dist.iterdir())
    assert sorted(path.name for path in files) == [f"iscl_hsm-{__version__}-py3-none-any.whl",
                                                   f"iscl_hsm-{__version__}.tar.gz"]  # fmt: skip
    done = run([sys.executable, "-m", "twine", "check", "--strict", *files],
               "twine check (pip install twine, or the test extra)")  # fmt: skip
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_the_wheel_carries_license_docs_and_templates(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"iscl_hsm-{__version__}.dist-info/METADATA").decode()
        license_text = archive.read(f"iscl_hsm-{__version__}.dist-info/licenses/LICENSE")
    assert license_text == (REPO / "LICENSE").read_bytes()
    assert "Apache License\n                           Version 2.0, January 2004" in license_text.decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    data = f"iscl_hsm-{__version__}.data/data/share"
    assert {name.rpartition("/")[2] for name in names if name.startswith(f"{data}/doc/iscl-hsm/")} == set(DOCS)
    assert f"{data}/iscl-hsm/softhsm/softhsm2.conf.in" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_the_venv_is_clean(venv: Path) -> None:
    """Only the core dependencies: no extra, no system site-packages, and iscl_hsm from the wheel."""
    code = (
        "import importlib.util, json, iscl_hsm; print(json.dumps([iscl_hsm.__file__,"
        f" [m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m)]]))"
    )
    done = run([venv / "bin" / "python", "-c", code], "python in the venv", env=user_env(venv), cwd=venv)
    location, extras = json.loads(done.stdout)
    assert Path(location).is_relative_to(venv) and extras == []
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert declared == __version__


def test_version_and_help_start_from_the_wheel(venv: Path) -> None:
    done = iscl(venv, "--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"iscl-hsm {__version__} (MEDIS-ISCL V1.00)\n", "")
    done = iscl(venv, "--help")
    assert done.returncode == 0, done.stderr
    assert f"here it is in\n{venv / 'share' / 'doc' / 'iscl-hsm'}." in done.stdout


def test_every_help_starts_and_names_installed_documents(venv: Path) -> None:
    done = run([venv / "bin" / "python", "-c", EVERY_HELP], "every --help", env=user_env(venv), cwd=venv)
    helps: dict[str, str] = json.loads(done.stdout)
    assert {"demo", "server", "client", "echo", "store", "serve", "docs", "tunnel client", "tunnel server",
            "keys generate", "card emulate"} <= set(helps)  # fmt: skip
    for command, text in helps.items():
        assert text.startswith(f"usage: iscl {command}".rstrip()), text
        assert "docs/" not in text, f"iscl {command} --help names a path of the source tree"
    named = {name for text in helps.values() for name in re.findall(r"`iscl docs\s+([a-z-]+)`", text)}
    assert {"protocol", "gateway", "security-officer", "smart-cards"} <= named
    assert {f"{name}.md" for name in named} <= set(DOCS)


@pytest.mark.parametrize("args", [["echo", "127.0.0.1"], ["store", "127.0.0.1", "2761", "."], ["serve", "--output", "."]])
def test_a_dicom_command_without_the_extra_is_one_line(venv: Path, args: list[str]) -> None:
    done = iscl(venv, *args)
    advice = "needs the DICOM packages (pydicom, pynetdicom): pip install 'iscl-hsm[dicom]'"
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"iscl {args[0]}: {advice}\n")


def test_docs_prints_the_installed_documents(venv: Path) -> None:
    done = iscl(venv, "docs", "gateway")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (REPO / "docs" / "gateway.md").read_text()
    done = iscl(venv, "docs")
    assert done.returncode == 0 and done.stdout.startswith(f"{venv / 'share' / 'doc' / 'iscl-hsm'}:\n")
    assert len(done.stdout.splitlines()) == 1 + len(DOCS)


def test_demo_runs_its_links_and_leaves_dicom_out(venv: Path, tmp_path: Path) -> None:
    """The demo token is made from the SoftHSM2 templates the wheel installed; without the dicom extra
    the demo says what it left out and still succeeds."""
    done = iscl(venv, "demo", XDG_DATA_HOME=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("| ok |") == 12, done.stdout
    assert "(no DICOM transfer: it needs the DICOM packages (pydicom, pynetdicom): pip install 'iscl-hsm[dicom]')" \
        in done.stdout.splitlines()
    assert (tmp_path / "iscl-hsm" / "softhsm2.conf").is_file()
