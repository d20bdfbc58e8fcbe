"""`iscl demo`: the whole story on this machine, on the demo SoftHSM2 token.

First a secured exchange under every suite (a table), then DICOM: a storage SCP over ISCL (what
`iscl serve` runs) on a free loopback port, a generated study sent with the `iscl store` logic, and
a check that every stored file holds exactly the dataset that was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import wire
from ..engine import Config, Profile, check_key_holder
from ..errors import IsclError, KeyHolderError
from ..keyholder.base import KeyHolder
from ..transport import aio
from ..wire import Encryption, Mac
from .extras import DICOM
from .options import (
    ENCRYPTION_NAMES,
    ENCRYPTIONS,
    MAC_NAMES,
    MACS,
    PROFILES,
    add_key_holder_options,
    open_key_holder,
)


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "demo",
        help="run a secured exchange on this machine under every algorithm combination",
        description="Create the demo SoftHSM2 token if needed (keys generated inside it), start an ISCL"
        " server and client on loopback, authenticate, send messages both ways (including a DICOM"
        " object) under every encryption x MAC x key-mode combination, and print a table. Then run a"
        " storage SCP over ISCL (as `iscl serve`) in a temporary folder, send it a generated CT study"
        " with C-STORE (as `iscl store`), and check that every stored file equals the one sent. The DICOM"
        " parts need the dicom extra (pip install 'iscl-hsm[dicom]'); without it the demo leaves them out.",
    )
    parser.add_argument("--images", type=int, default=DEMO_IMAGES,
                        help="CT images in the generated study (default: %(default)s)")
    parser.add_argument("--profile", choices=PROFILES, default=Profile.V100.value,
                        help="wire profile of every link: v1.00 or hardened (default: %(default)s)")
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
    """A small CT image as DICOM Part 10 bytes (None without the DICOM packages)."""
    if not DICOM.installed():
        return None
    from ..dicom.study import StudySpec, part10_bytes, study

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
    profile = PROFILES[args.profile]
    print(f"Key holder: {holder.description}; profile {profile.value}", file=sys.stderr)
    payloads = demo_payloads()
    rows: list[Row] = []
    left_out: list[str] = []
    for enc, mac, key_id in itertools.product(ENCRYPTIONS.values(), MACS.values(), (1, wire.SESSION_KEYS)):
        config = demo_config(profile, encryption=enc, mac=mac, enc_key_id=key_id)
        try:
            check_key_holder(config, holder)
        except KeyHolderError:
            left_out.append(f"{ENCRYPTION_NAMES[enc]} + {MAC_NAMES[mac]} with key {key_id}")
            continue
        try:
            rows.append(asyncio.run(exchange(holder, config, payloads)))
        except IsclError as exc:
            rows.append(Row(ENCRYPTION_NAMES[enc], MAC_NAMES[mac], str(key_id), 0, 0, 0, 0, f"FAILED: {exc}"))
    print(format_table(rows, payloads))
    if left_out:
        print(f"(left out, since {holder.description} never gives encryption key 1 out and V1.00 uses it as the"
              f" DES key: {', '.join(left_out)}; session keys serve instead)")
    if profile is Profile.V100:
        print("(none + md5 is the SDK's plain MD5, which anyone on the path can recompute: shown here, refused"
              " by the other commands unless --allow-unkeyed-md5)")
    print()
    if DICOM.installed():
        dicom_ok = dicom_story(holder, args.images, dicom_config(profile, holder))
    else:
        print(f"(no DICOM transfer: it {DICOM.advice})")
        dicom_ok = True
    return 0 if all(row.result == "ok" for row in rows) and dicom_ok else 1


def dicom_config(profile: Profile, holder: KeyHolder) -> Config:
    """DES-CBC + DES-MAC under key 1, or under session keys where the key holder cannot give key 1 out."""
    config = Config(profile=profile)
    try:
        check_key_holder(config, holder)
    except KeyHolderError:
        return Config(profile=profile, enc_key_id=wire.SESSION_KEYS)
    return config


def demo_config(profile: Profile, encryption: Encryption, mac: Mac, enc_key_id: int) -> Config:
    """One row's settings; V1.00's plain MD5 (encryption none) is allowed, to show it."""
    plain_md5 = profile is Profile.V100 and encryption is Encryption.NONE and mac is Mac.MD5
    return Config(profile=profile, encryption=encryption, mac=mac, enc_key_id=enc_key_id, allow_unkeyed_md5=plain_md5)


DEMO_IMAGES = 16


def dicom_story(holder: KeyHolder, images: int, config: Config) -> bool:
    """Storage SCP and SCU over ISCL on loopback; True if every file was stored and equals what was sent."""
    from pynetdicom import AE

    from ..dicom import StorageFolder, find_files, start_scp, storage_ae, store_files
    from ..dicom.study import StudySpec, dataset_bytes, write_study

    with tempfile.TemporaryDirectory(prefix="iscl-demo-") as temp:
        sent_dir, stored_dir = Path(temp, "sent"), Path(temp, "stored")
        stored_dir.mkdir()
        paths = write_study(sent_dir, StudySpec(images=images, rows=256, columns=256))
        server = start_scp(
            storage_ae(), ("127.0.0.1", 0), key_holder=holder, config=config,
            evt_handlers=StorageFolder(stored_dir).evt_handlers,
        )  # fmt: skip
        port = server.server_address[1]
        try:
            files, _ = find_files([sent_dir])
            started = time.perf_counter()
            results = store_files(AE(ae_title="ISCL-DEMO"), "127.0.0.1", port, files, key_holder=holder, config=config)
            seconds = time.perf_counter() - started
        finally:
            server.shutdown()
        stored = sum(result.ok for result in results)
        size = sum(file.size for file in files)
        copies = [(path, _stored_copy(stored_dir, path)) for path in paths]
        equal = sum(
            copy.exists() and dataset_bytes(path.read_bytes()) == dataset_bytes(copy.read_bytes())
            for path, copy in copies
        )
        print(
            f"DICOM over ISCL: a storage SCP (as `iscl serve`) on 127.0.0.1:{port}, a CT study of {len(paths)}"
            f" images ({size / 1e6:.1f} MB) sent with C-STORE (as `iscl store`).\n"
            f"  stored {stored} of {len(paths)} files in {seconds:.2f} s ({size / seconds / 1e6:.1f} MB/s,"
            f" DES-CBC + DES-MAC, {config.profile.value}); {equal} of {len(paths)} stored files equal the files sent"
        )
        for result in results:
            if not result.ok:
                print(f"  FAILED {result.file.path.name}: {result.describe()}")
        return stored == equal == len(paths)


def _stored_copy(folder: Path, sent: Path) -> Path:
    from pydicom.filereader import read_file_meta_info

    return folder / f"{read_file_meta_info(sent).MediaStorageSOPInstanceUID}.dcm"


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
