"""Write the results: latest.json (everything), latest.md (the tables), latest.png (the plots).

Run: python3 benchmarks/report.py [RESULTS.json]  redraws latest.md and latest.png next to the JSON
(default benchmarks/results/latest.json) without measuring again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Section


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown(meta: dict[str, Any], sections: list[Section]) -> str:
    lines = [f"# iscl-hsm benchmark, {meta['date']}", ""]
    lines += [f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
              f"- load average before / after: {meta['load_before']} / {meta['load_after']}",
              f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
              f"- rounds per figure: {meta['rounds']} (medians; ratios taken round by round)"]  # fmt: skip
    if "profiles" in meta:  # (results written before the wire profiles existed have none)
        lines.append(f"- wire profiles: {', '.join(meta['profiles'])}")
    lines.append("")
    for section in sections:
        lines += [f"## {section.title}", ""]
        lines.append("| | " + " | ".join(header for _, header in section.columns) + " |")
        lines.append("|---" * (len(section.columns) + 1) + "|")
        for row in section.rows:
            if "unavailable" in row:
                cells = [f"not measured: {row['unavailable']}"] + [""] * (len(section.columns) - 1)
            else:
                cells = [_number(row["figures"][key]) if key in row["figures"] else "" for key, _ in section.columns]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [note for note in section.notes] + [""]
        if section.commands:
            lines += ["Commands:", "", "```", *section.commands, "```", ""]
    return "\n".join(lines)


PANEL_TITLES = {
    "sizes": "Throughput against message size, loopback",
    "concurrency": "Link set-up against simultaneous links",
    "handshake": "Handshake latency, loopback (both ends authenticated)",
    "dicom": "DICOM C-STORE, large-object study",
}


def plot(sections: list[Section], path: Path) -> bool:
    """Throughput against message size, set-up time against N, handshake latency, DICOM large objects.

    False (no file) without matplotlib or when none of those sections ran.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_key = {section.key: section for section in sections}
    panels = [key for key in ("sizes", "concurrency", "handshake", "dicom") if key in by_key]
    if not panels:
        return False
    columns = min(2, len(panels))
    rows = (len(panels) + 1) // 2
    figure, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4.5 * rows), squeeze=False)
    for axis, key in zip(axes.flat, panels, strict=False):
        section = by_key[key]
        if key == "handshake":
            _bars(axis, section, "median_ms", lambda label: label.split(" (")[0])
            axis.set_xlabel("handshake, median ms")
        elif key == "dicom":
            _bars(axis, section, "mb_s", lambda label: label.split(", ", 1)[1], prefix="large")
            axis.set_xlabel("C-STORE of the large-object study, MB/s")
        else:
            for name, series in section.series.items():
                axis.plot(series["x"], series["y"], marker="o", label=name)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.legend(fontsize=7)
            axis.grid(True, which="both", alpha=0.3)
            axis.set_xlabel("message size, bytes" if key == "sizes" else "simultaneous links N")
            axis.set_ylabel("MB/s" if key == "sizes" else "link set-up, ms")
        axis.set_title(PANEL_TITLES[key], fontsize=9)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _bars(axis: Any, section: Section, figure: str, name: Callable[[str], str], prefix: str = "") -> None:
    """Horizontal bars of one figure for the rows that have it (whose label starts with ``prefix``)."""
    rows = [row for row in section.rows if figure in row.get("figures", {}) and row["label"].startswith(prefix)]
    axis.barh([name(row["label"]) for row in rows], [row["figures"][figure] for row in rows])
    axis.invert_yaxis()
    axis.tick_params(axis="y", labelsize=7)
    axis.grid(True, axis="x", alpha=0.3)


def write(folder: Path, meta: dict[str, Any], sections: list[Section]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = folder / "latest.json", folder / "latest.md", folder / "latest.png"
    json_path.write_text(json.dumps({"meta": meta, "sections": [s.to_json() for s in sections]}, indent=2) + "\n")
    md_path.write_text(markdown(meta, sections))
    written = [json_path, md_path]
    if plot(sections, png_path):
        written.append(png_path)
    return written


def load(path: Path) -> tuple[dict[str, Any], list[Section]]:
    """Read a latest.json back (to redraw the markdown and the plot without measuring again)."""
    data = json.loads(path.read_text())
    sections = [Section(**{**s, "columns": [tuple(c) for c in s["columns"]]}) for s in data["sections"]]
    return data["meta"], sections


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json"
    print("\n".join(map(str, write(source.parent, *load(source)))))
