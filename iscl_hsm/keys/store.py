"""Key management on a PKCS#11 token: list, create, rotate, retire, delete, wrap and unwrap ISCL keys.

Built on :mod:`iscl_hsm.keyholder.pkcs11` (the label/ID convention and the key policy) and
:func:`iscl_hsm.keyholder.provision.store_key` (creating auth and enc keys); it adds what a security
officer needs around them.

Versions
--------
CKA_ID is purpose | index | version. A new key at an index in use gets version max+1 under the same
label, and the key holder always uses the highest version, so the new key is current at once.
``replace`` then destroys the older versions; ``rotate`` keeps them until their grace period ends
and :meth:`KeyStore.retire` removes them. During the grace period a previous version stays on the
token: if the peer site cannot take the new key yet, deleting the new version makes the previous
one current again (a roll-back); ISCL itself has no way to try two versions in one handshake.

Key records
-----------
ISCL keys are created CKA_MODIFIABLE false, so nothing can be added to them later, and SoftHSM2
does not return CKA_START_DATE through python-pkcs11. What a key's attributes cannot hold lives in
one *key record* per key version: a private token data object (CKO_DATA) with CKA_APPLICATION
"iscl-hsm key record", CKA_LABEL the key's label, and as CKA_VALUE a JSON object: purpose, index,
version, created (UTC), kcv, origin (generated, components, wrapped), retire_after (UTC, set by a
rotation) and not_after (UTC or null: from then on the key holder refuses the version, see
:mod:`iscl_hsm.keyholder.key_records`). The KCV is kept there because a token sets no CKA_CHECK_VALUE on unwrapped keys.

Exportable keys and trusted transport keys
------------------------------------------
An auth or enc key created *exportable* is CKA_EXTRACTABLE and CKA_WRAP_WITH_TRUSTED, and stays
CKA_SENSITIVE: its value can leave the token only wrapped under a key with CKA_TRUSTED, which only the
security officer (SO PIN) can set. So a user-PIN holder cannot export it under a wrapping key of
their own choosing. Transport keys are AES keys (purpose 3, label iscl-transport-N) with WRAP and
UNWRAP only, made trusted like this, since SoftHSM2 lets the SO create public objects only:

1. a public R/W session is opened; the SO logs in (on a second session), and a *session* object
   (in memory only, never written to the token directory) is created with CKA_TRUSTED true and the
   transport key's value; the SO logs out;
2. the user logs in and copies that object into a private token object (CKA_PRIVATE, CKA_TOKEN,
   CKA_MODIFIABLE false: no later copy can widen its capabilities); the session object is destroyed.

Keys move as AES key wrap with padding (CKM_AES_KEY_WRAP_PAD, RFC 5649) of the exportable key under
the transport key. The file (format "iscl-hsm wrapped key 2") says which key it is (purpose, index,
version, algorithm, KCV), under which transport key (label and KCV), from which token and when; every
field is bound to the transport key by an HMAC under a one-time key wrapped beside it
(:mod:`iscl_hsm.keys.binding`), so that the same key cannot be installed in another role. The importing
token checks the transport key's KCV, then the MAC, and only then unwraps the key: into a temporary
session key to check the KCV of what came out, then into the token (non-extractable unless asked
otherwise). Version 1 files had an unkeyed checksum only and are refused. :mod:`iscl_hsm.keys.backup`
puts such documents, each with its key record, into one bound backup file.

Host-readable encryption keys
-----------------------------
An enc key created *host-readable* is not CKA_SENSITIVE and is CKA_EXTRACTABLE: any process logged in
with the user PIN can read its value. V1.00 links with encryption key ids 1..8 use encryption key N
itself as every message's DES key; the key holder reads a host-readable key once per process, so
that OpenSSL protects the records, and uses a sensitive one inside the token (slower). Auth and
transport keys are never host-readable, and a key is either exportable or host-readable. A
host-readable key is not exported: the other site gets it by a component ceremony.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Final

from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.constants import DEFAULT

from iscl_hsm.errors import ErrorCode, KeyHolderConfigError, KeyHolderError
from iscl_hsm.keyholder.base import KEY_INDEXES
from iscl_hsm.keyholder.data_objects import create_data_object, data_objects
from iscl_hsm.keyholder.key_records import RECORD_APPLICATION, parse_utc, utc_text
from iscl_hsm.keyholder.pkcs11 import (
    PURPOSES,
    Pkcs11KeyHolder,
    _load_module,
    _operation_error,
    key_id,
    key_label,
    key_policy,
    pin_error,
)
from iscl_hsm.keyholder.provision import store_key
from iscl_hsm.keys.binding import UNWRAP_FAILURES, bind, check_binding_fields, verify
from iscl_hsm.keys.components import ALGORITHMS, Algorithm, check_key

__all__ = [
    "EXPORTABLE",
    "HOST_READABLE",
    "KINDS",
    "LOOSELY_EXTRACTABLE",
    "NEW",
    "NON_EXTRACTABLE",
    "RECORD_APPLICATION",
    "REPLACE",
    "ROTATE",
    "WRAPPED_FORMAT",
    "KeyInfo",
    "KeyStore",
    "check_kind",
    "check_wrapped_fields",
    "checked_unwrap",
    "parse_wrapped",
    "stored_template",
    "trusted_transport_value",
    "verify_so_pin",
]

Records = dict[tuple[str, int, int], tuple[Any, dict[str, Any]]]
"""Key records by (purpose, index, version): the token object and its JSON value."""
NEW, REPLACE, ROTATE = "new", "replace", "rotate"
"""How a key is stored at an index: only if free; replacing every version; or as a new version."""
WRAPPED_FORMAT: Final = "iscl-hsm wrapped key 2"
UNBOUND_FORMAT: Final = "iscl-hsm wrapped key 1"
"""Files of releases whose metadata had an unkeyed checksum only: refused."""
EXPORT_AGAIN: Final = "ask the other site to export it again"
WRAP_MECHANISM: Final = Mechanism.AES_KEY_WRAP_PAD
_LABEL: Final = re.compile(r"^iscl-(auth|enc|transport)-([1-8])$")
_KEY_TYPES: Final = {"des": KeyType._DES, "des2": KeyType.DES2, "des3": KeyType.DES3}
_ECB: Final = {
    KeyType._DES: Mechanism._DES_ECB,
    KeyType.DES2: Mechanism.DES3_ECB,
    KeyType.DES3: Mechanism.DES3_ECB,
}
_CAPABILITY: Final = {
    "auth": MechanismFlag.ENCRYPT,
    "enc": MechanismFlag.DERIVE | MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
}
"""What an unwrapped key may do; key_policy's template sets the same, and wins."""
NON_EXTRACTABLE, EXPORTABLE, HOST_READABLE, LOOSELY_EXTRACTABLE = (
    "non-extractable",
    "exportable",
    "host-readable",
    "extractable",
)
KINDS: Final = {
    NON_EXTRACTABLE: "non-extractable",
    EXPORTABLE: "exportable (trusted wrap only)",
    HOST_READABLE: "host-readable (V1.00 on the host)",
    LOOSELY_EXTRACTABLE: "extractable under any wrapping key (off the ISCL policy)",
}
"""A key's kind (what can read or move its value) and how ``iscl keys`` describes it."""


