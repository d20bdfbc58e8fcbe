"""The ceremony's files (iscl_hsm.cli.ceremony, iscl_hsm.keys.forms); the screen and prompts are
tested on a real terminal in tests/integration/test_keys_secret_components.py."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from iscl_hsm.cli.ceremony import read_secret_file, write_new_files
from iscl_hsm.errors import KeyHolderError
from iscl_hsm.keys.components import ALGORITHMS, parse_component, split
from iscl_hsm.keys.forms import component_form, form_name


@pytest.mark.parametrize("algorithm", ["des", "des3", "aes256"])
def test_a_form_reads_back_as_its_component(tmp_path: Path, algorithm: str) -> None:
    chosen = ALGORITHMS[algorithm]
    _, components = split(chosen, 3)
    text = component_form(
        token="hospital-a", serial=None, key="iscl-enc-2", algorithm=chosen, number=3, count=3,
        component=components[2], date=datetime.date(2026, 12, 6),
    )  # fmt: skip
    path = tmp_path / form_name("iscl-enc-2", 3, 3)
    path.write_text(text)
    assert path.name == "iscl-enc-2-component-3-of-3.txt"
    assert parse_component(read_secret_file(path, "component 3"), chosen, 3) == (components[2], "")
    assert "# Site:            token 'hospital-a'\n" in text and "# Component:       3 of 3\n" in text
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        " ".join(components[2].hex().upper()[i : i + 4] for i in range(0, 2 * chosen.length, 4))
    ]


def test_secret_files_are_written_all_or_none(tmp_path: Path) -> None:
    first, second = tmp_path / "form-1", tmp_path / "missing" / "form-2"
    with pytest.raises(KeyHolderError, match=r"cannot write the component form .*form-2: No such file.*none"):
        write_new_files({first: "one\n", second: "two\n"}, "component form")
    assert not first.exists()  # the form written before the failure is gone again
    second = tmp_path / "form-2"
    second.write_text("kept\n")
    with pytest.raises(KeyHolderError, match=r"the component form .*form-2 exists already; name a new file"):
        write_new_files({first: "one\n", second: "two\n"}, "component form")
    assert not first.exists() and second.read_text() == "kept\n"
    write_new_files({first: "one\n"}, "component form")
    assert first.read_text() == "one\n" and first.stat().st_mode & 0o777 == 0o600
