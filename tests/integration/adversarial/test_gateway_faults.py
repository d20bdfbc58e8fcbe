"""One fault between two `iscl tunnel` commands while DCMTK storescu stores one object through them into
storescp, in both profiles (design.gateway_cases says which; oracle.store_problems what each must show)."""

from __future__ import annotations

import pytest

from .campaign import Campaign
from .cli import frames_summary
from .design import GATEWAY_FRAMES, GatewayCase, gateway_cases
from .gateway import Store
from .oracle import check_store


@pytest.mark.parametrize("case", gateway_cases(), ids=lambda case: case.id)
def test_one_fault_between_two_tunnels_under_storescu(
    case: GatewayCase, gateway_campaign: Campaign[GatewayCase, Store]
) -> None:
    store = gateway_campaign.result(case)
    check_store(case.profile, case.suite, store)
    if case.fault is None:
        assert store.link is not None
        fewest = GATEWAY_FRAMES[case.suite.session_keys]
        short = [d for d in fewest if len(store.link.frames(d)) < fewest[d]]
        assert not short, "fewer frames than the design assumes: " + ", ".join(frames_summary(store.link))
