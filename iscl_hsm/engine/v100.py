"""The V1.00 profile: ISCL as the LEADTOOLS SDK's header describes it (docs/protocol.md, "Profiles").

* Payloads are the SDK builders' fields and nothing else (wire.V100_LAYOUT); no handshake MACs.
* Encryption keys 1..8 are used as they are: encryption key N is the DES key of every message, in
  both directions, and the key of DES-MAC. Unique session keys (0x10) are parity(E_EK[N](R)), N the
  authentication key pair and R the sender's random number: one INTERNAL AUTHENTICATE on a card, one
  CKM_DES_ECB_ENCRYPT_DATA derivation on a token (CHOICE: the SDK does not say how).
* One CBC chain per link, zero at link-up, shared by both directions and running on over data and
  MAC blocks; so one transmission at a time (the transfer machine's half-duplex rule).
* Padding always 1..8 bytes of RFC 1423 / PKCS#5 (CHOICE of variant), on the data and on the MAC
  block, checked only after the MAC verifies.
* The MAC covers the message alone. MD5 is an unkeyed digest encrypted with the data's cipher (plain
  when encryption is none, which the SDK does and this end allows only when told to); a receiver
  also accepts PS3.15's other order, MD5(message || E_K(R)) (wire.Md5Order).
"""

from __future__ import annotations

from .. import wire
from ..errors import ErrorCode, KeyHolderError
from ..keyholder.base import KeyHolder, RecordKey
from ..wire import Encryption, Mac, Md5Order
from .config import Config, Profile
from .profile import LinkKeys, Transcript, WireProfile, suite_of
from .record import ZERO_IV, Chain, MacState, MessageKeys, RecordFormat, Suite, same


class NoTranscript(Transcript):
    """V1.00 has no handshake MACs, so nothing is kept."""

    def sent(self, frame: bytes) -> None:
        pass

    def received(self, frame: bytes) -> None:
        pass

    def digest(self, *, before_last_received: bool = False) -> bytes:
        return b""


class V100Keys(LinkKeys):
    """Encryption key N itself (key ids 1..8), or a session key per message (0x10).

    Both directions and DES-MAC use the same key, as the SDK's one "session key" member does.
    Every suite but none/none needs the key: even with encryption none, MD5's second order and
    DES-MAC are keyed.
    """

    def __init__(self, holder: KeyHolder, suite: Suite, pair_id: int, rs: bytes, *, client: bool) -> None:
        super().__init__(holder, suite, pair_id, rs, client=client)
        self._needs_keys = suite.encryption is not Encryption.NONE or suite.mac is not Mac.NONE
        self.uses_encryption_key = self._needs_keys and not suite.session_keys
        self._key: RecordKey | None = None

    def proof(self, label: bytes, transcript: bytes) -> bytes:
        return b""

    def require(self) -> None:
        if self.uses_encryption_key and self._key is None:
            self._key = self.holder.encryption_key(self.suite.key_id)

    def ahead(self) -> None:
        self.require()

    def ahead_pending(self) -> bool:
        return self.uses_encryption_key and self._key is None

    def keys(self, outbound: bool, random: bytes | None) -> MessageKeys | None:
        if not self._needs_keys:
            return None
        if self.suite.session_keys:
            assert random is not None
            key = self.holder.derive_key(self.pair_id, random)
        else:
            self.require()
            assert self._key is not None
            key, random = self._key, self.rs
        return MessageKeys(key, key if self.suite.mac is Mac.DES_MAC else None, random)

    def holder_free(self) -> bool:
        if not self._needs_keys:
            return True
        return self._key is not None and self._key.in_process

    def completion_on_host(self) -> bool:
        return not self.ahead_pending()


class V100Record(RecordFormat):
    """PKCS#5 padding; the MAC over the message alone, padded and encrypted in the chain with DES-CBC."""

    def __init__(self, suite: Suite, md5_order: Md5Order, allow_unkeyed_md5: bool) -> None:
        super().__init__(suite)
        self._size = wire.MAC_SIZE[suite.mac]
        self._md5_order = md5_order
        self._unkeyed_ok = self.encrypts or allow_unkeyed_md5  # plain MD5 is keyed once encrypted

    def wire_length(self, length: int) -> int:
        return length + 8 - length % 8 if self.encrypts else length

    def padding(self, length: int) -> bytes:
        return wire.pad_pkcs5(length)

    def padding_ok(self, padding: bytes) -> bool:
        return wire.is_pkcs5_padding(padding) if self.encrypts else not padding

    def new_mac(self, keys: MessageKeys | None, chain: Chain, length: int) -> MacState:
        return MacState(self.suite.mac, keys.mac if keys else None)

    def seal_mac(self, mac: MacState, keys: MessageKeys | None, chain: Chain) -> bytes:
        if self.suite.mac is Mac.NONE:
            return b""
        random_first = self.suite.mac is Mac.MD5 and self._md5_order is Md5Order.ENCRYPT_RANDOM
        digest = mac.digest(_encrypted_random(keys) if random_first else b"")
        if not self.encrypts:
            return digest
        assert keys is not None
        return chain.encrypt(keys.cipher, digest + wire.pad_pkcs5(len(digest)))

    def mac_verifies(self, mac: MacState, keys: MessageKeys | None, chain: Chain, payload: bytes) -> bool:
        if self.suite.mac is Mac.NONE:
            return not payload
        received: bytes = payload
        if self.encrypts:
            if len(payload) != self._size + 8:
                return False
            assert keys is not None
            plain = chain.decrypt(keys.cipher, payload)
            received, padding = plain[: self._size], plain[self._size :]
            if not wire.is_pkcs5_padding(padding):
                return False
        if len(received) != self._size:
            return False
        if self.suite.mac is Mac.DES_MAC:
            return same(mac.digest(), received)
        # MD5: either PS3.15 order; both are compared, so the time does not tell which one matched.
        output_first = same(mac.digest(), received) and self._unkeyed_ok
        random_first = keys is not None and same(mac.digest(_encrypted_random(keys)), received)
        return output_first or random_first


def _encrypted_random(keys: MessageKeys | None) -> bytes:
    """E_K(R): the random number encrypted (one block) under the message's key."""
    assert keys is not None
    return keys.cipher.encrypt_cbc(ZERO_IV, keys.random)


class V100Profile(WireProfile):
    profile = Profile.V100
    layout = wire.V100_LAYOUT
    half_duplex = True
    uniform_auth_failure = True

    def check_key_holder(self, config: Config, holder: KeyHolder) -> None:
        """Encryption keys 1..8 are used as they are, which a key holder must be able to give."""
        keys = V100Keys(holder, suite_of(config), config.auth_key_id, b"", client=True)
        if keys.uses_encryption_key and not holder.gives_encryption_keys:
            raise KeyHolderError(
                f"V1.00 links with encryption key {config.enc_key_id} use that key itself as the DES key, and"
                f" {holder.description} never gives a key out: use unique session keys (--enc-key-id session),"
                " which it derives for each message, or the hardened profile (--profile hardened)",
                ErrorCode.BAD_OPTION,
            )

    def transcript(self) -> Transcript:
        return NoTranscript()

    def link_keys(self, holder: KeyHolder, config: Config, pair_id: int, rs: bytes, *, client: bool) -> LinkKeys:
        return V100Keys(holder, suite_of(config), pair_id, rs, client=client)

    def record_format(self, config: Config) -> RecordFormat:
        return V100Record(suite_of(config), config.md5_order, config.allow_unkeyed_md5)

    def chains(self) -> tuple[Chain, Chain]:
        chain = Chain()
        return chain, chain


V100 = V100Profile()
