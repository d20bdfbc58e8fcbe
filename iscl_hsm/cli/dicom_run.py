"""What `iscl echo`, `iscl store` and `iscl serve` do (their options are in dicom.py)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from typing import TextIO

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from ..dicom import MAXIMUM_PDU_SIZE, StorageFolder, associate, link_of, start_scp, storage_ae
from ..dicom.sender import DicomFile, Sent, Skipped, find_files, store_files
from ..engine import Config
from ..keyholder.base import KeyHolder
from ..repeats import RepeatFilter
from .link import split_address
from .options import build_config, build_timeouts, describe, open_link_holder

EXIT_OK, EXIT_FAILURE = 0, 1


def quiet_pynetdicom(args: argparse.Namespace) -> None:
    """pynetdicom's own log lines repeat what our one-line messages say: show them only with -v."""
    if args.verbose == 0:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def _application_entity(title: str, timeout: float) -> AE:
    ae = AE(ae_title=title)
    ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


# --- echo -----------------------------------------------------------------------------------------


def run_echo(args: argparse.Namespace) -> int:
    quiet_pynetdicom(args)
    config = build_config(args)
    holder = open_link_holder(args, config)
    try:
        return _echo(args, holder, config)
    finally:
        holder.close()


def _echo(args: argparse.Namespace, holder: KeyHolder, config: Config) -> int:
    ae = _application_entity(args.aet, args.timeout)
    ae.add_requested_context(Verification)
    assoc = associate(
        ae, args.host, args.port, key_holder=holder, config=config, timeouts=build_timeouts(args), ae_title=args.aec
    )
    bridge = link_of(assoc)
    assert bridge is not None
    print(describe(bridge.parameters))
    started = time.perf_counter()
    answer = assoc.send_c_echo()
    elapsed_ms = (time.perf_counter() - started) * 1000
    if "Status" not in answer:
        why = f": {bridge.error}" if bridge.error is not None else ""
        print(f"iscl: no answer to C-ECHO from {args.host}:{args.port}, the association was aborted{why}",
              file=sys.stderr)
        return EXIT_FAILURE
    assoc.release()
    status = int(answer.Status)
    print(f"C-ECHO {args.aec} at {args.host}:{args.port}: status 0x{status:04X} ({code_to_category(status)}),"
          f" round trip {elapsed_ms:.1f} ms")
    return EXIT_OK if status == 0 else EXIT_FAILURE


# --- store ----------------------------------------------------------------------------------------


class Progress:
    """Files, bytes and rate on one stderr line, redrawn at most ten times a second when it is a terminal."""

    def __init__(self, files: list[DicomFile], out: TextIO) -> None:
        self.total_files = len(files)
        self.total_bytes = sum(f.size for f in files)
        self.done_files = self.done_bytes = self.stored = 0
        self.failed: list[Sent] = []
        self._out = out
        self._live = out.isatty()
        self._started = time.perf_counter()
        self._drawn = 0.0

    def __call__(self, sent: Sent) -> None:
        self.done_files += 1
        self.done_bytes += sent.file.size
        if sent.ok:
            self.stored += 1
        else:
            self.failed.append(sent)
            self._clear()
            print(f"iscl store: {sent.file.path}: {sent.describe()}", file=self._out)
        now = time.perf_counter()
        if self._live and (now - self._drawn >= 0.1 or self.done_files == self.total_files):
            self._drawn = now
            self._out.write(f"\r\033[K{self.line()}")
            self._out.flush()

    def line(self) -> str:
        seconds = max(time.perf_counter() - self._started, 1e-9)
        return (
            f"{self.done_files}/{self.total_files} files, {_mb(self.done_bytes)}/{_mb(self.total_bytes)} MB,"
            f" {self.done_bytes / seconds / 1e6:.1f} MB/s"
        )

    def finish(self, skipped: list[Skipped]) -> str:
        self._clear()
        seconds = time.perf_counter() - self._started
        return (
            f"iscl store: stored {self.stored} of {self.total_files} files ({_mb(self.done_bytes)} MB in"
            f" {seconds:.1f} s, {self.done_bytes / max(seconds, 1e-9) / 1e6:.1f} MB/s); {len(self.failed)} failed,"
            f" {len(skipped)} skipped"
        )

    def _clear(self) -> None:
        if self._live:
            self._out.write("\r\033[K")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def run_store(args: argparse.Namespace) -> int:
    quiet_pynetdicom(args)
    config = build_config(args)
    files, skipped = find_files(args.paths)
    for skip in skipped:
        print(f"iscl store: skipped {skip.path}: {skip.reason}", file=sys.stderr)
    if not files:
        where = ", ".join(map(str, args.paths))
        why = "nothing to send in {}: every file was skipped" if skipped else "no DICOM files found in {}"
        print(f"iscl store: {why.format(where)}", file=sys.stderr)
        return EXIT_FAILURE
    holder = open_link_holder(args, config)
    progress = Progress(files, sys.stderr)
    try:
        store_files(
            _application_entity(args.aet, args.timeout), args.host, args.port, files, key_holder=holder,
            config=config, timeouts=build_timeouts(args), called_ae=args.aec, on_sent=progress,
        )  # fmt: skip
    finally:
        holder.close()
    print(progress.finish(skipped), file=sys.stderr)
    return EXIT_OK if not progress.failed and not skipped else EXIT_FAILURE


# --- serve ----------------------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    quiet_pynetdicom(args)
    config = build_config(args)
    host, port = split_address(args.listen)

    def say(line: str) -> None:
        print(f"iscl serve: {line}", file=sys.stderr, flush=True)

    repeats = RepeatFilter()

    def link_failed(peer: str, error: BaseException) -> None:
        if (line := repeats.failure(peer.rpartition(":")[0], error, f"ISCL link from {peer} failed: {error}")) is not None:
            say(line)

    folder = StorageFolder(args.output, notify=lambda line, ok: say(line))
    holder = open_link_holder(args, config)
    ae = storage_ae(args.aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    server = start_scp(
        ae, (host, port), key_holder=holder, config=config, timeouts=build_timeouts(args),
        evt_handlers=folder.evt_handlers, on_link_error=link_failed,
    )  # fmt: skip
    server.daemon_threads, server.block_on_close = True, False  # a link still in its handshake at exit is
    # dropped, not waited for
    bound = server.server_address
    say(f"listening on {bound[0]}:{bound[1]}, storing into {args.output}")
    stopped: list[int] = []
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopped.append(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        stop.wait()
    finally:
        server.shutdown()  # from here on no association starts: the list below is complete
        open_ones = list(server.active_associations)
        for assoc in open_ones:  # the peer sees an aborted association, never a completed one
            if assoc.is_established:
                assoc.abort()
            elif (bridge := link_of(assoc)) is not None:  # still awaiting the request, which pynetdicom
                with contextlib.suppress(OSError):  # cannot abort: end the connection under it instead
                    bridge.app_socket.shutdown(socket.SHUT_RDWR)
        holder.close()
    say(f"stopped by {signal.Signals(stopped[0]).name}; {len(open_ones)} association(s) aborted")
    return EXIT_OK
