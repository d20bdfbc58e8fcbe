"""The gateway's targets against the TLS tunnel a site would otherwise deploy: the ISCL tunnel pair
beside a stunnel TLS 1.3 pair, from the DICOM and concurrency tables (where both were measured in the
same rounds and every ratio was taken round by round).

Targets: hardened none/md5 (its MD5 encrypted) at least 0.8x the stunnel pair's rate, for the small
objects and the large study; DES-CBC + DES-MAC through the gateway as close to the engine's own DES
rate (the throughput table) as before, 0.91-0.93x, in both profiles; N links arriving at once all up
sooner than through stunnel. Nothing is measured here.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.common import Section
from benchmarks.concurrency import SUITE as CONCURRENCY_SUITE
from benchmarks.concurrency import gateway_label, stunnel_label
from benchmarks.dicom_store import DIRECT, FLOOR, STUNNEL, gateway_row
from benchmarks.throughput import iscl_name
from iscl_hsm.engine import Profile

MD5_TARGET, DES_TARGET = 0.8, 0.91
DES = "des-cbc/des-mac"


def _dicom_rows(section: Section) -> dict[tuple[str, str], dict[str, float]]:
    """(study, path) -> figures, where the study is "small" or "large"."""
    rows = {}
    for row in section.rows:
        if "figures" in row:
            study, path = row["label"].split(", ", 1)
            rows[(study.split(":")[0], path)] = row["figures"]
    return rows


def summarize(sections: Sequence[Section], profiles: Sequence[Profile]) -> Section | None:
    """The comparison table; None when the DICOM table has no stunnel row (or did not run)."""
    by_key = {section.key: section for section in sections}
    if "dicom" not in by_key:
        return None
    dicom = _dicom_rows(by_key["dicom"])
    if ("large", STUNNEL) not in dicom:
        return None
    summary = Section(
        "stunnel", "The ISCL gateway beside a stunnel TLS 1.3 pair (DCMTK storescu -> storescp, same rounds)",
        [("gateway", "gateway"), ("stunnel", "stunnel"), ("ratio", "gateway ÷ stunnel"),
         ("vs_engine", "÷ engine's DES rate"), ("target", "target (none/md5: ÷ stunnel; DES: ÷ engine)")],
    )  # fmt: skip
    suites = [(Profile.HARDENED, "none/md5")] if Profile.HARDENED in profiles else []
    suites += [(profile, DES) for profile in profiles]
    engine = {row["label"]: row["figures"] for row in by_key["throughput"].rows if "figures" in row} \
        if "throughput" in by_key else {}
    for profile, suite in suites:
        for study, unit in (("small", "files_s"), ("large", "mb_s")):
            gateway = dicom.get((study, gateway_row(profile, suite)))
            if gateway is None:
                continue
            figures = {"gateway": gateway[unit], "stunnel": dicom[(study, STUNNEL)][unit],
                       "ratio": gateway["vs_stunnel"]}
            if suite == "none/md5":
                figures["target"] = MD5_TARGET
            elif study == "large" and "mb_s" in engine.get(iscl_name(profile, DES), {}):
                figures["vs_engine"] = gateway["mb_s"] / engine[iscl_name(profile, DES)]["mb_s"]
                figures["target"] = DES_TARGET
            summary.add(f"{study}, {profile.value} {suite}, {'files/s' if unit == 'files_s' else 'MB/s'}", **figures)
    _add_cpu(summary, dicom, profiles)
    _add_concurrency(summary, by_key.get("concurrency"), profiles)
    summary.notes.append(
        "Rates are the DICOM table's medians, each ratio the median of the per-round ratios. The DES row's"
        " '÷ engine's DES rate' divides the gateway's large-study rate by the throughput table's ISCL"
        " des-cbc/des-mac rate (1 MiB messages, blocking transport): those were measured in other rounds"
        " of the same run. The CPU rows are ms per MB of the large study: the whole path (storescu,"
        " storescp, both tunnels) and the two tunnels alone, against the floor of a pair that checks every"
        " byte with MD5 at each end (DCMTK's own CPU per MB plus OpenSSL's MD5 twice). The last rows are"
        " the time until the last of N links arriving at once is up (lower is better)."
    )
    return summary


def _add_cpu(summary: Section, dicom: dict[tuple[str, str], dict[str, float]], profiles: Sequence[Profile]
             ) -> None:
    gateway = dicom.get(("large", gateway_row(Profile.HARDENED, "none/md5"))) if Profile.HARDENED in profiles else None
    stunnel, floor = dicom[("large", STUNNEL)], dicom[("large", FLOOR)]["path_ms_mb"]
    for figure, what in (("path_ms_mb", "whole path"), ("tunnels_ms_mb", "the two tunnels")):
        figures = {"stunnel": stunnel[figure]}
        if gateway is not None:
            figures |= {"gateway": gateway[figure], "ratio": gateway[figure] / stunnel[figure]}
        summary.add(f"large, hardened none/md5, CPU ms per MB, {what}", **figures)
    direct = dicom[("large", DIRECT)]["path_ms_mb"]
    summary.add("large, floor of an MD5-checking pair, CPU ms per MB (DCMTK alone: "
                f"{direct:.2f})", gateway=floor)
    if gateway is not None:
        summary.add("large, hardened none/md5, whole path's CPU ÷ the floor", gateway=gateway["path_ms_mb"] / floor)


def _add_concurrency(summary: Section, section: Section | None, profiles: Sequence[Profile]) -> None:
    """The largest N's time until all links are up, gateway beside stunnel, for each profile."""
    if section is None:
        return
    rows = {row["label"]: row["figures"] for row in section.rows if "figures" in row}
    counts = [int(label.split(",")[0][2:]) for label in rows if label.startswith("N=")]
    if not counts:
        return
    count = max(counts)
    stunnel = rows.get(stunnel_label(count))
    if stunnel is None:
        return
    for profile in profiles:
        gateway = rows.get(gateway_label(count, profile))
        if gateway is not None:
            summary.add(f"N={count} links at once, {profile.value} {CONCURRENCY_SUITE}, ms until all are up",
                        gateway=gateway["all_up_ms"], stunnel=stunnel["all_up_ms"], ratio=gateway["all_up_vs_stunnel"])
