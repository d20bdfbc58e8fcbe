"""Audit entries anchored in the token, so that a cut, emptied or rewritten log shows without a head.

A hash chain (:mod:`.audit`) has no secret: whoever can write the file can cut its end, or rewrite
and re-hash all of it. An `iscl keys` command that has the token open (user PIN logged in) therefore
also anchors its entry in that token:

* a MAC over the entry's ``hash`` (which covers ``prev``, ``seq`` and the content), stored in its
  ``mac`` field: CKM_SHA256_HMAC under the token's *audit MAC key*, a 256-bit CKK_GENERIC_SECRET key
  labelled ``iscl-audit-mac``, generated in the token on first use, private, sensitive,
  non-extractable, non-modifiable, SIGN and VERIFY only. An entry *claims* an anchor in a token when
  it has a ``mac`` and names the token (label and serial).
* an *anchor* per log file: a private token data object (CKO_DATA, CKA_APPLICATION
  ``iscl-hsm audit anchor``, CKA_LABEL ``iscl-audit-anchor-`` and 16 hex digits of the SHA-256 of the
  log's path) whose CKA_VALUE is the JSON ``{"log", "entries", "seq", "hash"}``: the log's full path,
  how many of its entries are anchored in this token, and the seq and hash of the last one. The key
  records of :mod:`.store` are kept the same way.

:meth:`.audit.AuditLog.append` seals the entry (MAC) before writing it and advances the anchor after
the line is on disk, both under the log's lock, so two processes never interleave. SoftHSM2 keeps a
data object's CKA_VALUE read-only, so advancing creates the new anchor, then destroys the old one;
when both survive a crash, the one with more entries is the anchor. A crash between the line and the
anchor leaves one anchored entry the token does not count yet: the next anchored append counts it
(its MAC shows the token made it), and :func:`verify_anchored` reports it meanwhile. The token never
counts an entry the file lacks.

What the anchor cannot show: entries that were not anchored (a wrong PIN, a missing token, a refusal
before login, `iscl card` commands) and come after the last anchored entry can be cut off unseen;
:func:`verify_anchored` counts them. Whoever holds the user PIN can also change the anchor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from iscl_hsm.errors import KeyHolderError
from iscl_hsm.keyholder.data_objects import create_data_object, data_objects
from iscl_hsm.keys.audit import AuditError, AuditReport
from iscl_hsm.keys.store import KeyStore

__all__ = [
    "ANCHOR_APPLICATION",
    "MAC_KEY_LABEL",
    "AnchorState",
    "AnchoredReport",
    "SealError",
    "TokenAnchor",
    "verify_anchored",
]

MAC_KEY_LABEL: Final = "iscl-audit-mac"
ANCHOR_APPLICATION: Final = "iscl-hsm audit anchor"
MAC_MECHANISM: Final = Mechanism.SHA256_HMAC
_DOMAIN: Final = b"iscl-hsm audit entry\n"
"""Prefixed to the hash that is MACed, so that the MAC key answers for audit entries only."""


class SealError(KeyHolderError):
    """The token could not compute an entry's MAC; nothing was written (the entry goes unanchored)."""


def log_key(path: Path) -> str:
    """How an anchor names its log: the full path, symbolic links resolved."""
    return str(Path(path).resolve())


@dataclass(frozen=True)
class AnchorState:
    """What a token's anchor records about one log."""

    log: str
    entries: int
    seq: int
    hash: str


