"""DCMTK applications through a tunnel pair in this process: every object arrives byte-identical, many
associations run at once, and a byte flipped in flight aborts the association on both sides.

echoscu / storescu -> client tunnel (hospital B) -> [man in the middle] -> server tunnel (hospital A)
-> storescp.
"""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from iscl_hsm import wire
from iscl_hsm.dicom.study import StudySpec, write_study
from iscl_hsm.engine import Config
from iscl_hsm.wire import Encryption, Mac, MessageId

from ..conftest import TamperingProxy
from .conftest import StoreScp, TunnelPair, assert_stored_identical, parse_line, scu

GATEWAY_SUITES = [
    pytest.param(Encryption.DES_CBC, Mac.DES_MAC, 1, id="des-cbc-des-mac-key1"),
    pytest.param(Encryption.NONE, Mac.MD5, 1, id="none-md5-key1"),
    pytest.param(Encryption.DES_CBC, Mac.DES_MAC, wire.SESSION_KEYS, id="des-cbc-des-mac-session"),
    pytest.param(Encryption.DES_CBC, Mac.MD5, wire.SESSION_KEYS, id="des-cbc-md5-session"),
]


@pytest.mark.parametrize(("encryption", "mac", "enc_key_id"), GATEWAY_SUITES)
def test_echo_and_store_arrive_byte_identical(
    tmp_path: Path, storescp: StoreScp, tunnel_pair: Callable[..., TunnelPair],
    link_lines: Callable[[int], list[str]], encryption: Encryption, mac: Mac, enc_key_id: int,
) -> None:  # fmt: skip
    pair = tunnel_pair(storescp.port, Config(encryption=encryption, mac=mac, enc_key_id=enc_key_id))
    port = pair.client.address.port
    # Images of 600 KB: several ISCL messages each, one ending mid-block.
    files = write_study(tmp_path / "study", StudySpec(images=5, rows=500, columns=600))

    echo = scu("echoscu", port)
    store = scu("storescu", port, *files)

    assert echo.returncode == 0, echo.stdout
    assert "I: Received Echo Response (Success)" in echo.stdout
    assert store.returncode == 0, store.stdout
    assert_stored_identical(storescp, files)
    sent = sum(f.stat().st_size for f in files)
    lines = [parse_line(line) for line in link_lines(4)]
    assert len(lines) == 4  # one per link and tunnel
    algorithms = f"{encryption.name.lower().replace('_', '-')}+{mac.name.lower().replace('_', '-')}"
    enc_key = "session" if enc_key_id == wire.SESSION_KEYS else "1"
    for line in lines:
        assert (line["auth_key"], line["algorithms"], line["enc_key"], line["result"]) == (
            "1", algorithms, enc_key, "closed"
        )
    client_store = [line for line in lines if line["target"] == str(pair.client.settings.target)][1]
    server_store = [line for line in lines if line["target"] == f"127.0.0.1:{storescp.port}"][1]
    assert int(client_store["up"]) > sent and client_store["up"] == server_store["down"]
    assert client_store["down"] == server_store["up"]


def test_fifty_associations_at_once(
    tmp_path: Path, storescp: StoreScp, tunnel_pair: Callable[..., TunnelPair],
    link_lines: Callable[[int], list[str]],
) -> None:  # fmt: skip
    pair = tunnel_pair(storescp.port, Config())
    port = pair.client.address.port
    studies = [write_study(tmp_path / f"study{n}", StudySpec(images=1, rows=64, columns=64)) for n in range(25)]

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        echoes = [pool.submit(scu, "echoscu", port) for _ in range(25)]
        stores = [pool.submit(scu, "storescu", port, *files) for files in studies]
        results = [job.result() for job in echoes + stores]

    for result in results:
        assert result.returncode == 0, result.stdout
    for files in studies:
        assert_stored_identical(storescp, files)
    lines = [parse_line(line) for line in link_lines(100)]
    assert len(lines) == 100 and {line["result"] for line in lines} == {"closed"}


def _flip_after(offset: int) -> Callable[[str, Any], bytes]:
    """A tamper function: flip one bit of the first client-to-server data block past ``offset`` bytes."""
    state = {"seen": 0, "flipped": False}

    def tamper(direction: str, frame: Any) -> bytes:
        if direction != "c2s" or not frame.is_(MessageId.MESSAGE_TRANSMISSION_NOTIF) or state["flipped"]:
            return bytes(frame.raw)
        state["seen"] += len(frame.payload)
        if state["seen"] < offset:
            return bytes(frame.raw)
        state["flipped"] = True
        return bytes(frame.flip_bit(wire.HEADER_SIZE + 100))

    return tamper


@pytest.mark.parametrize(("encryption", "mac"), [(Encryption.DES_CBC, Mac.DES_MAC), (Encryption.NONE, Mac.MD5)])
def test_a_flipped_byte_aborts_the_association_and_nothing_after_it_is_stored(
    tmp_path: Path, storescp: StoreScp, tunnel_pair: Callable[..., TunnelPair],
    link_lines: Callable[[int], list[str]], mitm: Callable[..., TamperingProxy], encryption: Encryption, mac: Mac,
) -> None:  # fmt: skip
    files = write_study(tmp_path / "study", StudySpec(images=6, rows=512, columns=512))
    image = files[0].stat().st_size
    # storescu waits for each C-STORE response, so images 1 and 2 are stored before the flip in image 3.
    proxies: list[TamperingProxy] = []

    def via(server_port: int) -> int:
        proxies.append(mitm(server_port, _flip_after(int(2.5 * image))))
        return proxies[0].port

    pair = tunnel_pair(storescp.port, Config(encryption=encryption, mac=mac), via=via)
    store = scu("storescu", pair.client.address.port, *files)

    assert store.returncode != 0, store.stdout
    assert "Store Failed" in store.stdout or "Association Aborted" in store.stdout or "Peer aborted" in store.stdout, (
        store.stdout
    )
    client_line, server_line = sorted(
        (parse_line(line) for line in link_lines(2)), key=lambda line: line["target"] != str(pair.client.settings.target)
    )
    assert server_line["result"] == (
        "aborted: a message failed its integrity check (tampered, replayed, reordered or sent under another"
        " key); the link was dropped and nothing of the message was delivered [ISCL 113 BAD_MAC]"
    )
    assert client_line["result"].startswith("aborted: ") and "[ISCL 122 CONNECTION_LOST]" in client_line["result"]
    assert int(server_line["down"]) < int(2.5 * image)  # nothing from the altered message on
    assert_stored_identical(storescp, files[:2])
    for path in files[2:]:
        assert not storescp.stored(dcmread(path).SOPInstanceUID).exists(), f"{path.name} was stored"
    assert re.search(r"Association Aborted|DUL network closed", storescp.output())
