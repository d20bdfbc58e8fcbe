"""`iscl demo`: a secured exchange on this machine, on the demo SoftHSM2 token, under every suite."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import sys
import time
from dataclasses import dataclass

from .. import wire
from ..engine import Config
from ..errors import IsclError
from ..keyholder.base import KeyHolder
from ..transport import aio
from .options import ENCRYPTION_NAMES, ENCRYPTIONS, MAC_NAMES, MACS, add_key_holder_options, open_key_holder


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "demo",
        help="run a secured exchange on this machine under every algorithm combination",
        description="Create the demo SoftHSM2 token if needed (keys generated inside it), start an ISCL"
        " server and client on loopback, authenticate, send messages both ways (including a DICOM"
        " object) under every encryption x MAC x key-mode combination, and print a table.",
    )
    add_key_holder_options(parser)
    parser.set_defaults(run=run)


@dataclass
class Row:
    encryption: str
    mac: str
    keys: str
    handshake_ms: float
    messages: int
    bytes_each_way: int
    seconds: float
    result: str


def demo_payloads() -> list[tuple[str, bytes]]:
    """Messages of the sizes that matter: empty, tiny, one block, many blocks, and a DICOM object."""
    payloads = [
        ("empty", b""),
        ("one byte", b"\x01"),
        ("one block", bytes(range(256)) * (wire.MAX_BLOCK // 256) + bytes(wire.MAX_BLOCK % 256)),
        ("1 MiB", hashlib.sha256(b"iscl").digest() * (wire.DEFAULT_MAX_MESSAGE // 32)),
    ]
    dicom = _dicom_object()
    if dicom is not None:
        payloads.append(("DICOM CT object", dicom))
    return payloads


def _dicom_object() -> bytes | None:
    """A small CT image as DICOM Part 10 bytes (None if pydicom is absent)."""
    try:
        from ..dicom.study import StudySpec, part10_bytes, study
    except ImportError:
        return None
    return part10_bytes(study(StudySpec(images=1))[0])


async def exchange(holder: KeyHolder, config: Config, payloads: list[tuple[str, bytes]]) -> Row:
    """One link: the client sends every payload, the server echoes it, the client compares."""

    async def echo(stream: aio.IsclStream) -> None:
        while (data := await stream.recv()) is not None:
            await stream.send(data)

    server = await aio.start_server(echo, "127.0.0.1", 0, key_holder=holder, config=config)
    port = server.sockets[0].getsockname()[1]
    row = Row(
        ENCRYPTION_NAMES[config.encryption], MAC_NAMES[config.mac],
        "session" if config.enc_key_id == wire.SESSION_KEYS else f"key {config.enc_key_id}",
        0.0, 0, 0, 0.0, "ok",
    )
    async with server:
        started = time.perf_counter()
        stream = await aio.open_connection("127.0.0.1", port, key_holder=holder, config=config)
        row.handshake_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        for name, data in payloads:
            await stream.send(data)
            echoed = await stream.recv()
            if echoed != data:
                row.result = f"MISMATCH on {name}"
                break
            row.messages += 2
            row.bytes_each_way += len(data)
        row.seconds = time.perf_counter() - started
        await stream.close()
    return row


def run(args: argparse.Namespace) -> int:
    holder = open_key_holder(args)
    print(f"Key holder: {holder.description}", file=sys.stderr)
    payloads = demo_payloads()
    rows: list[Row] = []
    for enc, mac, key_id in itertools.product(ENCRYPTIONS.values(), MACS.values(), (1, wire.SESSION_KEYS)):
        config = Config(encryption=enc, mac=mac, enc_key_id=key_id)
        try:
            rows.append(asyncio.run(exchange(holder, config, payloads)))
        except IsclError as exc:
            rows.append(Row(ENCRYPTION_NAMES[enc], MAC_NAMES[mac], str(key_id), 0, 0, 0, 0, f"FAILED: {exc}"))
    print(format_table(rows, payloads))
    return 0 if all(row.result == "ok" for row in rows) else 1


def format_table(rows: list[Row], payloads: list[tuple[str, bytes]]) -> str:
    names = ", ".join(f"{name} ({len(data)} B)" for name, data in payloads)
    lines = [
        f"Each link: handshake, then each message sent and echoed back: {names}.",
        "",
        "| encryption | MAC     | keys    | handshake ms | messages | bytes each way | MB/s  | result |",
        "|------------|---------|---------|--------------|----------|----------------|-------|--------|",
    ]
    for r in rows:
        rate = 2 * r.bytes_each_way / r.seconds / 1e6 if r.seconds else 0.0
        lines.append(
            f"| {r.encryption:<10} | {r.mac:<7} | {r.keys:<7} | {r.handshake_ms:>12.2f} | {r.messages:>8} |"
            f" {r.bytes_each_way:>14} | {rate:>5.1f} | {r.result} |"
        )
    return "\n".join(lines)
