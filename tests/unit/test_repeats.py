"""Repeated failures of one peer are counted, not logged a line each."""

from __future__ import annotations

from iscl_hsm.errors import ErrorCode, IsclError
from iscl_hsm.repeats import RepeatFilter, failure_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_first_failure_in_each_window_is_shown_with_the_count_of_those_hidden_before_it() -> None:
    clock = Clock()
    repeats = RepeatFilter(window=60.0, clock=clock)
    assert repeats.admit("10.0.0.1 120") == 0
    assert [repeats.admit("10.0.0.1 120") for _ in range(5)] == [None] * 5
    clock.now += 59.9
    assert repeats.admit("10.0.0.1 120") is None
    clock.now += 0.2
    assert repeats.admit("10.0.0.1 120") == 6
    assert repeats.admit("10.0.0.1 120") is None


def test_other_peers_and_other_failures_are_shown_at_once() -> None:
    repeats = RepeatFilter(window=60.0, clock=Clock())
    assert repeats.admit("10.0.0.1 120") == 0
    assert repeats.admit("10.0.0.2 120") == 0
    assert repeats.admit("10.0.0.1 104") == 0


def test_peers_quiet_for_a_window_are_forgotten() -> None:
    clock = Clock()
    repeats = RepeatFilter(window=60.0, clock=clock)
    for n in range(100):
        repeats.admit(f"10.0.{n}.1 120")
    clock.now += 61
    repeats.admit("10.9.9.9 120")
    assert len(repeats._shown) == 1  # only the peer just seen is remembered


def test_a_failure_key_names_the_host_and_the_error() -> None:
    assert failure_key("10.0.0.1", IsclError(ErrorCode.BAD_MAC, "x")) == "10.0.0.1 BAD_MAC"
    assert failure_key("10.0.0.1", ConnectionResetError()) == "10.0.0.1 ConnectionResetError"
