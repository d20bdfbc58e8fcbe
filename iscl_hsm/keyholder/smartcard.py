"""The IC-card key holder: ISO/IEC 7816-4 commands to an ISCL card through PC/SC (pcscd, pyscard).

:class:`CardChannel` finds the reader, connects (exclusively: another program's GET CHALLENGE would
replace ours), SELECTs the ISCL application and turns PC/SC failures and status words into one
sentence each. :class:`SmartCardKeyHolder` verifies the card-holder PIN and maps the key-holder
interface onto the card (apdu.py has the bytes, docs/smart-cards.md the table):

* ``get_challenge``          GET CHALLENGE.
* ``internal_authenticate``  INTERNAL AUTHENTICATE with the reference of authentication key N.
* ``external_authenticate``  EXTERNAL AUTHENTICATE against the card's last challenge. A card keeps one
  challenge; when a later link on the same card has asked for a newer one, the older (still
  outstanding on the host) is checked on the host instead: INTERNAL AUTHENTICATE of it and a
  constant-time comparison, as the PKCS#11 holder does. Either way a challenge is used once.
* ``derive_key``             INTERNAL AUTHENTICATE with the reference of encryption key N, then
  parity on the host. Record keys from a card therefore always live on the host (a card has no
  bulk DES-CBC worth using); the long-term keys never leave the card.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Final, Self

from smartcard import scard

from ..crypto.des import DesKey, fix_parity, self_test_once
from ..errors import ErrorCode, KeyHolderConfigError, KeyHolderError
from . import apdu
from .apdu import BLOCK, PIN_NAMES, Ins, Pin, Sw
from .base import KeyHolder, RecordKey

log = logging.getLogger(__name__)

MAX_OUTSTANDING: Final = 4096
"""Outstanding challenges remembered on the host; the oldest is forgotten first."""
_POLL_MS: Final = 200


class CardChannel:
    """A PC/SC connection to the ISCL application of the card in one reader."""

    def __init__(self, reader: str | None = None, wait_card: float = 0.0) -> None:
        self.reader = "?"
        self.commands_sent = 0
        """APDUs transmitted so far, for benchmarks and traces."""
        self._lock = threading.RLock()
        self._card: Any = None
        result, self._context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if result != scard.SCARD_S_SUCCESS:
            raise KeyHolderError(_no_service(result))
        try:
            self.reader = self._wait(self._choose(reader), wait_card)
            result, self._card, protocol = scard.SCardConnect(
                self._context, self.reader, scard.SCARD_SHARE_EXCLUSIVE,
                scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
            )  # fmt: skip
            if result != scard.SCARD_S_SUCCESS:
                self._card = None
                raise self._pcsc_error(result, "connecting to the card")
            self._pci = scard.SCARD_PCI_T1 if protocol == scard.SCARD_PROTOCOL_T1 else scard.SCARD_PCI_T0
            self.check(apdu.command(Ins.SELECT, apdu.SELECT_BY_NAME, apdu.SELECT_NO_RESPONSE_DATA, apdu.AID),
                       "SELECT of the ISCL application")
        except BaseException:
            self.close()
            raise
        self.description = f"card in reader '{self.reader}'"

    # --- finding the reader and the card ------------------------------------------------------

    def _readers(self) -> list[str]:
        result, readers = scard.SCardListReaders(self._context, [])
        if result == scard.SCARD_E_NO_READERS_AVAILABLE or (result == scard.SCARD_S_SUCCESS and not readers):
            raise KeyHolderConfigError(
                "no smart-card reader is connected (pcscd lists none): plug one in, or for the virtual"
                " card install vsmartcard-vpcd and restart pcscd"
            )
        if result != scard.SCARD_S_SUCCESS:
            raise KeyHolderError(_no_service(result))
        return list(readers)

    def _choose(self, wanted: str | None) -> str | None:
        """The reader named exactly or by a unique substring; None: the first one holding a card."""
        readers = self._readers()
        if wanted is None:
            return None
        if wanted in readers:
            return wanted
        matches = [r for r in readers if wanted in r]
        if len(matches) == 1:
            return matches[0]
        listing = ", ".join(f"'{r}'" for r in readers)
        if not matches:
            raise KeyHolderConfigError(
                f"no smart-card reader matches --reader '{wanted}'; the readers are {listing}"
            )
        raise KeyHolderConfigError(
            f"--reader '{wanted}' matches several readers ({', '.join(matches)}); give more of the name"
        )

    def _wait(self, reader: str | None, seconds: float) -> str:
        """The reader once it holds a card (any reader when ``reader`` is None), within ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            candidates = [reader] if reader is not None else self._readers()
            result, states = scard.SCardGetStatusChange(
                self._context, 0, [(r, scard.SCARD_STATE_UNAWARE) for r in candidates]
            )
            if result != scard.SCARD_S_SUCCESS:
                raise self._pcsc_error(result, "looking for a card")
            for name, event, _atr in states:
                if event & scard.SCARD_STATE_PRESENT:
                    return str(name)
            if time.monotonic() >= deadline:
                break
            time.sleep(min(_POLL_MS / 1000, max(0.0, deadline - time.monotonic())))
        within = f" within {seconds:g} s" if seconds else ""
        if reader is not None:
            raise KeyHolderConfigError(
                f"no card in reader '{reader}'{within}; insert the ISCL card, or wait for it with --wait-card"
                " SECONDS"
            )
        raise KeyHolderConfigError(
            f"no reader holds a card{within} (readers: {', '.join(candidates)}); insert the ISCL card,"
            " name its reader with --reader, or wait with --wait-card SECONDS"
        )

    # --- commands ----------------------------------------------------------------------------

    def transmit(self, command: bytes, doing: str) -> tuple[bytes, int]:
        """Send one APDU; return (data, status word). PC/SC failures raise KeyHolderError."""
        with self._lock:
            if self._card is None:
                raise KeyHolderError(f"the card in reader '{self.reader}' is closed; open the key holder again")
            result, response = scard.SCardTransmit(self._card, self._pci, list(command))
            self.commands_sent += 1
            if result != scard.SCARD_S_SUCCESS:
                raise self._pcsc_error(result, doing)
        if len(response) < 2:
            raise KeyHolderError(f"the card in reader '{self.reader}' gave no status word to {doing}")
        sw = response[-2] << 8 | response[-1]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s -> %04X", self.reader, apdu.describe(command), sw)
        return bytes(response[:-2]), sw

    def check(self, command: bytes, doing: str, length: int | None = None) -> bytes:
        """Send one APDU and return its data; any status but 9000 raises a KeyHolderError."""
        data, sw = self.transmit(command, doing)
        if sw != Sw.OK:
            raise self.status_error(sw, doing, command)
        if length is not None and len(data) != length:
            raise KeyHolderError(
                f"the card in reader '{self.reader}' returned {len(data)} bytes to {doing}, not {length};"
                " it is not an ISCL card"
            )
        return data

    def verify_pin(self, pin: str, reference: Pin = Pin.USER) -> None:
        """VERIFY a PIN; wrong and blocked PINs are errors that say how many tries remain."""
        try:
            block = apdu.pin_block(pin)
        except ValueError as exc:
            raise KeyHolderConfigError(
                f"the {PIN_NAMES[reference]} for the card in reader '{self.reader}': {exc}", ErrorCode.BAD_OPTION
            ) from None
        self.check(apdu.command(Ins.VERIFY, 0, reference, block), f"VERIFY of the {PIN_NAMES[reference]}")

    def status_error(self, sw: int, doing: str, command: bytes) -> KeyHolderError:
        """The sentence for a status word other than 9000."""
        where = f"the card in reader '{self.reader}'"
        pin = _pin_checked(command)
        if (left := apdu.tries_left(sw)) is not None:
            return KeyHolderConfigError(
                f"wrong {pin or 'PIN'} for {where}: {left} {'try' if left == 1 else 'tries'} left before"
                " it blocks; check the PIN or PIN file"
            )
        if sw == Sw.BLOCKED:
            what = pin or PIN_NAMES[Pin.USER]
            fix = ("the security officer must unblock it with 'iscl card unblock-pin'" if what != PIN_NAMES[Pin.SO]
                   else "the card must be issued again")
            return KeyHolderConfigError(
                f"the {what} of {where} is blocked (6983) after too many wrong entries; {fix}"
            )
        if sw == Sw.REFERENCE_NOT_FOUND:
            reference = apdu.parse_key_reference(command[3])
            key = f"{reference[0]} key {reference[1]}" if reference else "such key"
            return KeyHolderConfigError(
                f"key not found: {where} holds no {key} (6A88); load it with 'iscl card load-key'",
                ErrorCode.KEY_NOT_FOUND,
            )
        if sw == Sw.SECURITY_STATUS_NOT_SATISFIED:
            return KeyHolderError(
                f"{where} refused {doing}: security status not satisfied (6982), the"
                f" {'security-officer' if command[1] == Ins.PUT_KEY else 'card-holder'} PIN was not"
                " verified or the card was reset; open the card again"
            )
        if sw == Sw.CONDITIONS_NOT_SATISFIED:
            return KeyHolderError(
                f"{where} has no challenge outstanding for {doing} (6985): another program reset the card or"
                " asked it for a new challenge; start the link again"
            )
        if sw == Sw.FUNCTION_NOT_SUPPORTED and command[1] == Ins.PUT_KEY:
            return KeyHolderError(
                f"{where} does not load keys (6A81); a virtual card on a token (iscl card emulate --token)"
                " keeps its keys in the token: load them there with 'iscl keys' instead"
            )
        if sw == Sw.APPLICATION_NOT_FOUND:
            return KeyHolderConfigError(
                f"{where} has no ISCL application (AID {apdu.AID.hex().upper()}, 6A82); is it the right card?"
            )
        return KeyHolderError(f"{where} answered {sw:04X} to {doing}: {apdu.meaning(sw)}")

    def _pcsc_error(self, result: int, doing: str) -> KeyHolderError:
        where = f"reader '{self.reader}'"
        if result in (scard.SCARD_W_REMOVED_CARD, scard.SCARD_E_NO_SMARTCARD, scard.SCARD_W_UNPOWERED_CARD,
                      scard.SCARD_W_UNRESPONSIVE_CARD, scard.SCARD_E_NOT_TRANSACTED):
            return KeyHolderError(
                f"the card in {where} was removed or powered off during {doing}; insert it and start again"
            )
        if result == scard.SCARD_W_RESET_CARD:
            return KeyHolderError(
                f"the card in {where} was reset by another program during {doing}; the PIN must be verified"
                " again: start again"
            )
        if result == scard.SCARD_E_SHARING_VIOLATION:
            return KeyHolderError(
                f"{where} is in use by another program (an iscl server on this card?); stop it or name"
                " another reader"
            )
        if result in (scard.SCARD_E_NO_SERVICE, scard.SCARD_E_SERVICE_STOPPED, scard.SCARD_E_INVALID_HANDLE,
                      scard.SCARD_F_COMM_ERROR):
            return KeyHolderError(
                f"pcscd stopped while using the card in {where} ({doing}); start pcscd again"
                " (mkdir -p /run/pcscd; pcscd -f) and start again"
            )
        if result in (scard.SCARD_E_UNKNOWN_READER, scard.SCARD_E_READER_UNAVAILABLE):
            return KeyHolderError(f"{where} was disconnected during {doing}; plug it in and start again")
        return KeyHolderError(
            f"PC/SC failed on {where} during {doing}: {scard.SCardGetErrorMessage(result)} (0x{result & 0xFFFFFFFF:08X})"
        )

    def close(self) -> None:
        """Disconnect with a card reset, so no verified PIN outlives this program's use of the card."""
        with self._lock:
            if self._card is not None:
                scard.SCardDisconnect(self._card, scard.SCARD_RESET_CARD)
                self._card = None
            if self._context is not None:
                scard.SCardReleaseContext(self._context)
                self._context = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pin_checked(command: bytes) -> str | None:
    """The name of the PIN a command checks, if it checks one."""
    if command[1] == Ins.RESET_RETRY_COUNTER:
        return PIN_NAMES[Pin.SO]
    if command[1] in (Ins.VERIFY, Ins.CHANGE_REFERENCE_DATA) and command[3] in Pin._value2member_map_:
        return PIN_NAMES[Pin(command[3])]
    return None


