"""How long a key version lives: the grace period after a rotation, and its not-after.

``--grace`` keeps the previous versions for a while after a rotation (``iscl keys retire`` then
removes them). A key version may carry a not-after (UTC) in its key record; the key holder refuses
the version from then on (:mod:`iscl_hsm.keyholder.key_records`). ``iscl keys list`` warns
:data:`WARN_AHEAD` before.
"""

from __future__ import annotations

import datetime
import math
import re

from iscl_hsm.errors import ErrorCode, KeyHolderError
from iscl_hsm.keyholder.key_records import parse_utc

WARN_AHEAD = datetime.timedelta(days=30)
"""How long before its not-after ``iscl keys list`` starts to warn about a key."""
NOT_AFTER_HELP = (
    "the key version may be used until this date (UTC, the whole day: 2027-12-31) or for this long"
    " from now (365d, 12h); from then on links with it fail until it is rotated. `iscl keys list` warns"
    " 30 days ahead (default: no expiry)"
)


def parse_duration(text: str) -> datetime.timedelta:
    """'0', '45s', '30m', '12h' or '7d'."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text or "")
    if match is None or (match.group(2) == "" and int(match.group(1)) != 0):
        raise KeyHolderError(
            f"grace period {text!r} is not a duration like 30m, 12h or 7d (or 0)", ErrorCode.BAD_OPTION
        )
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return datetime.timedelta(seconds=int(match.group(1)) * unit)


def parse_not_after(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """--not-after: a date (the key serves through that day, UTC) or a duration from ``now``."""
    now = now or datetime.datetime.now(datetime.UTC)
    stripped = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", stripped):
            day = datetime.date.fromisoformat(stripped)
            return datetime.datetime.combine(day, datetime.time(23, 59, 59), datetime.UTC)
        if re.fullmatch(r"\d+\s*[smhd]", stripped):
            return now + parse_duration(stripped)
    except ValueError:  # 2027-02-30
        pass
    raise KeyHolderError(
        f"--not-after {text!r} is neither a date like 2027-12-31 nor a duration like 365d or 12h",
        ErrorCode.BAD_OPTION,
    )


def expiry_flag(not_after: str | None, now: datetime.datetime | None = None) -> str | None:
    """'EXPIRED', 'expires in N days' within WARN_AHEAD, else None (also for a key without expiry)."""
    if not not_after:
        return None
    left = parse_utc(not_after) - (now or datetime.datetime.now(datetime.UTC))
    if left <= datetime.timedelta(0):
        return "EXPIRED"
    if left > WARN_AHEAD:
        return None
    days = math.ceil(left / datetime.timedelta(days=1))
    return "expires within a day" if days == 1 else f"expires in {days} days"
