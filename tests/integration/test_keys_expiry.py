"""Key expiry (``--not-after``) and roll-backs, on real SoftHSM2 tokens.

A key version may carry a not-after in its key record: ``iscl keys list`` warns 30 days ahead and
flags an expired one, ``--json`` carries it, and the key holder refuses an expired auth or enc key at
the handshake of a real link between two tokens, with one sentence that names the key, its version,
the date and what to do. A roll-back (deleting the current version of a rotated key) leaves the
version that is current again without its rotation's retire-after.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscl_hsm.engine import Config, Profile, Role
from iscl_hsm.errors import ErrorCode

from .conftest import SoftHsm
from .test_keys_ceremony import Site, _ceremony, _close, _handshake, make_sites

EXPIRED = "2020-01-01"


@pytest.fixture(scope="module")
def sites(softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site]]:
    a, b = make_sites(softhsm, tmp_path_factory.mktemp("expiry"), "Expiry Test")
    yield a, b


def _keys(site: Site) -> dict[tuple[str, int, int], dict[str, object]]:
    listing = json.loads(site.keys("list", "--json").stdout)
    return {(k["purpose"], k["index"], k["version"]): k for k in listing["keys"]}


def test_an_expired_auth_key_is_refused_at_the_handshake_until_it_is_rotated(
    sites: tuple[Site, Site], tmp_path: Path
) -> None:
    a, b = sites
    _ceremony(a, b, "enc", 1, tmp_path)
    _ceremony(a, b, "auth", 1, tmp_path, a_options=("--not-after", EXPIRED))
    pair = _handshake(a, b, Config(profile=Profile.HARDENED, auth_key_id=1, enc_key_id=1))
    try:
        error = pair.errors.get(Role.SERVER)
        assert error is not None and error.code is ErrorCode.KEY_EXPIRED, pair.errors
        sentence = str(error)
        for part in ("authentication key 1", "'iscl-auth-1'", "version 1", "expired on 2020-01-01T23:59:59Z",
                     f"'{a.token.label}'", "rotate"):  # fmt: skip
            assert part in sentence, sentence
        assert a.token.pin not in sentence
    finally:
        _close(pair)
    # The officer rotates the key (same new value at both sites): links work again at once.
    files = [str(tmp_path / f"rotated-{n}") for n in (1, 2)]
    a.keys("rotate", "--purpose", "auth", "--index", "1", "--grace", "0", "--generate-components", "2",
           *[x for f in files for x in ("--component-file", f)])  # fmt: skip
    b.keys("rotate", "--purpose", "auth", "--index", "1", "--grace", "0", "--import-components", "2",
           "--yes", *[x for f in files for x in ("--component-file", f)])  # fmt: skip
    pair = _handshake(a, b, Config(profile=Profile.HARDENED, auth_key_id=1, enc_key_id=1))
    try:
        assert not pair.errors, pair.errors
    finally:
        _close(pair)


def test_an_expired_enc_key_is_refused_at_the_client_in_both_profiles(
    sites: tuple[Site, Site], tmp_path: Path
) -> None:
    a, b = sites
    _ceremony(a, b, "auth", 2, tmp_path)
    _ceremony(b, a, "enc", 2, tmp_path, a_options=("--not-after", EXPIRED))  # expired at B only
    for profile in (Profile.V100, Profile.HARDENED):
        pair = _handshake(a, b, Config(profile=profile, auth_key_id=2, enc_key_id=2))
        try:
            error = pair.errors.get(Role.CLIENT)
            assert error is not None and error.code is ErrorCode.KEY_EXPIRED, (profile, pair.errors)
            assert "encryption key 2 (label 'iscl-enc-2') version 1" in str(error)
            assert f"'{b.token.label}'" in str(error)
        finally:
            _close(pair)


def test_list_warns_ahead_flags_expired_keys_and_json_carries_not_after(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    a.keys("generate", "--purpose", "auth", "--index", "6", "--not-after", "10d")
    a.keys("generate", "--purpose", "auth", "--index", "7", "--not-after", EXPIRED)
    a.keys("generate", "--purpose", "auth", "--index", "8", "--not-after", "2099-12-31")
    out = a.keys("list").stdout
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("auth ")}
    assert "not after" in rows["6"] and "(expires in 10 days)" in rows["6"], out
    assert "EXPIRED 2020-01-01T23:59:59Z" in rows["7"], out
    assert "not after 2099-12-31T23:59:59Z" in rows["8"] and "expires" not in rows["8"].lower(), out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert any("iscl-auth-6 version 1 expires in 10 days" in w and "rotate" in w for w in warnings), out
    assert any("iscl-auth-7 version 1 expired (2020-01-01T23:59:59Z)" in w for w in warnings), out
    assert not any("iscl-auth-8" in w for w in warnings), out
    keys = _keys(a)
    assert keys[("auth", 7, 1)]["not_after"] == "2020-01-01T23:59:59Z"
    assert keys[("auth", 8, 1)]["not_after"] == "2099-12-31T23:59:59Z"
    assert keys[("enc", 1, 1)]["not_after"] is None
    assert "not after 2020-01-01T23:59:59Z" in a.audit_log.read_text()


@pytest.mark.parametrize("text", ["2027-02-30", "soon", "365", "5w", "2027-12-31T25:00"])
def test_a_bad_not_after_is_a_usage_error_and_stores_nothing(sites: tuple[Site, Site], text: str) -> None:
    a, _ = sites
    done = a.keys("generate", "--purpose", "enc", "--index", "8", "--not-after", text, check=False)
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.startswith("iscl: --not-after") and "2027-12-31" in done.stderr and "365d" in done.stderr
    )
    assert "Traceback" not in done.stderr
    assert ("enc", 8, 1) not in _keys(a)


def test_a_roll_back_leaves_the_current_version_without_retire_after(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    a.keys("generate", "--purpose", "enc", "--index", "5")
    a.keys("rotate", "--purpose", "enc", "--index", "5", "--grace", "1d")
    assert _keys(a)[("enc", 5, 1)]["retire_after"] is not None
    a.keys("delete", "--purpose", "enc", "--index", "5", "--version", "2", "--yes")  # the roll-back
    version_1 = _keys(a)[("enc", 5, 1)]
    assert version_1["current"] is True and version_1["retire_after"] is None
    row = next(line for line in a.keys("list").stdout.splitlines() if line.startswith("enc       5"))
    assert "retire after" not in row and "current" in row
    # A later rotation gives the previous version the new grace period, not the rolled-back one.
    a.keys("rotate", "--purpose", "enc", "--index", "5", "--grace", "30d")
    retire_after = str(_keys(a)[("enc", 5, 1)]["retire_after"])
    assert retire_after > str(_keys(a)[("enc", 5, 2)]["created"])[:4]  # a date
    assert "no previous key version is due" in a.keys("retire", "--purpose", "enc", "--index", "5").stdout
