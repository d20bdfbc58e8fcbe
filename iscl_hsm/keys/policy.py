"""Dual control: the token's policy and its witnesses, kept in the token itself (not in a local file).

The policy
----------
A private token data object (CKO_DATA, CKA_APPLICATION "iscl-hsm policy", CKA_LABEL "iscl-policy")
holds JSON: ``{"dual_control": true, "set": UTC, "officer": NAME, "witness": NAME or null}``. A data
object's value cannot change, so a new setting is a new object, and the older ones are destroyed
after it is stored. The policy is read *fail-closed*: if any policy object says on, or cannot be
read, dual control is on; so an interrupted change never switches it off. No object: off.

Witnesses
---------
One private token data object per witness (CKA_APPLICATION "iscl-hsm witness", CKA_LABEL
"iscl-witness-NAME") holds JSON: name, added (UTC), officer (who added the witness), and the scrypt
hash of the witness's passphrase: kdf "scrypt", n, r, p, salt (16 random bytes) and hash (32 bytes),
in hex. Never the passphrase.

Why scrypt with N=2^17, r=8, p=1 (128 MiB and about half a second per try, OWASP's setting): anyone
logged in with the user PIN can read a private data object, so the very officer the witness is
there to check can read the hash and guess offline. A memory-hard function makes every guess cost
that memory, which graphics cards do not make cheap as they do PBKDF2. The parameters are stored
with each hash, so they can be raised later without making older witnesses invalid.

What the token cannot enforce
-----------------------------
SoftHSM2 lets the SO create public objects only, so these objects are created in the user's
session, and someone with the user PIN and a raw PKCS#11 tool could destroy or create them. ``iscl
keys`` asks for the SO PIN for every change and writes each one to the audit log; ``iscl keys policy
show`` and ``iscl keys witness list`` say when and by whom each was set, so an auditor comparing them
with the log sees a change made outside ``iscl keys``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Final

from pkcs11 import Attribute

from iscl_hsm.errors import ErrorCode, KeyHolderError
from iscl_hsm.keyholder.data_objects import create_data_object, data_objects
from iscl_hsm.keyholder.key_records import utc_text
from iscl_hsm.keys.store import KeyStore

__all__ = [
    "MIN_PASSPHRASE",
    "POLICY_APPLICATION",
    "WITNESS_APPLICATION",
    "DualControl",
    "Policy",
    "Witness",
    "hash_passphrase",
    "passphrase_matches",
    "same_name",
]

POLICY_APPLICATION: Final = "iscl-hsm policy"
POLICY_LABEL: Final = "iscl-policy"
WITNESS_APPLICATION: Final = "iscl-hsm witness"
WITNESS_PREFIX: Final = "iscl-witness-"
MIN_PASSPHRASE: Final = 8
SCRYPT: Final = {"n": 2**17, "r": 8, "p": 1}
"""The cost of a new witness hash (see the module text); stored with the hash."""
_MAXMEM: Final = 512 * 1024 * 1024
"""What a stored hash may ask for: room to raise SCRYPT later, a bound for a forged record."""
_NAME: Final = re.compile(r"\w(?:[\w .@'-]{0,62}[\w.])?")


def same_name(a: str, b: str) -> bool:
    """Do two names (officer, witness) name the same person? Case and outer spaces do not count."""
    return a.strip().casefold() == b.strip().casefold()


def check_name(name: str) -> str:
    """A witness name as stored: 1..64 letters, digits, spaces and . @ ' - (it becomes an object label)."""
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise KeyHolderError(
            f"witness name {name!r} is not a name of 1 to 64 letters, digits, spaces and . @ ' -",
            ErrorCode.BAD_OPTION,
        )
    return name


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    data = unicodedata.normalize("NFC", passphrase).encode("utf-8")  # the same text from any keyboard
    return hashlib.scrypt(data, salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)


def hash_passphrase(passphrase: str) -> dict[str, Any]:
    """The stored form of a passphrase: scrypt parameters, a random salt and the hash (hex)."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise KeyHolderError(
            f"a witness passphrase has at least {MIN_PASSPHRASE} characters; choose a longer one"
            " (a few unrelated words are easy to type and hard to guess)",
            ErrorCode.BAD_OPTION,
        )
    salt = secrets.token_bytes(16)
    return {"kdf": "scrypt", **SCRYPT, "salt": salt.hex(), "hash": _derive(passphrase, salt, **SCRYPT).hex()}


def passphrase_matches(stored: dict[str, Any], passphrase: str) -> bool:
    """Does ``passphrase`` give the hash :func:`hash_passphrase` stored? (Constant-time comparison.)

    Raises ValueError (or KeyError, TypeError) for a stored form that is not one.
    """
    if stored["kdf"] != "scrypt":
        raise ValueError(f"unknown kdf {stored['kdf']!r}")
    got = _derive(
        passphrase, bytes.fromhex(stored["salt"]), int(stored["n"]), int(stored["r"]), int(stored["p"])
    )
    return hmac.compare_digest(got, bytes.fromhex(stored["hash"]))


@dataclass(frozen=True)
class Policy:
    """The token's dual-control setting, and when and by whom it was set (None: never set)."""

    dual_control: bool
    set: str | None = None
    officer: str | None = None
    witness: str | None = None
    damaged: bool = False
    """An unreadable policy object was found (and counts as on)."""


