"""Shared fixtures of the engine unit tests."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from iscl_hsm.engine import Config
from tests.helpers import ConnectionPair

settings.register_profile(
    "iscl-unit", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("iscl-unit")


@pytest.fixture
def pair() -> ConnectionPair:
    """A default server/client pair (DES-CBC, DES-MAC, keys 1), not yet connected."""
    return ConnectionPair()


@pytest.fixture
def ready_pair() -> ConnectionPair:
    """A default pair after a successful handshake."""
    p = ConnectionPair()
    p.handshake()
    return p


@pytest.fixture
def make_ready():
    """Build and connect a pair with the same Config (or two Configs) on both ends."""

    def build(config: Config | None = None, client_config: Config | None = None, **kw: object) -> ConnectionPair:
        p = ConnectionPair(config, client_config if client_config is not None else config, **kw)  # type: ignore[arg-type]
        p.handshake()
        return p

    return build
