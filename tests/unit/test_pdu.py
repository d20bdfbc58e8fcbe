"""iscl_hsm.dicom.pdu: which reads announce a data set, on PDUs that pynetdicom itself encodes."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from pynetdicom.pdu import A_RELEASE_RQ

from iscl_hsm.dicom.pdu import announces_data_set
from tests.dimse import echo_request, store_request, store_response


def test_a_store_requests_command_announces_its_data_set_and_its_fragments_do_not() -> None:
    command, *fragments = store_request()
    assert len(fragments) > 1
    assert announces_data_set(command)
    assert not any(announces_data_set(fragment) for fragment in fragments)


def test_whole_pdus_before_the_command_still_count() -> None:
    command, *fragments = store_request()
    assert announces_data_set(fragments[-1] + command)  # the end of one object, then the next command


def test_commands_without_a_data_set_do_not() -> None:
    assert not announces_data_set(echo_request())
    assert not announces_data_set(store_response())


def test_a_command_split_over_several_fragments_does_not() -> None:
    """Only a fragment that holds a whole command set is read; the others might be misread."""
    split = store_request(max_pdu=64)
    assert len(split) > 2
    assert not any(announces_data_set(pdu) for pdu in split)


@pytest.mark.parametrize(
    "cut",
    [lambda b: b[:-1], lambda b: b[:5], lambda b: b[1:], lambda b: b + b"\x04"],
    ids=["short", "header-only", "shifted", "trailing-byte"],
)
def test_anything_but_whole_pdus_does_not(cut: Callable[[bytes], bytes]) -> None:
    assert not announces_data_set(cut(store_request()[0]))


def test_other_pdus_and_other_bytes_do_not() -> None:
    assert not announces_data_set(A_RELEASE_RQ().encode())
    assert not announces_data_set(b"")
    assert not announces_data_set(os.urandom(200))
    assert not announces_data_set(bytes(1 << 20))  # a tunnel carrying something else
    command = store_request()[0]
    assert not announces_data_set(b"\x05" + command[1:])  # the same bytes, another PDU type
