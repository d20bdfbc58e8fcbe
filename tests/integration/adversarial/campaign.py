"""Run the cases pytest selected a few at a time, each once, and hand each test its own result.

Most of a case is waiting (a process starting, a timeout running out), so cases run in a pool of
threads; the tests stay one per case, each asserting the oracle on its own result, in any order and
under any -k selection. The first test of a kind asks for its result and thereby starts every
selected case of that kind; later tests find theirs done or under way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import pytest

C = TypeVar("C", bound=Hashable)
R = TypeVar("R")


class Campaign(Generic[C, R]):
    """``run(case)`` for every case in ``cases``, ``workers`` at a time, started on the first request."""

    def __init__(self, run: Callable[[C], R], cases: Iterable[C], workers: int) -> None:
        self._run = run
        self._cases = list(dict.fromkeys(cases))
        self._workers = workers
        self._lock = threading.Lock()
        self._futures: dict[C, Future[R]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.companions: list[Campaign[Any, Any]] = []
        """Campaigns started together with this one: one that mostly waits (the gateway's timeouts)
        overlaps with one that mostly computes (the CLI's process start-ups)."""

    def start(self) -> None:
        with self._lock:
            if self._pool is not None:
                return
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="adversarial")
            for each in self._cases:
                self._futures[each] = self._pool.submit(self._run, each)
        for companion in self.companions:
            companion.start()

    def result(self, case: C) -> R:
        self.start()
        with self._lock:
            assert self._pool is not None
            if case not in self._futures:  # not known in advance (cannot happen under pytest)
                self._futures[case] = self._pool.submit(self._run, case)
            future = self._futures[case]
        return future.result()

    def results(self) -> list[R]:
        """The results of every case that ran to its end."""
        with self._lock:
            futures = list(self._futures.values())
        return [f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None]

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def selected(session: pytest.Session, kind: type[C]) -> list[C]:
    """The ``case`` parameters of type ``kind`` of the tests this session runs, in their order."""
    cases = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and isinstance(case := callspec.params.get("case"), kind):
            cases.append(case)
    return cases
