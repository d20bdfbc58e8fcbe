"""A command whose pip extra is missing says which to install, in one line, and the others still run.

The child processes hide the extra's modules (sys.modules[name] = None makes their import fail as if
they were not installed); tests/integration/test_packaging.py checks the same from a wheel.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from iscl_hsm.cli.extras import CARD, DICOM, Extra, MissingExtraError, import_for

WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
from iscl_hsm.cli.main import main
sys.exit(main(sys.argv[2:]))
"""
DICOM_ADVICE = "needs the DICOM packages (pydicom, pynetdicom): pip install 'iscl-hsm[dicom]'"
CARD_ADVICE = "IC cards need pyscard: pip install 'iscl-hsm[card]' (it builds with swig and libpcsclite-dev)"


def iscl_without(hidden: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT, hidden, *args], check=False, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    ("hidden", "args", "line"),
    [
        ("pynetdicom", ["echo", "127.0.0.1"], f"iscl echo: {DICOM_ADVICE}"),
        ("pydicom", ["store", "127.0.0.1", "104", "."], f"iscl store: {DICOM_ADVICE}"),
        ("pynetdicom", ["serve", "--output", "."], f"iscl serve: {DICOM_ADVICE}"),
        # before any PIN is asked for (stdin is not a terminal, so a PIN prompt would fail first)
        ("smartcard", ["client", "127.0.0.1", "2761", "--card"], f"iscl client: {CARD_ADVICE}"),
        ("smartcard", ["card", "list"], f"iscl card: {CARD_ADVICE}"),
    ],
)
def test_a_missing_extra_is_one_line(hidden: str, args: list[str], line: str) -> None:
    result = iscl_without(hidden, *args)
    assert (result.returncode, result.stderr, result.stdout) == (1, line + "\n", "")


def test_other_commands_run_without_the_extras() -> None:
    result = iscl_without("pydicom,pynetdicom,smartcard", "store", "--help")
    assert result.returncode == 0, result.stderr
    assert f"This command {DICOM_ADVICE}." in result.stdout
    result = iscl_without("pydicom,pynetdicom,smartcard", "--version")
    assert result.returncode == 0 and result.stdout.startswith("iscl-hsm "), result.stderr


def test_our_own_import_errors_are_not_blamed_on_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_glue.py").write_text("import pynetdicom\nfrom pynetdicom import no_such_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="no_such_name"):
        import_for("broken_glue", DICOM)
    with pytest.raises(ModuleNotFoundError, match="iscl_hsm.no_such_module"):
        import_for("iscl_hsm.no_such_module", DICOM)


def test_a_missing_module_of_the_extra_is_blamed_on_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "card_glue.py").write_text("import smartcard.System\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "smartcard", None)
    with pytest.raises(MissingExtraError) as raised:
        import_for("card_glue", CARD)
    assert str(raised.value) == CARD_ADVICE and raised.value.extra is CARD


def test_installed() -> None:
    assert DICOM.installed() and CARD.installed()  # make test installs the extras card and dicom
    assert not Extra("x", "needs x", ("pydicom", "iscl_no_such_module")).installed()
