"""Dual control without a token: witness passphrase hashes, witness names, and which commands take --witness."""

from __future__ import annotations

import argparse

import pytest

from iscl_hsm.cli.main import build_parser
from iscl_hsm.cli.witnessed import WITNESSED
from iscl_hsm.errors import KeyHolderError
from iscl_hsm.keys.policy import SCRYPT, check_name, hash_passphrase, passphrase_matches, same_name


def test_a_passphrase_hash_is_salted_slow_and_checks_only_the_passphrase() -> None:
    stored = hash_passphrase("correct horse battery")
    again = hash_passphrase("correct horse battery")
    assert stored["kdf"] == "scrypt" and {k: stored[k] for k in SCRYPT} == SCRYPT == {
        "n": 2**17,
        "r": 8,
        "p": 1,
    }
    assert stored["salt"] != again["salt"] and stored["hash"] != again["hash"]
    assert "correct horse battery" not in repr(stored)
    assert passphrase_matches(stored, "correct horse battery")
    assert not passphrase_matches(stored, "correct horse batterY")
    assert not passphrase_matches(stored, "")
    # The same text typed as decomposed accents (another keyboard or terminal) still matches.
    accented = hash_passphrase("caf\u00e9 au lait")
    assert passphrase_matches(accented, "cafe\u0301 au lait")


def test_a_short_passphrase_or_a_damaged_hash_is_refused() -> None:
    with pytest.raises(KeyHolderError, match="at least 8 characters"):
        hash_passphrase("1234567")
    stored = hash_passphrase("12345678")
    for damaged in (
        {**stored, "kdf": "md5"},
        {**stored, "salt": "zz"},
        {k: v for k, v in stored.items() if k != "hash"},
    ):
        with pytest.raises((ValueError, KeyError)):
            passphrase_matches(damaged, "12345678")
    with pytest.raises(ValueError):  # a forged record asking for 16 GiB is refused, not obeyed
        passphrase_matches({**stored, "n": 2**24}, "12345678")


@pytest.mark.parametrize("name", ["Bob", "Dr. Bob O'Neil", "bob@hospital-a", "Søren Kierkegaard", "x" * 64])
def test_witness_names_that_are_kept(name: str) -> None:
    assert check_name(f"  {name} ") == name


@pytest.mark.parametrize("name", ["", "   ", "Bob/2", "Bob\nMallory", "-bob", "x" * 65, "Bob;", "Bob\x00"])
def test_witness_names_that_are_refused(name: str) -> None:
    with pytest.raises(KeyHolderError, match="is not a name of 1 to 64"):
        check_name(name)


def test_names_compare_without_case_or_outer_spaces() -> None:
    assert same_name(" ALICE ", "alice")
    assert not same_name("Alice", "Alicia")


def _keys_actions() -> dict[str, argparse.ArgumentParser]:
    """Every `iscl keys` action's parser, by its audit name ("generate", "policy set")."""

    def children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    found = {}
    for name, parser in children(children(build_parser())["keys"]).items():
        nested = children(parser)
        found.update({f"{name} {sub}": p for sub, p in nested.items()} if nested else {name: parser})
    return found


def test_exactly_the_witnessed_actions_take_a_witness() -> None:
    actions = _keys_actions()
    assert set(WITNESSED) <= set(actions)
    for name, parser in actions.items():
        options = {option for action in parser._actions for option in action.option_strings}
        assert ("--witness" in options) is (name in WITNESSED), name
        assert ("--witness-passphrase-file" in options) is (name in WITNESSED), name
    assert {"list", "check", "policy show", "witness list", "init-token"} <= set(actions) - set(
        WITNESSED
    )
