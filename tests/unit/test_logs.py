"""iscl_hsm.logs: logfmt and JSON lines that a strict reader takes apart, whatever the values hold."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscl_hsm import logs

from .. import logfmt


def record(message: str, **values: object) -> logging.LogRecord:
    made = logging.LogRecord("iscl_hsm.test", logging.WARNING, __file__, 1, message, None, None)
    for key, value in logs.fields(**values).items():
        setattr(made, key, value)
    return made


@given(st.text(), st.text())
def test_any_message_and_value_survive_a_logfmt_line(message: str, value: str) -> None:
    line = logs.LineFormatter(logs.logfmt).format(record(message, error=value, count=3))
    parsed = logfmt.parse(line)
    assert (parsed["msg"], parsed["error"], parsed["count"]) == (message, value, "3")
    assert parsed["level"] == "warning" and parsed["logger"] == "iscl_hsm.test"
    assert "\n" not in line


def test_values_are_quoted_only_when_they_must_be() -> None:
    line = logs.logfmt({"result": "closed", "error": 'a "b" = c', "empty": "", "from": "127.0.0.1:5"})
    assert line == 'result=closed error="a \\"b\\" = c" empty="" from=127.0.0.1:5'


def test_json_lines_have_the_same_keys_and_keep_numbers() -> None:
    made = record("link", result="aborted", plain_to_iscl=12)
    as_json = json.loads(logs.LineFormatter(logs.json_line).format(made))
    as_logfmt = logfmt.parse(logs.LineFormatter(logs.logfmt).format(made))
    assert as_json.keys() == as_logfmt.keys()
    assert as_json["plain_to_iscl"] == 12 and as_json["result"] == "aborted"


def test_an_exception_stays_on_its_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, __import__("sys").exc_info())
    parsed = logfmt.parse(logs.LineFormatter(logs.logfmt).format(made))
    assert "ValueError: boom" in parsed["exception"]


@contextlib.contextmanager
def bare_root() -> Iterator[logging.Logger]:
    """The root logger without pytest's handlers (which it adds as each test runs), restored afterwards."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    for handler in saved:
        root.removeHandler(handler)
    try:
        yield root
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


def test_configure_writes_its_format_and_add_fields_tags_every_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with bare_root():
        write_lines()
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line) | {"time": None} == {
        "time": None, "level": "info", "logger": "iscl_hsm.test", "msg": "hello", "worker": 2, "peer": "a"
    }


def write_lines() -> None:
    logs.configure(logging.INFO, "json")
    logs.configure(logging.INFO, "json")  # again: still one handler
    logs.add_fields(worker=2)
    logging.getLogger("iscl_hsm.test").info("hello", extra=logs.fields(peer="a"))
    logging.getLogger("iscl_hsm.test").debug("not shown")


def test_configure_leaves_someone_elses_handlers_alone() -> None:
    theirs = logging.StreamHandler(io.StringIO())
    with bare_root() as root:
        root.addHandler(theirs)
        logs.configure(logging.DEBUG, "json")
        assert root.handlers == [theirs]
