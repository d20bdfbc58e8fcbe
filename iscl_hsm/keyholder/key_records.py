"""The key record a key version carries on the token, as far as the key holder needs it: its expiry.

A key record is a private CKO_DATA object (CKA_APPLICATION ``RECORD_APPLICATION``, CKA_LABEL the key's
label, CKA_VALUE a JSON object; :mod:`iscl_hsm.keys.store` writes it). Its optional ``not_after``
(UTC) ends the key version's use: the key holder reads it when it first looks the key up, and refuses
the key from that moment on, so a link cannot open with an expired key. The clock is read here, never
in the sans-I/O engine.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Final

from iscl_hsm.errors import ErrorCode, KeyHolderConfigError
from iscl_hsm.keyholder.data_objects import data_objects

RECORD_APPLICATION: Final = "iscl-hsm key record"


def utc_text(moment: datetime.datetime | None = None) -> str:
    """``moment`` (default: now) as the records and the audit log write it: 2027-12-31T23:59:59Z."""
    moment = moment or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_utc(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


@dataclass(frozen=True)
class Expiry:
    """The not-after of one key version (``what``: "authentication key 1 (label 'iscl-auth-1')")."""

    what: str
    version: int
    not_after: datetime.datetime

    def check(self, description: str, now: datetime.datetime | None = None) -> None:
        """Refuse the key once ``not_after`` has passed: one sentence naming it and what to do."""
        if (now or datetime.datetime.now(datetime.UTC)) < self.not_after:
            return
        raise KeyHolderConfigError(
            f"{self.what} version {self.version} on {description} expired on {utc_text(self.not_after)}"
            " (its not-after), so no link may use it; the security officer must rotate it (iscl keys rotate,"
            " at both sites) or, for a roll-back, delete the expired version",
            ErrorCode.KEY_EXPIRED,
        )


def read_expiry(session: Any, label: str, version: int, what: str) -> Expiry | None:
    """The not-after of ``label`` version ``version`` from its key record, None when it has none."""
    for _, record in data_objects(session, RECORD_APPLICATION, label):
        if record is None:
            continue
        try:
            if int(record["version"]) != version:
                continue
            not_after = record.get("not_after")
            return Expiry(what, version, parse_utc(not_after)) if not_after else None
        except (ValueError, KeyError, TypeError):
            continue
    return None