def _check_purpose_index(purpose: str, index: int) -> str:
    if purpose not in PURPOSES:
        raise KeyHolderError(
            f"unknown key purpose {purpose!r}; use one of {', '.join(PURPOSES)}", ErrorCode.BAD_OPTION
        )
    if not isinstance(index, int) or index not in KEY_INDEXES:
        raise KeyHolderError(f"key index {index!r} is outside 1..8", ErrorCode.BAD_OPTION)
    return key_label(purpose, index)


def check_kind(purpose: str, *, exportable: bool = False, host_readable: bool = False) -> None:
    """Refuse a kind ``purpose`` keys cannot have (key_policy's rules), before anything is typed."""
    key_policy(purpose, exportable=exportable, host_readable=host_readable)


def _kind_of(attributes: dict[Attribute, Any]) -> str:
    """The kind of a key from its CKA_SENSITIVE, CKA_EXTRACTABLE and CKA_WRAP_WITH_TRUSTED."""
    if not attributes.get(Attribute.EXTRACTABLE):
        return NON_EXTRACTABLE
    if not attributes.get(Attribute.SENSITIVE):
        return HOST_READABLE
    return EXPORTABLE if attributes.get(Attribute.WRAP_WITH_TRUSTED) else LOOSELY_EXTRACTABLE


@dataclass(frozen=True)
class KeyInfo:
    """One key version on the token, as ``iscl keys list`` shows it (never its value)."""

    purpose: str
    index: int
    version: int
    algorithm: str
    kcv: str
    created: str | None
    extractable: bool
    current: bool
    retire_after: str | None
    label: str
    trusted: bool = False
    kind: str = NON_EXTRACTABLE
    """One of KINDS: non-extractable, exportable (trusted wrap only), host-readable (V1.00 on the host)."""
    not_after: str | None = None
    """UTC; from then on the key holder refuses this version (None: no expiry)."""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "host_readable": self.host_readable}

    @property
    def host_readable(self) -> bool:
        return self.kind == HOST_READABLE

    @property
    def kind_text(self) -> str:
        return KINDS[self.kind]

    @property
    def name(self) -> str:
        return f"{self.label} version {self.version}"


def _algorithm_of(attributes: dict[Attribute, Any]) -> str:
    key_type = attributes.get(Attribute.KEY_TYPE)
    if key_type == KeyType.AES:
        return f"aes{8 * int(attributes.get(Attribute.VALUE_LEN) or 0)}"
    for name, candidate in _KEY_TYPES.items():
        if key_type == candidate:
            return name
    return "other"


