"""What a command may not print: a traceback or an asyncio complaint, i.e. an error that escaped its own
handling (every expected failure is one line)."""

from __future__ import annotations

STRAY = ("Traceback", "never retrieved", "CancelledError", "Exception ignored", "Exception in callback")
"""Words that mean something escaped the command's own error handling."""


def strays(lines: list[str]) -> list[str]:
    """The lines that show something escaped the command's error handling."""
    return [line for line in lines if any(word in line for word in STRAY)]
