"""Shared fixtures of the engine unit tests.

Tests that take ``profile`` run once per wire profile; a test that holds for one profile only says so
with ``@HARDENED_ONLY`` or ``@V100_ONLY`` from tests.helpers (a direct parametrization of ``profile``).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from iscl_hsm.engine import Config, Profile
from tests.helpers import ConnectionPair, cfg

settings.register_profile(
    "iscl-unit", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.load_profile("iscl-unit")

@pytest.fixture(params=list(Profile), ids=lambda p: p.value)
def profile(request: pytest.FixtureRequest) -> Profile:
    """Each profile in turn."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def pair(profile: Profile) -> ConnectionPair:
    """A default server/client pair (DES-CBC, DES-MAC, keys 1), not yet connected."""
    return ConnectionPair(profile=profile)


@pytest.fixture
def ready_pair(profile: Profile) -> ConnectionPair:
    """A default pair after a successful handshake."""
    p = ConnectionPair(profile=profile)
    p.handshake()
    return p


@pytest.fixture
def make_ready(profile: Profile):
    """Build and connect a pair with the same settings (or two Configs) on both ends."""

    def build(config: Config | None = None, client_config: Config | None = None, **kw: object) -> ConnectionPair:
        server = config or cfg(profile)
        p = ConnectionPair(server, client_config if client_config is not None else server, **kw)  # type: ignore[arg-type]
        p.handshake()
        return p

    return build