class KeyStore:
    """Key-management operations on the token of an open :class:`Pkcs11KeyHolder`."""

    def __init__(self, holder: Pkcs11KeyHolder) -> None:
        self.holder = holder
        self.token_label = holder.token_label
        self._serial: str | None = None

    @property
    def serial(self) -> str | None:
        """The token's serial number (for the audit log)."""
        if self._serial is None:
            with (
                contextlib.suppress(KeyHolderError, p11.PKCS11Error, AttributeError),
                self.holder.session() as session,
            ):
                self._serial = bytes(session.token.serial).decode("ascii", "replace").strip() or None
        return self._serial

    @contextmanager
    def session(self, what: str) -> Iterator[Any]:
        """The logged-in session, token errors translated into one sentence about ``what``."""
        try:
            with self.holder.session() as session:
                yield session
        except p11.PKCS11Error as exc:
            raise _operation_error(exc, self.holder.description, what) from None

    # -- reading ------------------------------------------------------------------------------------

    def objects(
        self, session: Any, purpose: str | None = None, index: int | None = None
    ) -> list[tuple[str, int, int, Any]]:
        """(purpose, index, version, object) of the ISCL keys on the token, by the convention."""
        template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}
        if purpose is not None and index is not None:
            template[Attribute.LABEL] = key_label(purpose, index)
        found = []
        for obj in session.get_objects(template):
            match = _LABEL.match(obj[Attribute.LABEL] or "")
            ident = bytes(obj[Attribute.ID] or b"")
            if match is None or len(ident) != 3:
                continue
            p, i = match.group(1), int(match.group(2))
            if ident[:2] != bytes([PURPOSES[p], i]) or (purpose is not None and p != purpose):
                continue
            if index is not None and i != index:
                continue
            found.append((p, i, ident[2], obj))
        found.sort(key=lambda item: (list(PURPOSES).index(item[0]), item[1], item[2]))
        return found

    def records(self, session: Any) -> Records:
        records = {}
        for obj, record in data_objects(session, RECORD_APPLICATION):
            if record is None:
                continue
            try:
                records[(record["purpose"], int(record["index"]), int(record["version"]))] = (obj, record)
            except (ValueError, KeyError, TypeError):
                continue
        return records

    def _info(
        self,
        session: Any,
        purpose: str,
        index: int,
        version: int,
        obj: Any,
        current: bool,
        record: dict[str, Any] | None,
    ) -> KeyInfo:
        attributes = obj.get_attributes(
            [
                Attribute.KEY_TYPE,
                Attribute.CHECK_VALUE,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.WRAP_WITH_TRUSTED,
                Attribute.TRUSTED,
            ]
        )
        if attributes.get(Attribute.KEY_TYPE) == KeyType.AES:
            attributes.update(obj.get_attributes([Attribute.VALUE_LEN]))
        check = bytes(attributes.get(Attribute.CHECK_VALUE) or b"")
        record = record or {}
        kcv = check.hex().upper() if len(check) == 3 else str(record.get("kcv") or "")
        return KeyInfo(
            purpose=purpose,
            index=index,
            version=version,
            algorithm=_algorithm_of(attributes),
            kcv=kcv,
            created=record.get("created"),
            extractable=bool(attributes.get(Attribute.EXTRACTABLE)),
            current=current,
            retire_after=record.get("retire_after"),
            label=key_label(purpose, index),
            trusted=bool(attributes.get(Attribute.TRUSTED)),
            kind=_kind_of(attributes),
            not_after=record.get("not_after"),
        )

    def infos(self, session: Any, purpose: str | None = None, index: int | None = None) -> list[KeyInfo]:
        objects = self.objects(session, purpose, index)
        records = self.records(session)
        newest: dict[tuple[str, int], int] = {}
        for p, i, v, _ in objects:
            newest[(p, i)] = max(v, newest.get((p, i), 0))
        return [
            self._info(session, p, i, v, obj, v == newest[(p, i)], records.get((p, i, v), (None, None))[1])
            for p, i, v, obj in objects
        ]

    def list_keys(self) -> list[KeyInfo]:
        """Every ISCL key version on the token, by purpose, index and version."""
        with self.session("list its keys") as session:
            return self.infos(session)

    def newest(self, purpose: str, index: int) -> KeyInfo | None:
        """The version of ``purpose`` key ``index`` the key holder uses, or None when there is none."""
        label = _check_purpose_index(purpose, index)
        with self.session(f"look up {label}") as session:
            infos = self.infos(session, purpose, index)
        return infos[-1] if infos else None

    def current(self, purpose: str, index: int) -> KeyInfo:
        """The version of ``purpose`` key ``index`` the key holder uses."""
        label = _check_purpose_index(purpose, index)
        info = self.newest(purpose, index)
        if info is None:
            raise KeyHolderConfigError(
                f"key {label} is not on token '{self.token_label}'; check the purpose and index with"
                " 'iscl keys list'",
                ErrorCode.KEY_NOT_FOUND,
            )
        return info

    def check(self, purpose: str, index: int, kcv: bytes) -> tuple[KeyInfo, KeyInfo | None]:
        """(current version, the version whose KCV is ``kcv`` or None)."""
        current = self.current(purpose, index)
        with self.session(f"look up {current.label}") as session:
            infos = self.infos(session, purpose, index)
        matching = [info for info in infos if info.kcv == kcv.hex().upper()]
        return current, (matching[-1] if matching else None)

    # -- creating -----------------------------------------------------------------------------------

    def _next_version(self, label: str, versions: list[int], mode: str, preferred: int | None = None) -> int:
        if not versions:
            if mode == ROTATE:
                raise KeyHolderConfigError(
                    f"key {label} is not on token '{self.token_label}', so there is nothing to rotate;"
                    " create it first",
                    ErrorCode.KEY_NOT_FOUND,
                )
            return preferred or 1
        if mode == NEW:
            raise KeyHolderError(
                f"key index in use: {label} is already on token '{self.token_label}' (version"
                f" {max(versions)}); pass --replace to replace it, or rotate it",
                ErrorCode.BAD_OPTION,
            )
        version = preferred if preferred and preferred > max(versions) else max(versions) + 1
        if version > 255:
            raise KeyHolderError(f"key {label} has reached version 255; replace it instead of rotating")
        return version

    def ensure_free(self, purpose: str, index: int, mode: str) -> None:
        """Fail now (before custodians type anything) if storing at ``index`` in ``mode`` must fail."""
        label = _check_purpose_index(purpose, index)
        with self.session(f"look up {label}") as session:
            versions = [v for _, _, v, _ in self.objects(session, purpose, index)]
        self._next_version(label, versions, mode)

    def create(
        self,
        purpose: str,
        index: int,
        algorithm: Algorithm,
        value: bytes | None = None,
        *,
        exportable: bool = False,
        host_readable: bool = False,
        mode: str = NEW,
        grace: datetime.timedelta | None = None,
        origin: str = "generated",
        trusted: str | None = None,
        not_after: datetime.datetime | None = None,
    ) -> KeyInfo:
        """Store a key at ``purpose``/``index``: ``value`` None generates it inside the token.

        ``exportable`` and ``host_readable`` (enc keys, for V1.00 on the host) choose its kind.

        A transport key needs ``trusted``: the label of the session object made by
        :func:`trusted_transport_value` (its value was given there). ``mode`` is NEW (the index must
        be free), REPLACE (older versions are destroyed once the new one is stored) or ROTATE (they
        stay until ``grace`` has passed). ``not_after`` ends the new version's use. Returns the new
        current version.
        """
        label = _check_purpose_index(purpose, index)
        check_kind(purpose, exportable=exportable, host_readable=host_readable)
        if algorithm.name not in ALGORITHMS or (purpose == "transport") != (algorithm.family == "aes"):
            raise KeyHolderError(f"a {purpose} key cannot be {algorithm.name}", ErrorCode.BAD_OPTION)
        if value is not None:
            check_key(algorithm, value, "the key")
        if purpose == "transport" and trusted is None:
            raise KeyHolderError(
                "a transport key must be marked trusted by the security officer; create it with"
                " generate-components or import-components and the SO PIN",
                ErrorCode.BAD_OPTION,
            )
        with self.session(f"store {label}") as session:
            versions = [v for _, _, v, _ in self.objects(session, purpose, index)]
            version = self._next_version(label, versions, mode)

            def make() -> tuple[Any, bytes | None]:
                if purpose == "transport":
                    assert trusted is not None
                    return _copy_trusted(session, trusted, purpose, index, version), None
                check = store_key(
                    session,
                    purpose,
                    index,
                    value,
                    version=version,
                    exportable=exportable,
                    host_readable=host_readable,
                    key_length=algorithm.length,
                )
                return self._object(session, purpose, index, version), check

            return self._install(session, purpose, index, version, make, mode, grace, origin, not_after)

    def _object(self, session: Any, purpose: str, index: int, version: int) -> Any:
        for p, i, v, obj in self.objects(session, purpose, index):
            if v == version:
                return obj
        raise KeyHolderError(f"{key_label(purpose, index)} version {version} vanished from the token")

    def _install(
        self,
        session: Any,
        purpose: str,
        index: int,
        version: int,
        make: Callable[[], tuple[Any, bytes | None]],
        mode: str,
        grace: datetime.timedelta | None,
        origin: str,
        not_after: datetime.datetime | None,
    ) -> KeyInfo:
        """Create the key with ``make`` and its record; mark or destroy older versions; all or nothing."""
        if mode == ROTATE and (grace is None or grace < datetime.timedelta(0)):
            raise KeyHolderError("a rotation needs a grace period of zero or more", ErrorCode.BAD_OPTION)
        created: list[Any] = []
        superseded: list[Any] = []
        try:
            obj, check = make()
            created.append(obj)
            if check is None:
                check = bytes(obj[Attribute.CHECK_VALUE] or b"")
            record = {
                "purpose": purpose,
                "index": index,
                "version": version,
                "created": utc_text(),
                "kcv": check.hex().upper(),
                "origin": origin,
                "retire_after": None,
                "not_after": None if not_after is None else utc_text(not_after),
            }
            created.append(create_record(session, record))
            older = [(v, o) for p, i, v, o in self.objects(session, purpose, index) if v != version]
            records = self.records(session)
            if mode == ROTATE:
                assert grace is not None
                until = utc_text(datetime.datetime.now(datetime.UTC) + grace)
                for v, _ in older:
                    record_obj, old = records.get((purpose, index, v), (None, None))
                    if record_obj is None or old is None:
                        created.append(
                            create_record(
                                session,
                                {
                                    "purpose": purpose,
                                    "index": index,
                                    "version": v,
                                    "created": None,
                                    "kcv": None,
                                    "origin": None,
                                    "retire_after": until,
                                },
                            )
                        )
                    elif not old.get("retire_after") or old["retire_after"] > until:
                        # A data object's CKA_VALUE cannot change: write a new record, drop the old one.
                        created.append(create_record(session, {**old, "retire_after": until}))
                        superseded.append(record_obj)
        except BaseException:
            for leftover in reversed(created):
                with contextlib.suppress(p11.PKCS11Error):
                    leftover.destroy()
            raise
        for record_obj in superseded:
            with contextlib.suppress(p11.PKCS11Error):
                record_obj.destroy()
        if mode == REPLACE:
            for v, o in older:
                self.destroy_version(session, records, purpose, index, v, o)
        return self.infos(session, purpose, index)[-1]

    def destroy_version(
        self,
        session: Any,
        records: Records,
        purpose: str,
        index: int,
        version: int,
        obj: Any,
    ) -> None:
        obj.destroy()
        record_obj = records.get((purpose, index, version), (None, None))[0]
        if record_obj is not None:
            with contextlib.suppress(p11.PKCS11Error):
                record_obj.destroy()

    # -- removing -----------------------------------------------------------------------------------

    def retire(
        self,
        purpose: str | None = None,
        index: int | None = None,
        *,
        now: bool = False,
        at: datetime.datetime | None = None,
    ) -> list[KeyInfo]:
        """Destroy non-current versions whose grace period has passed (all of them with ``now``)."""
        if (purpose is None) != (index is None):
            raise KeyHolderError("give both --purpose and --index, or neither", ErrorCode.BAD_OPTION)
        if purpose is not None:
            assert index is not None
            _check_purpose_index(purpose, index)
        moment = at or datetime.datetime.now(datetime.UTC)
        removed = []
        with self.session("retire old key versions") as session:
            records = self.records(session)
            objects = {(p, i, v): o for p, i, v, o in self.objects(session, purpose, index)}
            for info in self.infos(session, purpose, index):
                if info.current:
                    continue
                due = info.retire_after is not None and parse_utc(info.retire_after) <= moment
                if now or due:
                    self.destroy_version(
                        session,
                        records,
                        info.purpose,
                        info.index,
                        info.version,
                        objects[(info.purpose, info.index, info.version)],
                    )
                    removed.append(info)
        return removed

    def delete(self, purpose: str, index: int, version: int | None = None) -> list[KeyInfo]:
        """Destroy ``version`` of the key (every version when None); return what was destroyed."""
        label = _check_purpose_index(purpose, index)
        with self.session(f"delete {label}") as session:
            infos = [
                i for i in self.infos(session, purpose, index) if version is None or i.version == version
            ]
            if not infos:
                which = f"{label} version {version}" if version is not None else label
                raise KeyHolderConfigError(
                    f"key {which} is not on token '{self.token_label}'; check with 'iscl keys list'",
                    ErrorCode.KEY_NOT_FOUND,
                )
            records = self.records(session)
            objects = {v: o for _, _, v, o in self.objects(session, purpose, index)}
            for info in infos:
                self.destroy_version(session, records, purpose, index, info.version, objects[info.version])
            left = [v for _, _, v, _ in self.objects(session, purpose, index)]
            if left:
                self._clear_retirement(session, records, purpose, index, max(left))
        return infos

    def _clear_retirement(
        self,
        session: Any,
        records: Records,
        purpose: str,
        index: int,
        version: int,
    ) -> None:
        """A roll-back made ``version`` current again: its rotation's retire_after no longer applies
        (left in place, a later rotation would keep the old, earlier date)."""
        record_obj, record = records.get((purpose, index, version), (None, None))
        if record_obj is None or record is None or not record.get("retire_after"):
            return
        # A data object's CKA_VALUE cannot change: write a new record, then drop the old one.
        create_record(session, {**record, "retire_after": None})
        with contextlib.suppress(p11.PKCS11Error):
            record_obj.destroy()

    # -- moving keys between tokens -----------------------------------------------------------------

    def transport_key(self, session: Any, transport_index: int) -> tuple[Any, KeyInfo]:
        infos = self.infos(session, "transport", transport_index)
        if not infos:
            raise KeyHolderConfigError(
                f"transport key {key_label('transport', transport_index)} is not on token"
                f" '{self.token_label}'; both sites must first hold the same transport key"
                " (generate-components --purpose transport on one, import-components on the other)",
                ErrorCode.KEY_NOT_FOUND,
            )
        info = infos[-1]
        return self._object(session, "transport", transport_index, info.version), info

    def export(self, purpose: str, index: int, transport_index: int) -> dict[str, Any]:
        """The bound wrapped-key document of the current version of an exportable key."""
        label = _check_purpose_index(purpose, index)
        if purpose == "transport":
            raise KeyHolderError("transport keys are never exported", ErrorCode.BAD_OPTION)
        _check_purpose_index("transport", transport_index)
        with self.session(f"export {label}") as session:
            infos = self.infos(session, purpose, index)
            if not infos:
                raise KeyHolderConfigError(
                    f"key {label} is not on token '{self.token_label}'", ErrorCode.KEY_NOT_FOUND
                )
            info = infos[-1]
            refusal = self.why_not_exportable(info)
            if refusal is not None:
                raise KeyHolderError(refusal, ErrorCode.BAD_OPTION)
            return self.wrapped_document(session, info, *self.transport_key(session, transport_index))

    def why_not_exportable(self, info: KeyInfo) -> str | None:
        """Why ``info`` cannot leave the token wrapped (one sentence), or None when it can."""
        if info.purpose == "transport":
            return (
                f"{info.name} is a transport key: transport keys never leave a token; a component"
                " ceremony gives another token the same transport key"
            )
        if info.host_readable:
            return (
                f"{info.name} is host-readable (for V1.00 on the host), not exportable; give the other"
                " site the same key by a component ceremony (generate-components here, import-components"
                " there)"
            )
        if not info.extractable:
            return (
                f"{info.name} was created non-exportable, so it cannot leave token"
                f" '{self.token_label}'; run a component ceremony with the other site instead, or create"
                " the key again with --exportable"
            )
        return None

    def wrapped_document(
        self, session: Any, info: KeyInfo, transport: Any, transport_info: KeyInfo, **extra: Any
    ) -> dict[str, Any]:
        """``info`` wrapped under ``transport``, with its fields (and ``extra``) bound to it."""
        key = self._object(session, info.purpose, info.index, info.version)
        try:
            wrapped = bytes(transport.wrap_key(key, mechanism=WRAP_MECHANISM))
        except (p11.KeyNotWrappable, p11.KeyUnextractable):
            raise KeyHolderError(
                f"{transport_info.label} on token '{self.token_label}' may not wrap {info.name}: the"
                " transport key is not marked trusted by the security officer; create it again with the"
                " SO PIN",
                ErrorCode.BAD_OPTION,
            ) from None
        document: dict[str, Any] = {
            "format": WRAPPED_FORMAT,
            "purpose": info.purpose,
            "index": info.index,
            "version": info.version,
            "algorithm": info.algorithm,
            "kcv": info.kcv,
            "wrapping": {
                "mechanism": "CKM_AES_KEY_WRAP_PAD",
                "transport_label": transport_info.label,
                "transport_kcv": transport_info.kcv,
            },
            "source": {"token": self.token_label, "serial": self.serial},
            "exported": utc_text(),
            "wrapped": wrapped.hex(),
            **extra,
        }
        return bind(session, transport, document)

    def import_wrapped(
        self,
        document: dict[str, Any],
        *,
        mode: str = NEW,
        grace: datetime.timedelta | None = None,
        exportable: bool = False,
        host_readable: bool = False,
        not_after: datetime.datetime | None = None,
    ) -> KeyInfo:
        """Unwrap a document from :meth:`export` (checked by :func:`parse_wrapped`) into the token.

        The key is stored non-extractable, or of the kind ``exportable`` / ``host_readable`` ask for.
        """
        purpose, index = document["purpose"], int(document["index"])
        label = _check_purpose_index(purpose, index)
        check_kind(purpose, exportable=exportable, host_readable=host_readable)
        with self.session(f"import {label}") as session:
            transport, transport_info = self.wrapping_transport(session, document["wrapping"], "the file")
            unwrap = checked_unwrap(
                transport, transport_info, document, "the file was altered after export", EXPORT_AGAIN
            )
            versions = [v for _, _, v, _ in self.objects(session, purpose, index)]
            version = self._next_version(label, versions, mode, preferred=int(document["version"]))

            def make() -> tuple[Any, bytes | None]:
                template = stored_template(purpose, index, version, exportable, host_readable)
                return unwrap(True, template), bytes.fromhex(document["kcv"])

            return self._install(session, purpose, index, version, make, mode, grace, "wrapped", not_after)

    def wrapping_transport(self, session: Any, wrapping: dict[str, Any], what: str) -> tuple[Any, KeyInfo]:
        """The transport key ``wrapping`` names, if this token holds it with the KCV it states."""
        transport_label = wrapping["transport_label"]
        match = _LABEL.match(transport_label)
        if match is None or match.group(1) != "transport":
            raise KeyHolderError(f"{what} names {transport_label!r}, which is not a transport key label")
        transport, transport_info = self.transport_key(session, int(match.group(2)))
        if transport_info.kcv != wrapping["transport_kcv"].upper():
            raise KeyHolderError(
                f"wrong transport key: {what} was wrapped under a transport key with KCV"
                f" {wrapping['transport_kcv'].upper()}, but {transport_info.label} on token"
                f" '{self.token_label}' has KCV {transport_info.kcv}; both tokens must hold the same"
                " transport key",
                ErrorCode.KCV_MISMATCH,
            )
        return transport, transport_info


