"""`iscl keys audit verify --token`: check an intact chain against the token its entries are anchored in."""

from __future__ import annotations

from ..keys.anchor import TokenAnchor, verify_anchored
from ..keys.audit import AuditReport
from ..keys.store import KeyStore


def verify_in_token(report: AuditReport, store: KeyStore) -> str:
    """Check ``report``'s log against the token of ``store``; return what to print."""
    anchor = TokenAnchor(store)
    checked = verify_anchored(report, anchor)
    text = (
        f"{anchor.description}: {checked.anchored} entries anchored in it, up to entry {checked.last}, as its"
        " anchor records"
    )
    if checked.pending is not None:
        text += (
            f"; entry {checked.pending} is anchored but not yet counted by the token (the command that wrote it"
            " was interrupted before updating the token; the next 'iscl keys' command on it counts it)"
        )
    if checked.unanchored_after:
        text += (
            f"; {checked.unanchored_after} later {'entry is' if checked.unanchored_after == 1 else 'entries are'}"
            " not anchored in it, and the token cannot show whether such entries were cut off"
        )
    return text
