"""The key-management audit log: a hash chain that catches edited, removed and reordered lines."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import pytest

from iscl_hsm.keys.audit import GENESIS, AuditError, AuditLog, entry_hash, verify


def _log(tmp_path: Path, count: int = 5) -> tuple[Path, list[dict[str, object]]]:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    entries = [
        log.append(
            officer="Alice",
            token="hospital-a",
            serial="0011",
            action="generate",
            purpose="auth",
            index=n,
            version=1,
            kcv="ABCDEF",
            result="ok",
        )
        for n in range(1, count + 1)
    ]
    return path, entries


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_entries_are_chained_from_the_genesis(tmp_path: Path) -> None:
    path, entries = _log(tmp_path)
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(entries):
        assert after["prev"] == before["hash"]
    for entry in entries:
        assert entry_hash(entry) == entry["hash"]
        assert set(entry) >= {
            "time",
            "officer",
            "token",
            "serial",
            "action",
            "purpose",
            "index",
            "version",
            "kcv",
            "result",
        }
    report = verify(path)
    assert (report.entries, report.head) == (5, entries[-1]["hash"])
    assert path.stat().st_mode & 0o777 == 0o600
    assert verify(path, head=entries[2]["hash"]).entries == 5  # an older recorded head is still in the log


def test_an_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text("")
    assert verify(path).entries == 0


def test_an_edited_line_is_caught(tmp_path: Path) -> None:
    path, _ = _log(tmp_path)
    lines = _lines(path)
    lines[2] = lines[2].replace('"kcv":"ABCDEF"', '"kcv":"123456"')
    _write(path, lines)
    with pytest.raises(AuditError, match="line 3 .*entry 3.* was edited") as caught:
        verify(path)
    assert caught.value.line == 3


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path, _ = _log(tmp_path)
    lines = _lines(path)
    entry = json.loads(lines[1])
    entry["officer"] = "Mallory"
    entry["hash"] = entry_hash(entry)
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    _write(path, lines)
    with pytest.raises(AuditError, match="line 3 .*does not follow the line before it"):
        verify(path)


def test_a_removed_line_is_caught(tmp_path: Path) -> None:
    path, _ = _log(tmp_path)
    lines = _lines(path)
    _write(path, lines[:1] + lines[2:])
    with pytest.raises(
        AuditError, match="line 2 .*is entry 3 but entry 2 should come next: an entry was removed"
    ):
        verify(path)
    _write(path, lines[1:])
    with pytest.raises(AuditError, match="line 1 .*entry 1 should come next"):
        verify(path)


def test_reordered_lines_are_caught(tmp_path: Path) -> None:
    path, _ = _log(tmp_path)
    lines = _lines(path)
    _write(path, [lines[0], lines[2], lines[1], *lines[3:]])
    with pytest.raises(AuditError, match="line 2 .*comes later: lines were reordered"):
        verify(path)
    _write(path, [*lines, lines[1]])  # a line duplicated at the end
    with pytest.raises(AuditError, match="line 6 .*does not follow"):
        verify(path)


def test_a_cut_off_end_is_caught_only_against_a_recorded_head(tmp_path: Path) -> None:
    path, entries = _log(tmp_path)
    _write(path, _lines(path)[:3])
    assert verify(path).entries == 3  # a shorter chain is still a chain ...
    with pytest.raises(AuditError, match="does not contain the recorded head"):
        verify(path, head=str(entries[-1]["hash"]))  # ... which the recorded head exposes


def test_a_damaged_line_is_caught_and_appending_after_it_refuses(tmp_path: Path) -> None:
    path, _ = _log(tmp_path)
    with path.open("a") as handle:
        handle.write("garbage\n")
    with pytest.raises(AuditError, match="line 6 .*is not an audit entry"):
        verify(path)
    with pytest.raises(AuditError, match="last line .* is not an audit entry"):
        AuditLog(path).append(action="list", result="ok")


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"

    def write(n: int) -> None:
        log = AuditLog(path)
        for _ in range(20):
            log.append(action="list", token=f"t{n}", result="ok")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verify(path).entries == 80


def test_unknown_fields_and_an_unwritable_log_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown audit fields: pin"):
        AuditLog(tmp_path / "a.log").append(action="list", pin="1234")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AuditError, match="cannot open the audit log .*--audit-log"):
        AuditLog(blocker / "audit.log").append(action="list", result="ok")
    with pytest.raises(AuditError, match="cannot read the audit log"):
        verify(tmp_path / "missing.log")