@dataclass(frozen=True)
class Witness:
    """A registered second officer; ``stored`` is the passphrase hash (None: the record is damaged)."""

    name: str
    added: str | None
    officer: str | None
    stored: dict[str, Any] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "added": self.added,
            "officer": self.officer,
            "damaged": self.stored is None,
        }


class DualControl:
    """The policy and witness objects on the token of an open :class:`KeyStore`."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    # -- the policy ---------------------------------------------------------------------------------

    def policy(self) -> Policy:
        """The token's policy, read fail-closed (see the module text)."""
        with self.store.session("read its dual-control policy") as session:
            found = [record for _, record in data_objects(session, POLICY_APPLICATION)]
        records = [record for record in found if record is not None]
        if len(records) < len(found):
            return Policy(True, damaged=True)
        if not records:
            return Policy(False)
        on = [record for record in records if record.get("dual_control") is not False]
        chosen = max(on or records, key=lambda record: str(record.get("set")))
        return Policy(bool(on), chosen.get("set"), chosen.get("officer"), chosen.get("witness"))

    def set_policy(self, dual_control: bool, *, officer: str | None, witness: str | None) -> Policy:
        """Store the new setting, then destroy the older ones (all of them: a damaged one too)."""
        policy = Policy(dual_control, utc_text(), officer, witness)
        record = {"dual_control": dual_control, "set": policy.set, "officer": officer, "witness": witness}
        with self.store.session("change its dual-control policy") as session:
            older = [obj for obj, _ in data_objects(session, POLICY_APPLICATION)]
            create_data_object(session, POLICY_APPLICATION, POLICY_LABEL, record)
            for obj in older:
                obj.destroy()
        return policy

    # -- witnesses ----------------------------------------------------------------------------------

    def _witnesses(self, session: Any) -> list[tuple[Any, Witness]]:
        found = []
        for obj, record in data_objects(session, WITNESS_APPLICATION):
            label = str(obj[Attribute.LABEL] or "")
            if (
                record is not None
                and isinstance(record.get("name"), str)
                and isinstance(record.get("hash"), dict)
            ):
                witness = Witness(record["name"], record.get("added"), record.get("officer"), record["hash"])
            else:  # damaged: still listed, and removable, by the name in its label
                witness = Witness(label.removeprefix(WITNESS_PREFIX), None, None, None)
            found.append((obj, witness))
        found.sort(key=lambda item: item[1].name.casefold())
        return found

    def witnesses(self) -> list[Witness]:
        """The registered witnesses, by name."""
        with self.store.session("list its witnesses") as session:
            return [witness for _, witness in self._witnesses(session)]

    def find(self, name: str) -> Witness | None:
        """The witness called ``name`` (case does not count), or None."""
        return next((w for w in self.witnesses() if same_name(w.name, name)), None)

    def add_witness(self, name: str, passphrase: str, *, officer: str | None) -> Witness:
        """Register ``name`` with the hash of ``passphrase``; refuse a name already registered."""
        name = check_name(name)
        stored = hash_passphrase(passphrase)
        with self.store.session(f"register witness '{name}'") as session:
            if any(same_name(w.name, name) for _, w in self._witnesses(session)):
                raise KeyHolderError(
                    f"witness '{name}' is already registered on token '{self.store.token_label}';"
                    " remove it first to give them a new passphrase",
                    ErrorCode.BAD_OPTION,
                )
            witness = Witness(name, utc_text(), officer, stored)
            record = {"name": name, "added": witness.added, "officer": officer, "hash": stored}
            create_data_object(session, WITNESS_APPLICATION, WITNESS_PREFIX + name, record)
        return witness

    def remove_witness(self, name: str) -> Witness:
        """Destroy the record of witness ``name``."""
        with self.store.session(f"remove witness '{name}'") as session:
            for obj, witness in self._witnesses(session):
                if same_name(witness.name, name):
                    obj.destroy()
                    return witness
        raise self.unknown(name)

    def unknown(self, name: str) -> KeyHolderError:
        """The error for a witness name that is not registered on the token."""
        return KeyHolderError(
            f"witness '{name}' is not registered on token '{self.store.token_label}'; see"
            " `iscl keys witness list`, or have the security officer add them with `iscl keys witness add`",
            ErrorCode.BAD_OPTION,
        )

    def verify(self, witness: Witness, passphrase: str) -> bool:
        """Is ``passphrase`` that of ``witness``? A damaged record is one sentence, never a pass."""
        if witness.stored is not None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return passphrase_matches(witness.stored, passphrase)
        raise KeyHolderError(
            f"the record of witness '{witness.name}' on token '{self.store.token_label}' is damaged; remove"
            f" it (`iscl keys witness remove {witness.name}`) and add the witness again",
        )
