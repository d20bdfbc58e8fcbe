"""The headline figures of a run, one column per wire profile: the handshake and its ratio to a
mutually authenticated TLS 1.3 handshake, and the DES-CBC and MD5 suites with their ratios to
`openssl speed`.

Nothing is measured here: the figures are taken from the handshake and throughput sections, where
every ratio was computed round by round, so the two columns come from the same rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks.common import Section, plain_md5
from benchmarks.latency import TLS, token_label
from benchmarks.throughput import iscl_name
from iscl_hsm.engine import Profile


@dataclass(frozen=True)
class Figure:
    """One headline row: which section's row (named per profile) and which of its figures."""

    label: str
    section: str
    row: Callable[[Profile], str]
    figure: str


def _suite(suite: str) -> Callable[[Profile], str]:
    return lambda profile: iscl_name(profile, suite)


FIGURES = (
    Figure("handshake on SoftHSM2 (des-cbc/des-mac), median ms", "handshake", token_label, "median_ms"),
    Figure("handshake ÷ Python TLS 1.3 mutual handshake", "handshake", token_label, "vs_tls"),
    Figure("des-cbc/des-mac, MB/s", "throughput", _suite("des-cbc/des-mac"), "mb_s"),
    Figure("des-cbc/des-mac ÷ openssl speed des-cbc", "throughput", _suite("des-cbc/des-mac"), "vs_des"),
    Figure("des-cbc/md5, MB/s", "throughput", _suite("des-cbc/md5"), "mb_s"),
    Figure("des-cbc/md5 ÷ openssl speed des-cbc", "throughput", _suite("des-cbc/md5"), "vs_des"),
    Figure("none/md5, MB/s", "throughput", _suite("none/md5"), "mb_s"),
    Figure("none/md5 ÷ openssl speed md5", "throughput", _suite("none/md5"), "vs_md5"),
)


def column(profile: Profile) -> str:
    """The figure key of ``profile``'s column ("v100", "hardened")."""
    return profile.name.lower()


def summarize(sections: Sequence[Section], profiles: Sequence[Profile]) -> Section | None:
    """The headline table from the measured sections; None when neither handshake nor throughput ran."""
    rows = {section.key: {row["label"]: row.get("figures", {}) for row in section.rows} for section in sections}
    headline = Section("headline", "Headline figures, the wire profiles side by side",
                       [(column(profile), profile.value) for profile in profiles])
    for figure in FIGURES:
        found = {column(p): rows[figure.section][figure.row(p)][figure.figure] for p in profiles
                 if figure.figure in rows.get(figure.section, {}).get(figure.row(p), {})}
        if found:
            headline.add(figure.label, **found)
    if not headline.rows:
        return None
    headline.notes.append(
        "Medians from the tables below, where each ratio was taken round by round with both profiles and the"
        " references (TLS, `openssl speed`) measured in the same rounds."
        + _references(rows)
    )
    if any(plain_md5(profile, "none/md5") for profile in profiles):
        headline.notes.append(
            "V1.00's none/md5 is the plain, unkeyed MD5 the SDK sends without encryption (allowed here with"
            " allow_unkeyed_md5 / --allow-unkeyed-md5): it detects no deliberate change. Hardened's is keyed."
        )
    return headline


def _references(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """" References: ..." naming the TLS handshake and `openssl speed` figures of the run, when measured."""
    parts = []
    if "median_ms" in (tls := rows.get("handshake", {}).get(TLS, {})):
        parts.append(f"Python ssl TLS 1.3 mutual handshake {tls['median_ms']:.2f} ms")
    for name in ("openssl des-cbc", "openssl md5"):
        if "mb_s" in (speed := rows.get("throughput", {}).get(name, {})):
            parts.append(f"`{name.replace('openssl', 'openssl speed -evp')}` {speed['mb_s']:.1f} MB/s")
    return f" References: {'; '.join(parts)}." if parts else ""
