"""Fixtures for tests against real components.

SoftHSM2 reads SOFTHSM2_CONF once, when a process first loads libsofthsm2.so, and never looks for
tokens created after that. So the session-scoped ``softhsm`` fixture points SOFTHSM2_CONF at a
private token directory and creates a pool of tokens (random labels, random PINs) before anything in
the test process loads the module; a test takes fresh tokens with ``softhsm.take()``. The fixture
fails, never skips, when SoftHSM2 is missing.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from iscl_hsm.keyholder.pkcs11 import DEFAULT_MODULE, is_module_loaded
from iscl_hsm.keyholder.provision import init_token, softhsm_environment

TOKEN_POOL_SIZE = 12
"""Tokens made up front; raise it when tests need more (each costs about 40 ms)."""


@dataclass(frozen=True)
class SoftHsmToken:
    """One initialised token: its label and PINs (test PINs, random per run)."""

    label: str
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)
    module: str = DEFAULT_MODULE


@dataclass
class SoftHsm:
    """The private SoftHSM2 installation of this test session."""

    data_dir: Path
    env: dict[str, str]
    pool: list[SoftHsmToken]
    module: str = DEFAULT_MODULE

    def take(self) -> SoftHsmToken:
        """A token no other test has used."""
        if not self.pool:
            pytest.fail(f"the SoftHSM2 token pool is used up; raise TOKEN_POOL_SIZE in {__file__}")
        return self.pool.pop()

    def tool_env(self) -> dict[str, str]:
        """Environment for command-line clients (pkcs11-tool, softhsm2-util) of these tokens."""
        return {**os.environ, **self.env}

    def slot_id(self, label: str) -> str:
        """Slot id (hex) of the token labelled exactly ``label``, from ``pkcs11-tool -L``."""
        listing = subprocess.run(
            ["pkcs11-tool", "--module", self.module, "-L"],
            env=self.tool_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        slot = None
        for line in listing.splitlines():
            match = re.match(r"Slot \d+ \((0x[0-9a-fA-F]+)\)", line)
            if match:
                slot = match.group(1)
            elif line.strip().startswith("token label") and line.split(":", 1)[1].strip() == label:
                assert slot is not None
                return slot
        pytest.fail(f"pkcs11-tool -L does not list a token labelled {label!r}:\n{listing}")


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    if not os.path.isfile(DEFAULT_MODULE):
        pytest.fail(f"SoftHSM2 is not installed ({DEFAULT_MODULE} missing): apt-get install softhsm2")
    if shutil.which("softhsm2-util") is None:
        pytest.fail("softhsm2-util is not installed: apt-get install softhsm2")
    if is_module_loaded(DEFAULT_MODULE):
        pytest.fail("libsofthsm2.so was loaded before the softhsm fixture could set SOFTHSM2_CONF")
    data_dir = tmp_path_factory.mktemp("softhsm")
    env = softhsm_environment(data_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", env["SOFTHSM2_CONF"])
        pool = []
        for _ in range(TOKEN_POOL_SIZE):
            token = SoftHsmToken(
                label=f"iscl-test-{secrets.token_hex(4)}",
                pin=secrets.token_hex(8),
                so_pin=secrets.token_hex(8),
            )
            init_token(token.label, token.so_pin, token.pin, env=env)
            pool.append(token)
        yield SoftHsm(data_dir=data_dir, env=env, pool=pool)