def checked_unwrap(
    transport: Any,
    transport_info: KeyInfo,
    document: dict[str, Any],
    altered: str,
    remedy: str,
) -> Callable[[bool, dict[Attribute, Any]], Any]:
    """Check ``document``'s MAC, then the KCV of the key it wraps; return how to unwrap that key.

    ``unwrap(store, template)`` makes a session key (store False) or a token key. Nothing is
    stored here, so a caller can check every document before installing any.
    """
    transport_name = f"{transport_info.label} (KCV {transport_info.kcv})"
    verify(transport, transport_name, document, altered, remedy)
    purpose = document["purpose"]
    key_type = _KEY_TYPES[ALGORITHMS[document["algorithm"]].name]
    wrapped = bytes.fromhex(document["wrapped"])

    def unwrap(store: bool, template: dict[Attribute, Any]) -> Any:
        try:
            return transport.unwrap_key(
                ObjectClass.SECRET_KEY,
                key_type,
                wrapped,
                mechanism=WRAP_MECHANISM,
                store=store,
                capabilities=_CAPABILITY[purpose] if store else MechanismFlag.ENCRYPT,
                template={Attribute.VALUE_LEN: DEFAULT, **template},
            )
        except UNWRAP_FAILURES:
            raise KeyHolderError(
                f"{altered}: its wrapped key does not unwrap under {transport_name}, or is not a"
                f" {document['algorithm']} key; {remedy}",
                ErrorCode.BAD_KEY_FILE,
            ) from None

    probe = unwrap(False, {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
    try:
        got = bytes(probe.encrypt(bytes(8), mechanism=_ECB[key_type]))[:3]
    finally:
        with contextlib.suppress(p11.PKCS11Error):
            probe.destroy()
    expected = bytes.fromhex(document["kcv"])
    if got != expected:
        raise KeyHolderError(
            f"{altered}: the key unwrapped from it has KCV {got.hex().upper()}, not the"
            f" {expected.hex().upper()} it states; {remedy}",
            ErrorCode.BAD_KEY_FILE,
        )
    return unwrap


def stored_template(
    purpose: str, index: int, version: int, exportable: bool = False, host_readable: bool = False
) -> dict[Attribute, Any]:
    """The template of an unwrapped key stored as ``purpose`` key ``index`` version ``version``."""
    # SoftHSM2 applies the template in order, and nothing may follow CKA_MODIFIABLE false.
    template = key_policy(purpose, exportable=exportable, host_readable=host_readable)
    modifiable = template.pop(Attribute.MODIFIABLE)
    template.update(
        {
            Attribute.LABEL: key_label(purpose, index),
            Attribute.ID: key_id(purpose, index, version),
            Attribute.MODIFIABLE: modifiable,
        }
    )
    return template


def create_record(session: Any, record: dict[str, Any]) -> Any:
    return create_data_object(session, RECORD_APPLICATION, key_label(record["purpose"], record["index"]), record)


def _copy_trusted(session: Any, temporary: str, purpose: str, index: int, version: int) -> Any:
    """Copy the trusted session object ``temporary`` into the token as the transport key."""
    found = list(
        session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: False, Attribute.LABEL: temporary}
        )
    )
    if len(found) != 1:
        raise KeyHolderError(
            "the trusted transport key made with the SO PIN is gone (its session closed);"
            " run the command again"
        )
    try:
        copy = found[0].copy(
            {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.LABEL: key_label(purpose, index),
                Attribute.ID: key_id(purpose, index, version),
                Attribute.MODIFIABLE: False,  # last: SoftHSM2 applies the template in order
            }
        )
    finally:
        with contextlib.suppress(p11.PKCS11Error):
            found[0].destroy()
    if not copy[Attribute.TRUSTED]:
        copy.destroy()
        raise KeyHolderError(
            "the token dropped CKA_TRUSTED when copying the transport key; it cannot be used"
        )
    return copy