def _no_service(result: int) -> str:
    if result in (scard.SCARD_E_NO_SERVICE, scard.SCARD_E_SERVICE_STOPPED):
        return (
            "the PC/SC service pcscd is not running: start it (mkdir -p /run/pcscd; pcscd -f, or"
            " systemctl start pcscd.socket) and try again"
        )
    return f"PC/SC is unavailable: {scard.SCardGetErrorMessage(result)} (0x{result & 0xFFFFFFFF:08X})"


class SmartCardKeyHolder(KeyHolder):
    """The ISCL keys of a card: open it with the card-holder PIN; safe to share between threads."""

    host_record_keys = True  # derive_key returns host DesKeys

    def __init__(self, pin: str, reader: str | None = None, wait_card: float = 0.0) -> None:
        self_test_once()
        self._channel = CardChannel(reader, wait_card)
        self.description = self._channel.description
        self._lock = threading.RLock()
        self._outstanding: OrderedDict[tuple[int, bytes], None] = OrderedDict()
        self._card_challenge: bytes | None = None
        try:
            self._channel.verify_pin(pin)
        except BaseException:
            self._channel.close()
            raise

    def __repr__(self) -> str:
        return f"<SmartCardKeyHolder {self.description}>"

    @property
    def channel(self) -> CardChannel:
        return self._channel

    def get_challenge(self, key_id: int) -> bytes:
        with self._lock:
            challenge = self._channel.check(apdu.command(Ins.GET_CHALLENGE, le=BLOCK), "GET CHALLENGE", BLOCK)
            self._card_challenge = challenge
            self._outstanding[(key_id, challenge)] = None
            while len(self._outstanding) > MAX_OUTSTANDING:
                self._outstanding.popitem(last=False)
        return challenge

    def internal_authenticate(self, key_id: int, block: bytes) -> bytes:
        return self._internal("auth", key_id, block)

    def external_authenticate(self, key_id: int, challenge: bytes, cryptogram: bytes) -> bool:
        challenge, cryptogram = bytes(challenge), bytes(cryptogram)
        with self._lock:
            if self._outstanding.pop((key_id, challenge), 1) is not None:
                return False  # never issued, or already used: a replay
            on_card = challenge == self._card_challenge
            if on_card:
                self._card_challenge = None
                command = apdu.command(Ins.EXTERNAL_AUTHENTICATE, 0, apdu.key_reference("auth", key_id), cryptogram)
                _, sw = self._channel.transmit(command, "EXTERNAL AUTHENTICATE")
                if sw in (Sw.OK, Sw.AUTHENTICATION_FAILED):
                    return sw == Sw.OK
                raise self._channel.status_error(sw, "EXTERNAL AUTHENTICATE", command)
        return hmac.compare_digest(self._internal("auth", key_id, challenge), cryptogram)

    def derive_key(self, enc_key_id: int, block: bytes) -> RecordKey:
        return DesKey(fix_parity(self._internal("enc", enc_key_id, block)))

    def _internal(self, purpose: str, key_id: int, block: bytes) -> bytes:
        command = apdu.command(Ins.INTERNAL_AUTHENTICATE, 0, apdu.key_reference(purpose, key_id), bytes(block),
                               le=BLOCK)
        return self._channel.check(command, f"INTERNAL AUTHENTICATE with {purpose} key {key_id}", BLOCK)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
