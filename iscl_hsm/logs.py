"""Log lines a machine can read: logfmt (``--log-format text``, the default) or JSON lines (``json``).

A record may carry structured fields (``log.info("link", extra=fields(source=..., result=...))``); both
formats write them as keys of their own after the message, so a log shipper needs no regular
expression. Values are written as given: no caller passes a key, a PIN or key material.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

FORMATS = ("text", "json")

_FIELDS = "iscl_fields"
"""The attribute of a log record that holds its structured fields (set through ``extra``)."""


def fields(**values: object) -> dict[str, Any]:
    """``extra=`` for a logging call whose record carries ``values`` as structured fields."""
    return {_FIELDS: values}


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields of a record (empty for a plain message)."""
    return dict(getattr(record, _FIELDS, {}))


def logfmt(values: Mapping[str, object]) -> str:
    """``key=value`` pairs separated by spaces; a value with a space, a quote, an ``=`` or nothing in it
    is quoted, with backslash escapes (the logfmt convention of Heroku, Go's logfmt and Loki)."""
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in values.items())


def _logfmt_value(value: object) -> str:
    text = "" if value is None else str(value)
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)  # JSON string escapes are logfmt's quoted form


class LineFormatter(logging.Formatter):
    """One line per record: time, level, logger, msg, the record's fields, and any exception, rendered
    by ``render`` (:func:`logfmt` or :func:`json_line`)."""

    def __init__(self, render: Callable[[Mapping[str, object]], str]) -> None:
        super().__init__()
        self._render = render

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        values: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        values |= record_fields(record)
        if record.exc_info:
            values["exception"] = self.formatException(record.exc_info)
        return self._render(values)


def json_line(values: Mapping[str, object]) -> str:
    """One JSON object (numbers stay numbers; anything else is written as its text)."""
    return json.dumps(values, ensure_ascii=False, default=str)


def add_fields(**values: object) -> None:
    """Add ``values`` to every record this process logs from now on (a worker's number, say)."""

    def add(record: logging.LogRecord) -> bool:
        setattr(record, _FIELDS, values | record_fields(record))
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(add)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler :func:`configure` installs (and replaces when called again)."""


def configure(level: int, log_format: str = "text") -> None:
    """Send every log record at ``level`` or above to stderr, one line each, in ``log_format``.

    Like :func:`logging.basicConfig`, it leaves a root logger that has handlers of another's alone (an
    embedding application's, or pytest's when the tests call the command line in process).
    """
    root = logging.getLogger()
    if any(not isinstance(handler, _Handler) for handler in root.handlers):
        return
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = _Handler()
    handler.setFormatter(LineFormatter(json_line if log_format == "json" else logfmt))
    root.addHandler(handler)
    root.setLevel(level)
