"""The two wire profiles behind one small interface (docs/protocol.md, "Profiles").

A :class:`WireProfile` is chosen from ``Config.profile`` when a Connection is made. It supplies what
differs between V1.00 and hardened: the payload layouts (:class:`iscl_hsm.wire.Layout`), the
handshake transcript and its MACs, where record keys come from (:class:`LinkKeys`), the CBC chains,
and the record format (padding and MAC, :class:`~iscl_hsm.engine.record.RecordFormat`). The
handshake and transfer machines ask it; they never test which profile they run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from .. import wire
from ..keyholder.base import KeyHolder
from .config import Config, Profile
from .record import Chain, MessageKeys, RecordFormat, Suite


class Transcript(ABC):
    """The handshake frames as they were on the wire, for the handshake MACs (hardened only)."""

    @abstractmethod
    def sent(self, frame: bytes) -> None:
        """Add a handshake frame this end sent."""

    @abstractmethod
    def received(self, frame: bytes) -> None:
        """Add a handshake frame the peer sent (remembering the digest before it)."""

    @abstractmethod
    def digest(self, *, before_last_received: bool = False) -> bytes:
        """The digest so far, or as it was before the last frame received."""


class LinkKeys(ABC):
    """One link's keys, from the moment the server's challenge RS is known.

    Record keys for every message, and in the hardened profile the key of the handshake MACs.
    ``ahead`` does key-holder work before it is needed (Connection.prepare), ``require`` makes sure
    the handshake fails, with the peer told why, when the keys cannot be had.
    """

    def __init__(self, holder: KeyHolder, suite: Suite, pair_id: int, rs: bytes, *, client: bool) -> None:
        self.holder = holder
        self.suite = suite
        self.pair_id = pair_id
        self.rs = rs
        self.rc = b""
        self.client = client

    def client_challenge(self, rc: bytes) -> None:
        """Both challenges are known now."""
        self.rc = rc

    @abstractmethod
    def proof(self, label: bytes, transcript: bytes) -> bytes:
        """The handshake MAC over a transcript digest (b"" when the profile has none)."""

    @abstractmethod
    def require(self) -> None:
        """Raise KeyHolderError now, during the handshake, if the link's record keys cannot be had."""

    @abstractmethod
    def ahead(self) -> None:
        """Get from the key holder, now, whatever keys can already be had."""

    @abstractmethod
    def ahead_pending(self) -> bool:
        """True while :meth:`ahead` still has key-holder work to do."""

    @abstractmethod
    def keys(self, outbound: bool, random: bytes | None) -> MessageKeys | None:
        """The keys of one message; ``random`` is its session-key random number (key id 0x10)."""

    @abstractmethod
    def holder_free(self) -> bool:
        """True when the next messages need no key-holder call (keys at hand, computed in this process)."""

    @abstractmethod
    def completion_on_host(self) -> bool:
        """True when the server's check of COMPLETION (and a request right behind it) needs no key-holder call."""


class WireProfile(ABC):
    """What a profile decides; one instance per profile, shared by every link."""

    profile: Profile
    layout: wire.Layout
    half_duplex: bool
    """One transmission at a time on the link (V1.00: one CBC chain serves both directions)."""
    uniform_auth_failure: bool
    """Every authentication failure is told to the peer with the same NAK (V1.00)."""

    def check_key_holder(self, config: Config, holder: KeyHolder) -> None:
        """Raise KeyHolderError now if ``holder`` cannot serve links of ``config`` at all."""

    @abstractmethod
    def transcript(self) -> Transcript:
        """A fresh transcript for one handshake."""

    @abstractmethod
    def link_keys(self, holder: KeyHolder, config: Config, pair_id: int, rs: bytes, *, client: bool) -> LinkKeys:
        """The keys of one link whose server challenge is ``rs``."""

    @abstractmethod
    def record_format(self, config: Config) -> RecordFormat:
        """How this link's messages are padded and MACed."""

    @abstractmethod
    def chains(self) -> tuple[Chain, Chain]:
        """The (outbound, inbound) CBC chains of a new link, each from a zero IV."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.profile.value}>"


def suite_of(config: Config) -> Suite:
    """The suite this end's messages use, and the one it accepts."""
    return Suite(config.encryption, config.enc_key_id, config.mac)


def check_key_holder(config: Config, holder: KeyHolder) -> None:
    """Raise KeyHolderError if ``holder`` can never serve links of ``config`` (servers call it before
    they listen, so a hopeless configuration fails at start rather than on every link)."""
    profile_for(config).check_key_holder(config, holder)


_PROFILES: dict[Profile, WireProfile] = {}
"""The profile objects by name, filled when first asked (the modules that define them import this one)."""


def profile_for(config: Config) -> WireProfile:
    """The profile object ``config`` names."""
    if not _PROFILES:
        from .hardened import HARDENED
        from .v100 import V100

        _PROFILES.update({Profile.V100: V100, Profile.HARDENED: HARDENED})
    return _PROFILES[config.profile]