def _find_token(module: str, token_label: str) -> tuple[Any, Any, str]:
    """(library, token, description) of the token labelled exactly ``token_label``."""
    lib = _load_module(module)
    description = f"PKCS#11 token '{token_label}' (module {module})"
    try:
        return lib, lib.get_token(token_label=token_label), description
    except p11.NoSuchToken:
        raise KeyHolderError(
            f"PKCS#11 token '{token_label}' not found in module {module}; check the label with"
            " 'pkcs11-tool --module MODULE -L'"
        ) from None
    except p11.PKCS11Error as exc:
        raise _operation_error(exc, description, "be found") from None


def _so_session(module: str, token_label: str, so_pin: str) -> Any:
    """A R/W session with the security officer logged in; every failure is one sentence."""
    lib, token, description = _find_token(module, token_label)
    try:
        return token.open(rw=True, so_pin=so_pin)
    except (p11.UserAlreadyLoggedIn, p11.AnotherUserAlreadyLoggedIn):
        raise KeyHolderError(
            f"this process is already logged in to {description}; mark transport keys trusted before"
            " opening a key holder on the token"
        ) from None
    except p11.PKCS11Error as exc:
        raise pin_error(exc, description, lib, token_label, so=True) or _operation_error(
            exc, description, "log the security officer in"
        ) from None