class TokenAnchor:
    """The audit MAC key and the anchors of the token of an open :class:`KeyStore`."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.label = store.token_label
        self.serial = store.serial
        self.description = f"token '{self.label}' (serial {self.serial})"

    def claims(self, entry: dict[str, Any]) -> bool:
        """Does ``entry`` claim an anchor in this token?"""
        return (
            bool(entry.get("mac")) and entry.get("token") == self.label and entry.get("serial") == self.serial
        )

    # -- writing (under the log's lock) ---------------------------------------------------------------

    def seal(self, entry: dict[str, Any]) -> str:
        """The MAC of ``entry`` (over its hash) under the audit MAC key, made on first use."""
        try:
            with self.store.session("compute the audit entry's MAC") as session:
                keys = _mac_keys(session) or [_generate_mac_key(session)]
                return bytes(keys[0].sign(_message(entry), mechanism=MAC_MECHANISM)).hex()
        except KeyHolderError as exc:
            raise SealError(exc.args[0], exc.code) from None

    def advance(self, path: Path, entry: dict[str, Any], log: Callable[[], list[dict[str, Any]]]) -> None:
        """Make ``entry`` (written to the log at ``path``) the last anchored entry of that log."""
        name = log_key(path)
        try:
            with self.store.session("record the entry in its audit anchor") as session:
                mine = [(obj, state) for obj, state in _anchors(session, name) if state.log == name]
                current = max((state for _, state in mine), key=lambda s: s.entries, default=None)
                counted = self._counted(session, current, entry, log)
                _create_anchor(session, AnchorState(name, counted + 1, int(entry["seq"]), str(entry["hash"])))
                for obj, _ in mine:
                    obj.destroy()
        except KeyHolderError as exc:
            raise AuditError(
                f"entry {entry['seq']} was written to the audit log {path}, but {self.description} could not"
                f" record it in its audit anchor ({exc.args[0]}); the next 'iscl keys' command on this token"
                " records it"
            ) from None

    def _counted(
        self,
        session: Any,
        current: AnchorState | None,
        entry: dict[str, Any],
        log: Callable[[], list[dict[str, Any]]],
    ) -> int:
        """Anchored entries before ``entry``: the anchor's count, plus any it missed (an interrupted
        append) that follow its last entry, or all of the log's when there is no anchor yet."""
        if current is not None and current.hash == entry["prev"]:
            return current.entries
        earlier = [e for e in log() if e.get("hash") != entry["hash"]]
        hashes = [e.get("hash") for e in earlier]
        if current is not None and current.hash not in hashes:
            return current.entries  # the log no longer holds it: verify reports that, the count stands
        start = hashes.index(current.hash) + 1 if current is not None else 0
        keys = _mac_keys(session)
        missed = sum(1 for e in earlier[start:] if self.claims(e) and _authentic(keys, e))
        return (current.entries if current is not None else 0) + missed

    # -- reading --------------------------------------------------------------------------------------

    def first_forged(
        self, session: Any, claims: list[tuple[int, dict[str, Any]]]
    ) -> tuple[int, dict[str, Any]] | None:
        """The first (line, entry) of ``claims`` whose MAC the token's audit MAC key does not confirm."""
        keys = _mac_keys(session)
        return next(((n, e) for n, e in claims if not _authentic(keys, e)), None)

    def states(self, session: Any) -> dict[str, AnchorState]:
        """The token's anchor for each log (the one with most entries, should a crash have left two)."""
        found: dict[str, AnchorState] = {}
        for _, state in _anchors(session):
            if state.log not in found or state.entries > found[state.log].entries:
                found[state.log] = state
        return found


def _message(entry: dict[str, Any]) -> bytes:
    return _DOMAIN + str(entry["hash"]).encode("ascii")


def _mac_keys(session: Any) -> list[Any]:
    """The audit MAC keys (one; two if two processes made one at once on first use: both count)."""
    return list(
        session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True, Attribute.LABEL: MAC_KEY_LABEL}
        )
    )


def _generate_mac_key(session: Any) -> Any:
    return session.generate_key(
        KeyType.GENERIC_SECRET,
        256,
        label=MAC_KEY_LABEL,
        store=True,
        mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        template={
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False,
        },
    )


def _authentic(keys: list[Any], entry: dict[str, Any]) -> bool:
    try:
        mac = bytes.fromhex(str(entry["mac"]))
    except ValueError:
        return False
    return any(key.verify(_message(entry), mac, mechanism=MAC_MECHANISM) for key in keys)


def _anchor_label(log: str) -> str:
    """One label per log, so that a writer (holding that log's lock) touches only that log's anchor."""
    return f"iscl-audit-anchor-{hashlib.sha256(log.encode()).hexdigest()[:16]}"


def _anchors(session: Any, log: str | None = None) -> list[tuple[Any, AnchorState]]:
    """The anchors of the log named ``log``, or of every log."""
    found = []
    for obj, value in data_objects(session, ANCHOR_APPLICATION, None if log is None else _anchor_label(log)):
        try:
            found.append((obj, AnchorState(**(value or {}))))
        except TypeError:  # unreadable, or not an anchor's fields
            continue
    return found


def _create_anchor(session: Any, state: AnchorState) -> Any:
    return create_data_object(session, ANCHOR_APPLICATION, _anchor_label(state.log), asdict(state))


# --------------------------------------------------------------------------------------------------
# Verifying a log against the token


