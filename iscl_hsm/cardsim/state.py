"""The virtual card's memory: keys, PINs and retry counters, persisted in one JSON file.

The file (mode 0600) is the card's EEPROM, so provisioning and blocked PINs survive a restart::

    {
      "format": "iscl-virtual-card/1",
      "atr": "3B80800101",
      "pins": {
        "user": {"salt": "<16 hex>", "sha256": "<64 hex>", "max_tries": 3, "tries_left": 3},
        "so":   {"salt": "<16 hex>", "sha256": "<64 hex>", "max_tries": 3, "tries_left": 3}
      },
      "keys": {"auth-1": "<16, 32 or 48 hex>", "enc-1": "..."}
    }

PINs are kept as SHA-256(salt || PIN). Keys are kept in clear: this is a card for tests, demos and
ceremony practice, and its file must be treated like the keys themselves. Every change is written at
once, atomically (a temporary file renamed over the old one).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import ErrorCode, KeyHolderError
from ..keyholder.apdu import KEY_LENGTHS, pin_block
from ..shared import doc_reference

FORMAT: Final = "iscl-virtual-card/1"
DEFAULT_ATR: Final = bytes.fromhex("3B80800101")
"""T=1, no historical bytes: what vpcd and pcscd accept."""
DEFAULT_TRIES: Final = 3
PIN_ROLES: Final = ("user", "so")


@dataclass
class PinRecord:
    """One PIN: its salted hash and its retry counter."""

    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)
    max_tries: int = DEFAULT_TRIES
    tries_left: int = DEFAULT_TRIES

    @classmethod
    def new(cls, pin: str, max_tries: int = DEFAULT_TRIES) -> PinRecord:
        salt = secrets.token_bytes(8)
        return cls(salt, _digest(salt, pin_block(pin)), max_tries, max_tries)

    def matches(self, block: bytes) -> bool:
        """Compare an 8-byte VERIFY block with the PIN, in constant time."""
        return hmac.compare_digest(_digest(self.salt, block), self.digest)

    @property
    def blocked(self) -> bool:
        return self.tries_left == 0


def _digest(salt: bytes, block: bytes) -> bytes:
    return hashlib.sha256(salt + block).digest()


@dataclass
class CardState:
    """Everything the card remembers across power cycles; ``path`` is where it lives (None: memory only)."""

    pins: dict[str, PinRecord]
    keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    atr: bytes = DEFAULT_ATR
    path: Path | None = None

    @classmethod
    def new(cls, user_pin: str, so_pin: str, max_tries: int = DEFAULT_TRIES) -> CardState:
        return cls({"user": PinRecord.new(user_pin, max_tries), "so": PinRecord.new(so_pin, max_tries)})

    def key(self, purpose: str, index: int) -> bytes | None:
        return self.keys.get(f"{purpose}-{index}")

    def set_key(self, purpose: str, index: int, value: bytes) -> None:
        if len(value) not in KEY_LENGTHS:
            raise ValueError(f"a card key is 8, 16 or 24 bytes long, not {len(value)}")
        self.keys[f"{purpose}-{index}"] = bytes(value)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "atr": self.atr.hex().upper(),
            "pins": {
                role: {"salt": p.salt.hex(), "sha256": p.digest.hex(), "max_tries": p.max_tries,
                       "tries_left": p.tries_left}
                for role, p in self.pins.items()
            },
            "keys": {name: value.hex().upper() for name, value in sorted(self.keys.items())},
        }

    def save(self) -> None:
        """Write the file atomically; a card without a file keeps its state in memory only."""
        if self.path is None:
            return
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(self.to_json(), handle, indent=2)
                handle.write("\n")
            os.replace(temporary, self.path)
        except OSError as exc:
            raise KeyHolderError(
                f"cannot write the virtual card file {self.path}: {exc.strerror}; check its directory"
            ) from None

    def create(self, path: Path) -> None:
        """Write a new card file at ``path``, refusing to overwrite one."""
        if path.exists():
            raise KeyHolderError(
                f"the virtual card file {path} exists already; name a new file", ErrorCode.BAD_OPTION
            )
        self.path = path
        self.save()

    @classmethod
    def load(cls, path: Path) -> CardState:
        """Read a card file; a missing or malformed file is one clear error."""
        try:
            document = json.loads(path.read_text())
        except OSError as exc:
            raise KeyHolderError(
                f"cannot read the virtual card file {path}: {exc.strerror}; create one with 'iscl card init'",
                ErrorCode.BAD_OPTION,
            ) from None
        except ValueError:
            raise KeyHolderError(f"the virtual card file {path} is not JSON", ErrorCode.BAD_OPTION) from None
        try:
            if document["format"] != FORMAT:
                raise ValueError(f"format {document['format']!r} is not {FORMAT!r}")
            pins = {
                role: PinRecord(bytes.fromhex(p["salt"]), bytes.fromhex(p["sha256"]), int(p["max_tries"]),
                                int(p["tries_left"]))
                for role, p in document["pins"].items()
            }
            if sorted(pins) != sorted(PIN_ROLES):
                raise ValueError("it needs a 'user' and an 'so' PIN")
            state = cls(pins, atr=bytes.fromhex(document["atr"]), path=path)
            for name, value in document["keys"].items():
                purpose, _, index = name.partition("-")
                if purpose not in ("auth", "enc") or index not in [str(i) for i in range(1, 9)]:
                    raise ValueError(f"{name!r} is not a key slot (auth-1..auth-8, enc-1..enc-8)")
                state.set_key(purpose, int(index), bytes.fromhex(value))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise KeyHolderError(
                f"the virtual card file {path} is malformed ({detail}); see {doc_reference('smart-cards.md')} for"
                " the format",
                ErrorCode.BAD_OPTION,
            ) from None
        return state