def verify_so_pin(module: str, token_label: str, so_pin: str) -> None:
    """Log the security officer in and out again: a wrong SO PIN fails before a ceremony starts.

    Like :func:`trusted_transport_value`, only while this process is not logged in as user.
    """
    with contextlib.suppress(p11.PKCS11Error):
        _so_session(module, token_label, so_pin).close()


@contextmanager
def trusted_transport_value(module: str, token_label: str, so_pin: str, value: bytes) -> Iterator[str]:
    """Create a trusted AES session object holding ``value``; yield its temporary label.

    Must run before this process logs in to the token as user (the SO and the user cannot be logged
    in at once). Pass the label to :meth:`KeyStore.create` (purpose "transport") while inside the
    ``with``; the object is destroyed when the ``with`` ends in any case.
    """
    if len(value) not in (16, 32):
        raise KeyHolderError("a transport key is an AES-128 or AES-256 key", ErrorCode.BAD_LENGTH)
    _, token, description = _find_token(module, token_label)
    temporary = f"iscl-trusted-{secrets.token_hex(6)}"
    try:
        public = token.open(rw=True)  # holds the session object after the SO has logged out
    except p11.PKCS11Error as exc:
        raise _operation_error(exc, description, "open a session") from None
    try:
        officer = _so_session(module, token_label, so_pin)
        try:
            template: dict[Attribute, Any] = key_policy("transport")
            template.update(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: value,
                    Attribute.LABEL: temporary,
                    Attribute.TOKEN: False,
                    Attribute.PRIVATE: False,
                    Attribute.MODIFIABLE: True,
                    Attribute.COPYABLE: True,
                    Attribute.TRUSTED: True,
                }
            )
            public.create_object(template)
        except p11.PKCS11Error as exc:
            raise _operation_error(exc, description, "create a trusted transport key") from None
        finally:
            with contextlib.suppress(p11.PKCS11Error):
                officer.close()
        yield temporary
    finally:
        with contextlib.suppress(p11.PKCS11Error):
            for leftover in public.get_objects({Attribute.LABEL: temporary, Attribute.TOKEN: False}):
                leftover.destroy()
        with contextlib.suppress(p11.PKCS11Error):
            public.close()


