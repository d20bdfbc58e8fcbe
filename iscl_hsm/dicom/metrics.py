"""The gateway's Prometheus metrics (``iscl tunnel --metrics HOST:PORT``).

prometheus_client is imported only when metrics are asked for. With several worker processes, each
worker writes its figures to files in a shared folder (prometheus_client's multiprocess mode, chosen
by ``PROMETHEUS_MULTIPROC_DIR`` before the first import) and the supervisor serves their sum; see
:func:`use_shared_folder` and :func:`serve`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import error_name
from ..keyholder.base import KeyHolder, RecordKey
from ..transport.common import Address
from ..transport.relay import LinkRecord

T = TypeVar("T")

_MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
KEY_HOLDER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
MESSAGE_BUCKETS = tuple(float(4**n) for n in range(3, 12))  # 64 B .. 4 MiB, by fours
"""Histogram bounds: a handshake takes milliseconds on a token and about a second on a card; a key-holder
call a fraction of a millisecond in SoftHSM2 and tens of them on a card; a message up to the chunk size."""


def use_shared_folder(folder: Path) -> None:
    """Make this process and the workers it forks write their metrics under ``folder`` (multiprocess mode).

    Must run before prometheus_client is first imported: it chooses how values are stored at import.
    """
    os.environ[_MULTIPROCESS_VARIABLE] = str(folder)


def worker_exited(pid: int) -> None:
    """Drop the ``links_open`` figure of a worker that exited (its counters stay in the sum)."""
    if _MULTIPROCESS_VARIABLE in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def serve(address: Address) -> Address:
    """Serve the metrics as Prometheus text on ``address`` (``/metrics``) from a thread; where it listens.

    With a shared folder, the figures served are the sum of every worker's.
    """
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

    registry = REGISTRY
    if folder := os.environ.get(_MULTIPROCESS_VARIABLE):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    server, _ = start_http_server(address.port, address.host, registry=registry)
    host, port = server.server_address[:2]
    return Address(str(host), int(port))


class NoMetrics:
    """What a tunnel counts when nobody asked for metrics: nothing."""

    def link_started(self) -> None:
        pass

    def link_ended(self, record: LinkRecord, failure: BaseException | None) -> None:
        pass

    def link_failed(self, failure: BaseException) -> None:
        pass

    def handshake(self, seconds: float | None) -> None:
        pass

    def message(self, direction: str, size: int) -> None:
        pass

    def timed(self, holder: KeyHolder) -> KeyHolder:
        return holder


class GatewayMetrics(NoMetrics):
    """What one tunnel counts: links open and ended (by result and error), bytes each way, handshake
    times, message sizes and key-holder call times. Labelled by the tunnel's ``mode``."""

    def __init__(self, mode: str) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self._mode = mode
        self._open = Gauge("iscl_links_open", "Links being carried now.", ["mode"], multiprocess_mode="livesum")
        self._links = Counter("iscl_links", "Links ended, by result (closed, aborted) and error.",
                              ["mode", "result", "code"])  # fmt: skip
        self._bytes = Counter("iscl_bytes", "Application bytes carried, by direction.", ["mode", "direction"])
        self._handshake = Histogram("iscl_handshake_seconds", "Time from a link's first handshake byte to its"
                                    " authentication.", ["mode"], buckets=HANDSHAKE_BUCKETS)  # fmt: skip
        self._message = Histogram("iscl_message_bytes", "Size of the ISCL messages carried, by direction.",
                                  ["mode", "direction"], buckets=MESSAGE_BUCKETS)  # fmt: skip
        self._key_holder = Histogram("iscl_key_holder_call_seconds", "Time of each call to the token or card,"
                                     " by operation.", ["mode", "operation"], buckets=KEY_HOLDER_BUCKETS)  # fmt: skip

    def link_started(self) -> None:
        self._open.labels(self._mode).inc()

    def link_ended(self, record: LinkRecord, failure: BaseException | None) -> None:
        self._open.labels(self._mode).dec()
        if failure is None:
            self._links.labels(self._mode, "closed", "").inc()
        else:
            self.link_failed(failure)
        self._bytes.labels(self._mode, "plain_to_iscl").inc(record.plain_to_iscl)
        self._bytes.labels(self._mode, "iscl_to_plain").inc(record.iscl_to_plain)

    def link_failed(self, failure: BaseException) -> None:
        """A link that ended before it was carried (a failed handshake) or aborted while carried."""
        self._links.labels(self._mode, "aborted", error_name(failure)).inc()

    def handshake(self, seconds: float | None) -> None:
        if seconds is not None:
            self._handshake.labels(self._mode).observe(seconds)

    def message(self, direction: str, size: int) -> None:
        self._message.labels(self._mode, direction).observe(size)

    def timed(self, holder: KeyHolder) -> KeyHolder:
        """``holder``, each of its calls timed into ``iscl_key_holder_call_seconds``."""
        return TimedKeyHolder(holder, lambda operation, seconds: self._key_holder.labels(self._mode, operation).observe(seconds))


class TimedKeyHolder(KeyHolder):
    """A key holder that reports how long each call to the one it wraps took (``report(operation, s)``)."""

    def __init__(self, inner: KeyHolder, report: Callable[[str, float], None]) -> None:
        self.inner = inner
        self._report = report
        self.description = inner.description
        self.host_record_keys = inner.host_record_keys
        self.gives_encryption_keys = inner.gives_encryption_keys

    def _timed(self, operation: str, call: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._report(operation, time.perf_counter() - started)

    def get_challenge(self, key_id: int) -> bytes:
        return self._timed("get_challenge", self.inner.get_challenge, key_id)

    def internal_authenticate(self, key_id: int, block: bytes) -> bytes:
        return self._timed("internal_authenticate", self.inner.internal_authenticate, key_id, block)

    def external_authenticate(self, key_id: int, challenge: bytes, cryptogram: bytes) -> bool:
        return self._timed("external_authenticate", self.inner.external_authenticate, key_id, challenge, cryptogram)

    def expect_response(self, key_id: int, challenge: bytes) -> None:
        self._timed("expect_response", self.inner.expect_response, key_id, challenge)

    def derive_key(self, enc_key_id: int, block: bytes) -> RecordKey:
        return self._timed("derive_key", self.inner.derive_key, enc_key_id, block)

    def derive_keys(self, enc_key_id: int, blocks: Sequence[bytes]) -> list[RecordKey]:
        return self._timed("derive_keys", self.inner.derive_keys, enc_key_id, blocks)

    def encryption_key(self, enc_key_id: int) -> RecordKey:
        return self._timed("encryption_key", self.inner.encryption_key, enc_key_id)

    def close(self) -> None:
        self.inner.close()