@dataclass(frozen=True)
class AnchoredReport:
    """A log whose anchored entries agree with the token: how many, up to which, and what follows."""

    anchored: int
    last: int
    """The seq of the last entry the token's anchor records."""
    unanchored_after: int
    """Entries after the last anchored one that are not anchored in this token (the anchor cannot
    show whether more of them were cut off)."""
    pending: int | None = None
    """The seq of an anchored entry the token's anchor does not count yet (an interrupted append)."""


def verify_anchored(report: AuditReport, anchor: TokenAnchor) -> AnchoredReport:
    """Check the entries of a log whose chain :func:`.audit.verify` found intact against the token.

    Every entry claiming an anchor in the token must carry a MAC the token confirms, and the
    token's anchor for the log (count, last entry) must match them; :class:`AuditError` otherwise,
    naming what was found: a rewritten entry, a cut, emptied or replaced log, another token's log.
    """
    path, token = report.path, anchor.description
    claims = [(n, e) for n, e in enumerate(report.chain, 1) if anchor.claims(e)]
    with anchor.store.session("verify the audit log against its anchor") as session:
        forged = anchor.first_forged(session, claims)
        states = anchor.states(session)
    if forged is not None:
        line, entry = forged
        raise AuditError(
            f"line {line} of the audit log {path} (entry {entry['seq']}) claims an anchor in {token}, but its MAC"
            " does not verify in the token: the entry was rewritten and its hash recomputed (and the chain"
            " after it)",
            line,
        )
    state = states.get(log_key(path))
    if not claims:
        raise _nothing_anchored(report, anchor, state, states)
    if state is None:
        raise AuditError(
            f"{len(claims)} entries of the audit log {path} are anchored in {token}, but the token anchors no log"
            f" at this path ({_anchored_logs(states)}): the log was moved or copied here, or its anchor was"
            " deleted"
        )
    hashes = [e["hash"] for _, e in claims]
    if state.hash not in hashes:
        raise AuditError(
            f"{token} anchored {state.entries} entries in the audit log {path}, the last being entry {state.seq};"
            f" the log holds {len(claims)} anchored entries, up to entry {claims[-1][1]['seq']}, and not entry"
            f" {state.seq}: entries were cut off its end, or it was replaced by an older copy"
        )
    counted = hashes.index(state.hash) + 1
    if counted != state.entries:
        raise AuditError(
            f"{token} anchored {state.entries} entries in the audit log {path} up to entry {state.seq}, but the"
            f" log holds {counted} up to it: anchored entries were removed and the chain rewritten"
        )
    later = claims[counted:]
    if len(later) > 1:
        raise AuditError(
            f"entries {', '.join(str(e['seq']) for _, e in later)} of the audit log {path} are anchored in"
            f" {token}, but its anchor stops at entry {state.seq}: the token's anchor is older than the log"
            " (was the token restored from a backup?)"
        )
    last = int(claims[-1][1]["seq"])
    return AnchoredReport(
        anchored=len(claims),
        last=state.seq,
        unanchored_after=sum(1 for e in report.chain if int(e["seq"]) > last),
        pending=last if later else None,
    )


def _nothing_anchored(
    report: AuditReport, anchor: TokenAnchor, state: AnchorState | None, states: dict[str, AnchorState]
) -> AuditError:
    """Why no entry of the log claims this token: emptied, rewritten, another token's log, or new."""
    path, token = report.path, anchor.description
    others = [e for e in report.chain if e.get("mac") and not anchor.claims(e)]
    owner = f"token '{others[-1].get('token')}' (serial {others[-1].get('serial')})" if others else None
    if state is not None:
        found = "the log was emptied" if report.entries == 0 else "the log was rewritten or replaced"
        if owner is not None:
            found = f"the log was replaced by a log of {owner}"
        return AuditError(
            f"no entry of the audit log {path} ({report.entries} entries) is anchored in {token}, which anchored"
            f" {state.entries} entries in it, the last being entry {state.seq}: {found}"
        )
    if owner is not None:
        return AuditError(
            f"no entry of the audit log {path} is anchored in {token}; its entries are anchored in {owner}:"
            " it is that token's log, verify it with that token"
        )
    return AuditError(
        f"no entry of the audit log {path} is anchored in {token}, and the token anchors no log at this path"
        f" ({_anchored_logs(states)}): no 'iscl keys' command on this token has written to this log, or the"
        " log was moved here"
    )


def _anchored_logs(states: dict[str, AnchorState]) -> str:
    if not states:
        return "it anchors no log yet"
    return "it anchors " + ", ".join(f"{s.log} ({s.entries} entries)" for s in states.values())
