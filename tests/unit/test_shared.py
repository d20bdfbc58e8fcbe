"""The shipped folders (SoftHSM2 templates, docs) are found in a source tree and once installed, and
`iscl docs` lists and prints the documents."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from iscl_hsm import shared
from iscl_hsm.cli.main import main
from iscl_hsm.shared import DOCS, SOFTHSM, doc_reference

REPO = Path(__file__).resolve().parents[2]


def test_a_source_tree_uses_its_own_folders() -> None:
    assert SOFTHSM.find() == REPO / "softhsm"
    assert DOCS.find() == REPO / "docs"
    assert doc_reference("gateway.md") == str(REPO / "docs" / "gateway.md")
    assert doc_reference() == str(REPO / "docs")


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No source tree; a data folder (as a wheel's install makes) at tmp_path/data."""
    monkeypatch.setattr(shared, "SOURCE_TREE", tmp_path / "site-packages")
    monkeypatch.setattr(sysconfig, "get_path", lambda name, scheme=None: str(tmp_path / "data" / str(scheme)))
    return tmp_path / "data" / sysconfig.get_preferred_scheme("user")


def test_an_installation_uses_the_data_folder(installed: Path) -> None:
    docs = installed / "share" / "doc" / "iscl-hsm"
    assert DOCS.find() is None
    assert doc_reference("gateway.md") == "docs/gateway.md in the iscl-hsm source"
    docs.mkdir(parents=True)
    (docs / "gateway.md").write_text("# The gateway\n")
    assert DOCS.find() == docs
    assert doc_reference("gateway.md") == str(docs / "gateway.md")
    assert DOCS.candidates()[0] == installed.parents[1] / "site-packages" / "docs"


def test_docs_lists_the_documents_with_their_titles(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["docs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{REPO / 'docs'}:"
    assert "  gateway           The ISCL gateway (`iscl tunnel`)" in lines
    assert len(lines) == 1 + len(list((REPO / "docs").glob("*.md")))
    assert main(["docs", "--path"]) == 0
    assert capsys.readouterr().out == f"{REPO / 'docs'}\n"


@pytest.mark.parametrize("name", ["smart-cards", "smart-cards.md"])
def test_docs_prints_one_document_or_its_path(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["docs", name]) == 0
    assert capsys.readouterr().out == (REPO / "docs" / "smart-cards.md").read_text()
    assert main(["docs", "--path", name]) == 0
    assert capsys.readouterr().out == f"{REPO / 'docs' / 'smart-cards.md'}\n"


def test_docs_names_the_documents_when_one_is_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["docs", "gatewya"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("iscl: no document 'gatewya'; the documents are: adversarial, api,") and "gateway" in err
    assert err.count("\n") == 1


def test_docs_without_docs_says_where_it_looked(installed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["docs"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("iscl: the documentation is not installed here (looked in ") and str(installed) in err
