"""One fault between a real `iscl server` and `iscl client`, at every frame position, in both profiles
(design.py says which cases; oracle.py what each must show)."""

from __future__ import annotations

import pytest

from .campaign import Campaign
from .cli import CliCase, CliResult
from .design import FRAMES, cli_cases, untouched
from .oracle import check_cli


@pytest.mark.parametrize("case", cli_cases(), ids=lambda case: case.id)
def test_one_fault_between_iscl_server_and_client(
    case: CliCase, cli_campaign: Campaign[CliCase, CliResult]
) -> None:
    check_cli(cli_campaign.result(case))


@pytest.mark.parametrize("case", untouched(False) + untouched(True), ids=lambda case: case.id)
def test_the_sessions_have_the_frames_the_design_assumes(
    case: CliCase, cli_campaign: Campaign[CliCase, CliResult]
) -> None:
    """Without a fault, each direction has the frames design.FRAMES counts (a two-way session's close
    may take one refusal fewer), so that the covering design's positions meet frames."""
    result = cli_campaign.result(case)
    assert result.link is not None
    expected = FRAMES[(case.two_way, case.suite.session_keys)]
    got = {direction: len(result.link.frames(direction)) for direction in expected}
    fewer = 1 if case.two_way else 0
    assert all(expected[d] - fewer <= got[d] <= expected[d] for d in got), (got, expected)
