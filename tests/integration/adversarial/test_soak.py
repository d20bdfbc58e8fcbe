"""The soak (soak.py) at test size: a few dozen C-STOREs through a gateway pair per profile, a quarter of
their associations with a fault; `make soak` runs 10,000."""

from __future__ import annotations

from pathlib import Path

from ..conftest import Hospitals
from .soak import soak


def test_a_short_soak_loses_nothing_and_reports_every_failure(hospitals: Hospitals, tmp_path: Path) -> None:
    figures = soak(hospitals, tmp_path, stores=48, share=0.25, workers=4, seed=17)
    assert figures.ok, figures
    assert figures.stores_attempted == 48
    assert figures.reported_stored + figures.failures_reported == 48  # none hung
    assert figures.verified_identical == figures.reported_stored
    assert sum(figures.faults_injected.values()) >= 5, figures.faults_injected  # the seed makes about 12
    assert figures.tunnel_lines.get("malformed", 0) == 0, figures.tunnel_lines
