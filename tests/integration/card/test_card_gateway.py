"""The gateway with a virtual IC card as a tunnel's key holder, DCMTK at both ends.

echoscu / storescu -> client tunnel -> server tunnel -> storescp, with a card (through the private
pcscd) behind one tunnel and hospital A's or B's SoftHSM2 token behind the other, in each wire
profile (with the settings a card link has there: conftest.card_config). Every object arrives
byte-identical; a card pulled in the middle of a store aborts the association, and nothing after the
failure is stored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from iscl_hsm import wire
from iscl_hsm.dicom.gateway import Mode, Tunnel
from iscl_hsm.dicom.study import StudySpec, write_study
from iscl_hsm.engine import Profile
from iscl_hsm.keyholder.base import KeyHolder
from iscl_hsm.keyholder.smartcard import SmartCardKeyHolder
from iscl_hsm.wire import Encryption, Mac

from ..conftest import Hospitals
from ..gateway.conftest import StoreScp, assert_stored_identical, parse_line, scu
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


def test_a_card_pulled_during_a_store_aborts_the_association_and_nothing_after_it_is_stored(
    tmp_path: Path, hospitals: Hospitals, holders: Callable[..., KeyHolder], cards: CardRack,
    card_holders: Callable[..., SmartCardKeyHolder], storescp: StoreScp, start_tunnel: Callable[..., Tunnel],
    link_lines: Callable[[int], list[str]], profile: Profile,
) -> None:  # fmt: skip
    """Under unique session keys the client tunnel asks its card for a key for every message it sends
    and receives."""
    config = card_config(profile, Encryption.DES_CBC, Mac.MD5, wire.SESSION_KEYS)
    card = cards.insert(0)
    # Hardened's handshake-MAC key, then one key per message sent or received: the association request,
    # its answer, then the C-STOREs. The card goes at the fifth message, in the store.
    handshake, per_message = session_derivations(profile, config.mac)
    pulling = PullingHolder(card_holders(card), card, "derive_key", nth=handshake + 5 * per_message)
    server = start_tunnel(Mode.SERVER, storescp.port, holders(hospitals.a), config)
    client = start_tunnel(Mode.CLIENT, server.address.port, pulling, config)
    files = write_study(tmp_path / "study", StudySpec(images=6, rows=512, columns=512))

    store = scu("storescu", client.address.port, *files)

    assert store.returncode != 0, store.stdout
    client_line, server_line = sorted(
        (parse_line(line) for line in link_lines(2)), key=lambda line: line["target"] != str(client.settings.target)
    )
    assert client_line["result"] == f"aborted: {removed('INTERNAL AUTHENTICATE with enc key 1')} [ISCL 102 LOCAL_KEY_HOLDER]"
    assert server_line["result"].startswith("aborted: ")
    stored = [path for path in files if storescp.stored(dcmread(path).SOPInstanceUID).exists()]
    assert len(stored) < len(files)
    assert_stored_identical(storescp, stored)  # whatever arrived before the card went arrived whole
    assert files[: len(stored)] == stored  # in order: nothing after the failure
