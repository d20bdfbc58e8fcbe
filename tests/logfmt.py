"""A strict logfmt reader for the tests: it takes a line apart without the code that wrote it, so a line
the project writes that is not valid logfmt fails the test that reads it."""

from __future__ import annotations

import json
import re

_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^\s"=]*)(?: |$)')


def parse(line: str) -> dict[str, str]:
    """The key/value pairs of one logfmt line, in order; AssertionError if it is not logfmt."""
    values: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = _PAIR.match(line, position)
        assert match, f"not logfmt at character {position}: {line!r}"
        key, value = match.groups()
        assert key not in values, f"key {key!r} twice in {line!r}"
        values[key] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return values