def check_wrapped_fields(document: Any) -> bool:
    """Whether a version 2 wrapped-key document has every field, well formed (not whether its MAC verifies)."""
    try:
        wrapping = document["wrapping"]
        return (
            document["format"] == WRAPPED_FORMAT
            and document["purpose"] in ("auth", "enc")
            and isinstance(document["index"], int)
            and document["index"] in KEY_INDEXES
            and isinstance(document["version"], int)
            and 1 <= document["version"] <= 255
            and document["algorithm"] in _KEY_TYPES
            and len(bytes.fromhex(document["kcv"])) == 3
            and len(bytes.fromhex(wrapping["transport_kcv"])) == 3
            and isinstance(wrapping["transport_label"], str)
            and isinstance(document["source"], dict)
            and len(bytes.fromhex(document["wrapped"])) >= 16
            and check_binding_fields(document)
        )
    except (KeyError, TypeError, ValueError):
        return False


def json_document(text: str, corrupted: str, remedy: str) -> Any:
    """The JSON value of a key file's ``text``; a file that is not JSON is ``corrupted``, and ``remedy`` says
    what to do."""
    try:
        return json.loads(text)
    except ValueError:
        raise KeyHolderError(f"{corrupted} (it is not JSON); {remedy}", ErrorCode.BAD_KEY_FILE) from None


def parse_wrapped(text: str, name: str) -> dict[str, Any]:
    """Read and check a wrapped-key document; ``name`` (the file) appears in the error sentence."""
    corrupted = f"the wrapped-key file {name} is corrupted"
    document = json_document(text, corrupted, EXPORT_AGAIN)
    if isinstance(document, dict) and document.get("format") == UNBOUND_FORMAT:
        raise KeyHolderError(
            f"{name} was written by an older iscl-hsm whose files are not bound to the transport key (its"
            f" fields could be edited unnoticed); {EXPORT_AGAIN} with this version",
            ErrorCode.BAD_KEY_FILE,
        )
    if not isinstance(document, dict) or document.get("format") != WRAPPED_FORMAT:
        raise KeyHolderError(f"{name} is not a wrapped-key file of iscl keys export", ErrorCode.BAD_OPTION)
    if not check_wrapped_fields(document):
        raise KeyHolderError(
            f"{corrupted} (a field is missing or malformed); {EXPORT_AGAIN}", ErrorCode.BAD_KEY_FILE
        )
    return document
