"""The gateway with a virtual IC card as a tunnel's key holder, DCMTK at both ends.

echoscu / storescu -> client tunnel -> server tunnel -> storescp, with a card (through the private
pcscd) behind one tunnel and hospital A's or B's SoftHSM2 token behind the other, in each wire
profile (with the settings a card link has there: conftest.card_config). Every object arrives
byte-identical; a card pulled, or pcscd stopped, in the middle of a store aborts the association, nothing
after the failure is stored, and the far tunnel's other links carry on.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from iscl_hsm import wire
from iscl_hsm.cardsim.daemon import PrivatePcscd
from iscl_hsm.dicom.gateway import Mode, Tunnel
from iscl_hsm.dicom.study import StudySpec, write_study
from iscl_hsm.engine import Profile
from iscl_hsm.keyholder.base import KeyHolder
from iscl_hsm.keyholder.smartcard import SmartCardKeyHolder
from iscl_hsm.wire import Encryption, Mac

from ..conftest import Hospitals
from ..gateway.conftest import TIMEOUT, StoreScp, assert_stored_identical, dcmtk, parse_line, scu
from .conftest import CardRack, card_config, card_suites, session_derivations
from .test_card_links import PullingHolder, removed

GATEWAY_SUITES = card_suites([
    pytest.param(Encryption.DES_CBC, Mac.DES_MAC, 1),
    pytest.param(Encryption.DES_CBC, Mac.MD5, wire.SESSION_KEYS),
])  # fmt: skip
"""The default suite, and unique session keys (the card derives a key for every message), in each
profile; under V1.00 both use session keys."""


@pytest.mark.parametrize("card_behind", [Mode.CLIENT, Mode.SERVER], ids=["card-client-tunnel", "card-server-tunnel"])
@pytest.mark.parametrize(("profile", "encryption", "mac", "enc_key_id"), GATEWAY_SUITES)
def test_dcmtk_through_the_gateway_with_a_card_behind_one_tunnel(
    tmp_path: Path, hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder], storescp: StoreScp, start_tunnel: Callable[..., Tunnel],
    link_lines: Callable[[int], list[str]], card_behind: Mode, profile: Profile, encryption: Encryption, mac: Mac,
    enc_key_id: int,
) -> None:  # fmt: skip
    """C-ECHO and a small study: every object byte-identical, every link closed in order."""
    config = card_config(profile, encryption, mac, enc_key_id)
    card = card_holders(cards.insert(0 if card_behind is Mode.CLIENT else 1))
    server_holder = card if card_behind is Mode.SERVER else holders(hospitals.a)
    client_holder = card if card_behind is Mode.CLIENT else holders(hospitals.b)
    server = start_tunnel(Mode.SERVER, storescp.port, server_holder, config)
    client = start_tunnel(Mode.CLIENT, server.address.port, client_holder, config)
    files = write_study(tmp_path / "study", StudySpec(images=3, rows=500, columns=600))

    echo = scu("echoscu", client.address.port)
    store = scu("storescu", client.address.port, *files)

    assert echo.returncode == 0, echo.stdout
    assert "I: Received Echo Response (Success)" in echo.stdout
    assert store.returncode == 0, store.stdout
    assert_stored_identical(storescp, files)
    lines = [parse_line(line) for line in link_lines(4)]
    assert [line["result"] for line in lines] == ["closed"] * 4


def _stored(scp: StoreScp, files: list[Path]) -> list[Path]:
    return [path for path in files if scp.stored(dcmread(path).SOPInstanceUID).exists()]


@pytest.mark.parametrize("fault", ["card-pulled", "pcscd-stopped"])
def test_a_card_lost_during_a_store_aborts_the_association_and_leaves_other_links_alone(
    tmp_path: Path, hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack, pcscd: PrivatePcscd,
    card_holders: Callable[..., SmartCardKeyHolder], storescp: StoreScp, start_tunnel: Callable[..., Tunnel],
    link_lines: Callable[[int], list[str]], profile: Profile, fault: str,
) -> None:  # fmt: skip
    """Under unique session keys the client tunnel asks its card for a key for every message it sends
    and receives; the card is pulled, or pcscd stopped, in the middle of a store. Nothing after the
    failure is stored, and storescu says so.

    A second client tunnel, on hospital B's token, stores through the same server tunnel at the same
    time: a tunnel's card serves every link of that tunnel, so the far tunnel and its other links are
    what must not notice.
    """
    config = card_config(profile, Encryption.DES_CBC, Mac.MD5, wire.SESSION_KEYS)
    card = cards.insert(0)
    # Hardened's handshake-MAC key, then one key per message sent or received: the association request,
    # its answer, then the C-STOREs. The card goes at the fifth message, in the store.
    handshake, per_message = session_derivations(profile, config.mac)
    pulling = PullingHolder(card_holders(card), card, "derive_key", nth=handshake + 5 * per_message,
                            fault=None if fault == "card-pulled" else pcscd.stop)  # fmt: skip
    server = start_tunnel(Mode.SERVER, storescp.port, holders(hospitals.a), config)
    client = start_tunnel(Mode.CLIENT, server.address.port, pulling, config)
    healthy = start_tunnel(Mode.CLIENT, server.address.port, holders(hospitals.b), config)
    files = write_study(tmp_path / "study", StudySpec(images=6, rows=512, columns=512))
    other = write_study(tmp_path / "other", StudySpec(images=6, rows=512, columns=512))
    alongside = subprocess.Popen([dcmtk("storescu"), "-v", "127.0.0.1", str(healthy.address.port), *map(str, other)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        store = scu("storescu", client.address.port, *files)
    finally:
        alongside_output = alongside.communicate(timeout=TIMEOUT)[0]

    assert store.returncode != 0, store.stdout
    where = "the card in reader 'Virtual PCD 00 00'"
    lost = (removed("INTERNAL AUTHENTICATE with enc key 1") if fault == "card-pulled" else
            f"pcscd stopped while using {where} (INTERNAL AUTHENTICATE with enc key 1); start pcscd again"
            " (mkdir -p /run/pcscd; pcscd -f) and start again")  # fmt: skip
    results = [parse_line(line)["result"] for line in link_lines(4)]
    assert f"aborted: {lost} [ISCL 102 LOCAL_KEY_HOLDER]" in results, results  # the card's tunnel
    assert results.count("closed") == 2, results  # the healthy tunnel's link, at both tunnels
    assert len([result for result in results if result.startswith("aborted: ")]) == 2, results
    stored = _stored(storescp, files)
    assert len(stored) < len(files)
    assert_stored_identical(storescp, stored)  # whatever arrived before the card went arrived whole
    assert files[: len(stored)] == stored  # in order: nothing after the failure
    assert alongside.returncode == 0, alongside_output
    assert_stored_identical(storescp, other)
