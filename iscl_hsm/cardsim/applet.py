"""The ISCL card application: one command APDU in, one response APDU out; no sockets, no clock.

It behaves as docs/smart-cards.md says a real card must:

* SELECT by AID opens the application; every other command before it answers 6A82.
* VERIFY counts failures per PIN and blocks at zero (6983); a correct PIN resets the counter.
  VERIFY without data tells the state (9000 verified, 63Cx not yet, 6983 blocked).
* GET CHALLENGE keeps the last challenge; the next EXTERNAL AUTHENTICATE consumes it whatever its
  outcome, so a replayed cryptogram finds no challenge (6985). INTERNAL AUTHENTICATE and other
  commands in between leave it alone (the ISCL handshake derives a key meanwhile).
* INTERNAL / EXTERNAL AUTHENTICATE need the card-holder PIN; PUT KEY needs the security-officer PIN.
* Power-off or reset forgets the selection, the verified PINs and the challenge.

Failed EXTERNAL AUTHENTICATE attempts are not counted against the key: a peer on the network could
otherwise block the card by sending wrong cryptograms.

The keys are in the card file or in a PKCS#11 token (:mod:`.keys`); a token failure other than a
missing key answers 6F00 and is logged, so the host sees a failed command rather than a dead card.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable

from ..errors import KeyHolderError
from ..keyholder import apdu
from ..keyholder.apdu import BLOCK, KEY_LENGTHS, MAX_PIN, Command, Ins, Pin, Sw
from .keys import CardKeys, FileKeys
from .state import CardState, PinRecord

log = logging.getLogger(__name__)

_PIN_ROLES = {Pin.USER: "user", Pin.SO: "so"}


def _sw(sw: int, data: bytes = b"") -> bytes:
    return data + sw.to_bytes(2, "big")


class IsclApplet:
    """The card: its persistent :class:`CardState`, its keys (default: in the state's file) and the
    volatile state of one power cycle."""

    def __init__(self, state: CardState, keys: CardKeys | None = None) -> None:
        self.state = state
        self.keys = keys or FileKeys(state)
        self._selected = False
        self._verified: set[Pin] = set()
        self._challenge: bytes | None = None
        self._handlers: dict[int, Callable[[Command], bytes]] = {
            Ins.SELECT: self._select,
            Ins.VERIFY: self._verify,
            Ins.CHANGE_REFERENCE_DATA: self._change_reference_data,
            Ins.RESET_RETRY_COUNTER: self._reset_retry_counter,
            Ins.GET_CHALLENGE: self._get_challenge,
            Ins.INTERNAL_AUTHENTICATE: self._internal_authenticate,
            Ins.EXTERNAL_AUTHENTICATE: self._external_authenticate,
            Ins.PUT_KEY: self._put_key,
        }

    def power_off(self) -> None:
        """Forget everything volatile, as a card does when the reader cuts its power or resets it."""
        self._selected = False
        self._verified.clear()
        self._challenge = None

    def process(self, raw: bytes) -> bytes:
        """Answer one command APDU with data + SW1 SW2."""
        try:
            cmd = Command.parse(raw)
        except ValueError:
            return _sw(Sw.WRONG_LENGTH)
        if cmd.cla != (apdu.CLA_PROPRIETARY if cmd.ins == Ins.PUT_KEY else apdu.CLA):
            return _sw(Sw.CLA_NOT_SUPPORTED)
        handler = self._handlers.get(cmd.ins)
        if handler is None:
            return _sw(Sw.INS_NOT_SUPPORTED)
        if not self._selected and cmd.ins != Ins.SELECT:
            return _sw(Sw.APPLICATION_NOT_FOUND)
        try:
            return handler(cmd)
        except KeyHolderError as exc:
            log.error("answering 6F00 to %s: %s", apdu.describe(raw), exc)
            return _sw(Sw.NO_PRECISE_DIAGNOSIS)

    # --- commands -----------------------------------------------------------------------------

    def _select(self, cmd: Command) -> bytes:
        if cmd.p1 != apdu.SELECT_BY_NAME or cmd.p2 not in (0x00, apdu.SELECT_NO_RESPONSE_DATA):
            return _sw(Sw.WRONG_P1_P2)
        if cmd.data != apdu.AID:
            self.power_off()
            return _sw(Sw.APPLICATION_NOT_FOUND)
        self._selected = True
        self._verified.clear()
        self._challenge = None
        return _sw(Sw.OK)

    def _pin(self, p2: int) -> tuple[Pin, str] | None:
        return (Pin(p2), _PIN_ROLES[Pin(p2)]) if p2 in _PIN_ROLES else None

    def _check_pin(self, reference: Pin, role: str, block: bytes) -> int:
        """Compare ``block`` with a PIN, counting the failure or resetting the counter."""
        record = self.state.pins[role]
        if record.blocked:
            return Sw.BLOCKED
        if record.matches(block):
            if record.tries_left != record.max_tries:
                record.tries_left = record.max_tries
                self.state.save()
            self._verified.add(reference)
            return Sw.OK
        record.tries_left -= 1
        self._verified.discard(reference)
        self.state.save()
        return Sw.BLOCKED if record.blocked else apdu.tries_left_sw(record.tries_left)

    def _verify(self, cmd: Command) -> bytes:
        pin = self._pin(cmd.p2)
        if cmd.p1 != 0 or pin is None:
            return _sw(Sw.WRONG_P1_P2)
        reference, role = pin
        record = self.state.pins[role]
        if not cmd.data:  # ISO 7816-4: VERIFY without data asks for the state
            if record.blocked:
                return _sw(Sw.BLOCKED)
            return _sw(Sw.OK if reference in self._verified else apdu.tries_left_sw(record.tries_left))
        if len(cmd.data) != MAX_PIN:
            return _sw(Sw.WRONG_LENGTH)
        return _sw(self._check_pin(reference, role, cmd.data))

    def _change_reference_data(self, cmd: Command) -> bytes:
        """P1 00, data = current PIN block || new PIN block."""
        pin = self._pin(cmd.p2)
        if cmd.p1 != 0 or pin is None:
            return _sw(Sw.WRONG_P1_P2)
        if len(cmd.data) != 2 * MAX_PIN:
            return _sw(Sw.WRONG_LENGTH)
        reference, role = pin
        status = self._check_pin(reference, role, cmd.data[:MAX_PIN])
        if status != Sw.OK:
            return _sw(status)
        return _sw(self._set_pin(role, cmd.data[MAX_PIN:]))

    def _reset_retry_counter(self, cmd: Command) -> bytes:
        """P1 00, P2 81, data = security-officer PIN block || new card-holder PIN block."""
        if cmd.p1 != 0 or cmd.p2 != Pin.USER:
            return _sw(Sw.WRONG_P1_P2)
        if len(cmd.data) != 2 * MAX_PIN:
            return _sw(Sw.WRONG_LENGTH)
        status = self._check_pin(Pin.SO, "so", cmd.data[:MAX_PIN])
        if status != Sw.OK:
            return _sw(status)
        return _sw(self._set_pin("user", cmd.data[MAX_PIN:]))

    def _set_pin(self, role: str, block: bytes) -> int:
        try:
            text = block.rstrip(bytes([apdu.PIN_PAD])).decode("ascii")
            record = PinRecord.new(text, self.state.pins[role].max_tries)
        except ValueError:
            return Sw.WRONG_DATA
        self.state.pins[role] = record
        self._verified.discard(Pin.USER if role == "user" else Pin.SO)
        self.state.save()
        return Sw.OK

    def _get_challenge(self, cmd: Command) -> bytes:
        if cmd.p1 or cmd.p2:
            return _sw(Sw.WRONG_P1_P2)
        if cmd.data or cmd.le != BLOCK:
            return _sw(Sw.WRONG_LENGTH)
        self._challenge = secrets.token_bytes(BLOCK)
        return _sw(Sw.OK, self._challenge)

    def _keyed(self, cmd: Command, purposes: tuple[str, ...]) -> tuple[str, int] | int:
        """The key slot P2 names, or the status word that says why it cannot be used."""
        reference = apdu.parse_key_reference(cmd.p2)
        if cmd.p1 != 0 or reference is None or reference[0] not in purposes:
            return Sw.WRONG_P1_P2
        if len(cmd.data) != BLOCK:
            return Sw.WRONG_LENGTH
        if Pin.USER not in self._verified:
            return Sw.BLOCKED if self.state.pins["user"].blocked else Sw.SECURITY_STATUS_NOT_SATISFIED
        return reference

    def _internal_authenticate(self, cmd: Command) -> bytes:
        slot = self._keyed(cmd, ("auth", "enc"))
        if isinstance(slot, int):
            return _sw(slot)
        result = self.keys.encrypt(*slot, cmd.data)
        return _sw(Sw.REFERENCE_NOT_FOUND) if result is None else _sw(Sw.OK, result)

    def _external_authenticate(self, cmd: Command) -> bytes:
        slot = self._keyed(cmd, ("auth",))
        if isinstance(slot, int):
            return _sw(slot)
        challenge, self._challenge = self._challenge, None  # consumed whatever the outcome
        expected = self.keys.encrypt(*slot, challenge or bytes(BLOCK))  # a missing key says so first
        if expected is None:
            return _sw(Sw.REFERENCE_NOT_FOUND)
        if challenge is None:
            return _sw(Sw.CONDITIONS_NOT_SATISFIED)
        return _sw(Sw.OK if hmac.compare_digest(expected, cmd.data) else Sw.AUTHENTICATION_FAILED)

    def _put_key(self, cmd: Command) -> bytes:
        """CLA 80 INS D8, P2 = key reference, data = the key; answers with its 3-byte KCV.

        A card whose keys live elsewhere (a token) answers 6A81 before looking at anything else,
        so the host can ask with an empty PUT KEY before a ceremony starts.
        """
        if not self.keys.loads_keys:
            return _sw(Sw.FUNCTION_NOT_SUPPORTED)
        reference = apdu.parse_key_reference(cmd.p2)
        if cmd.p1 != 0 or reference is None:
            return _sw(Sw.WRONG_P1_P2)
        if len(cmd.data) not in KEY_LENGTHS:
            return _sw(Sw.WRONG_LENGTH)
        if Pin.SO not in self._verified:
            return _sw(Sw.BLOCKED if self.state.pins["so"].blocked else Sw.SECURITY_STATUS_NOT_SATISFIED)
        return _sw(Sw.OK, self.keys.store(*reference, cmd.data))
