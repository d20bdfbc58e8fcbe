"""Pkcs11KeyHolder against a real SoftHSM2 token (see conftest.py for the token pool)."""

from __future__ import annotations

import gc
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from iscl_hsm.crypto.des import DesKey, fix_parity, kcv
from iscl_hsm.engine import Config, Profile
from iscl_hsm.errors import ErrorCode, KeyHolderError
from iscl_hsm.keyholder import pkcs11 as p11holder
from iscl_hsm.keyholder.base import RecordKey
from iscl_hsm.keyholder.p11direct import direct_calls
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder, TokenDesKey
from iscl_hsm.keyholder.provision import store_key
from iscl_hsm.shared import doc_reference
from iscl_hsm.transport.blocking import IsclSocket
from iscl_hsm.wire import Encryption, Mac
from tests.helpers import cfg

from .conftest import (
    HOSPITAL_KEYS,
    SUITES,
    Hospitals,
    SoftHsm,
    SoftHsmToken,
    pre_v100_enc_key,
    secret_key_objects,
)

REPO = Path(__file__).resolve().parents[2]

AUTH_1 = bytes.fromhex("0123456789ABCDEF")  # FIPS 81 key, single DES
AUTH_2 = bytes.fromhex("0123456789ABCDEF FEDCBA9876543210")  # two-key triple DES
ENC_1 = bytes.fromhex("133457799BBCDFF1")  # single DES
ENC_2 = bytes.fromhex("0123456789ABCDEF 23456789ABCDEF01 456789ABCDEF0123")  # three-key triple DES
ENC_6_BAD_PARITY = bytes.fromhex("0022446688AACCEE")  # imported with its parity fixed


@pytest.fixture(scope="module")
def keyed(softhsm: SoftHsm) -> Iterator[SoftHsmToken]:
    """A token with known keys: auth 1 (DES), 2 (DES2), 4 (generated); enc 1 (DES), 2 (DES3),
    3 (generated), 6 (imported with bad parity). Auth 3 and enc 5 are missing on purpose."""
    token = softhsm.take()
    with Pkcs11KeyHolder(token.label, token.pin) as holder:
        assert store_key(holder, "auth", 1, AUTH_1) == kcv(AUTH_1) == bytes.fromhex("D5D44F")
        assert store_key(holder, "auth", 2, AUTH_2) == kcv(AUTH_2)
        assert len(store_key(holder, "auth", 4)) == 3
        assert store_key(holder, "enc", 1, ENC_1) == kcv(ENC_1)
        assert store_key(holder, "enc", 2, ENC_2) == kcv(ENC_2)
        assert len(store_key(holder, "enc", 3)) == 3
        assert store_key(holder, "enc", 6, ENC_6_BAD_PARITY) == kcv(fix_parity(ENC_6_BAD_PARITY))
    yield token


@pytest.fixture(scope="module")
def mixed(softhsm: SoftHsm) -> Iterator[SoftHsmToken]:
    """A token with enc keys a V1.00 link cannot use as they are: 1 made before V1.00 (DERIVE only,
    ENC_1), 2 triple DES (sensitive) and 3 triple DES (host-readable), both ENC_2."""
    token = softhsm.take()
    with Pkcs11KeyHolder(token.label, token.pin) as holder:
        with holder.session() as session:
            session.create_object(pre_v100_enc_key(1, ENC_1))
        store_key(holder, "enc", 2, ENC_2)
        store_key(holder, "enc", 3, ENC_2, host_readable=True)
    yield token


@pytest.fixture
def holder(keyed: SoftHsmToken) -> Iterator[Pkcs11KeyHolder]:
    with Pkcs11KeyHolder(keyed.label, keyed.pin) as opened:
        yield opened


@pytest.fixture
def token_holder(keyed: SoftHsmToken) -> Iterator[Pkcs11KeyHolder]:
    with Pkcs11KeyHolder(keyed.label, keyed.pin, record_keys="token") as opened:
        yield opened


def _token_key(holder: Pkcs11KeyHolder, index: int, block: bytes) -> TokenDesKey:
    derived = holder.derive_key(index, block)
    assert isinstance(derived, TokenDesKey)
    return derived


def _host_key(holder: Pkcs11KeyHolder, index: int, block: bytes) -> DesKey:
    derived = holder.derive_key(index, block)
    assert isinstance(derived, DesKey)
    return derived


def _session_key_count(holder: Pkcs11KeyHolder) -> int:
    with holder.session() as session:
        return len(
            list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: False}))
        )


# -- internal / external authenticate --------------------------------------------------------------


def test_internal_authenticate_is_des_ecb_of_the_block(holder: Pkcs11KeyHolder) -> None:
    assert holder.internal_authenticate(1, b"Now is t") == bytes.fromhex("3FA40E8A984D4815")
    for _ in range(20):
        block = secrets.token_bytes(8)
        assert holder.internal_authenticate(1, block) == DesKey(AUTH_1).encrypt_ecb(block)


def test_internal_authenticate_with_a_two_key_triple_des_key(holder: Pkcs11KeyHolder) -> None:
    block = secrets.token_bytes(8)
    assert holder.internal_authenticate(2, block) == DesKey(AUTH_2).encrypt_ecb(block)


def test_internal_authenticate_refuses_a_block_that_is_not_8_bytes(holder: Pkcs11KeyHolder) -> None:
    with pytest.raises(KeyHolderError) as caught:
        holder.internal_authenticate(1, b"short")
    assert caught.value.code is ErrorCode.BAD_LENGTH


def test_external_authenticate_accepts_a_right_cryptogram_once(holder: Pkcs11KeyHolder) -> None:
    challenge = holder.get_challenge(1)
    assert len(challenge) == 8
    cryptogram = DesKey(AUTH_1).encrypt_ecb(challenge)
    assert holder.external_authenticate(1, challenge, cryptogram) is True
    assert holder.external_authenticate(1, challenge, cryptogram) is False  # replayed


def test_external_authenticate_with_a_generated_key(holder: Pkcs11KeyHolder) -> None:
    challenge = holder.get_challenge(4)
    assert holder.external_authenticate(4, challenge, holder.internal_authenticate(4, challenge)) is True


def test_external_authenticate_consumes_the_challenge_on_failure(holder: Pkcs11KeyHolder) -> None:
    challenge = holder.get_challenge(1)
    right = DesKey(AUTH_1).encrypt_ecb(challenge)
    wrong = bytes([right[0] ^ 1]) + right[1:]
    assert holder.external_authenticate(1, challenge, wrong) is False
    assert holder.external_authenticate(1, challenge, right) is False


def test_external_authenticate_rejects_a_challenge_it_did_not_issue(holder: Pkcs11KeyHolder) -> None:
    made_up = secrets.token_bytes(8)
    assert holder.external_authenticate(1, made_up, DesKey(AUTH_1).encrypt_ecb(made_up)) is False
    issued_for_2 = holder.get_challenge(2)  # issued for key 2, checked under key 1
    assert holder.external_authenticate(1, issued_for_2, DesKey(AUTH_1).encrypt_ecb(issued_for_2)) is False


@pytest.mark.parametrize("right", [True, False], ids=["right", "wrong"])
def test_a_response_expected_ahead_is_checked_without_a_token_call_and_once(
    holder: Pkcs11KeyHolder, monkeypatch: pytest.MonkeyPatch, right: bool
) -> None:
    """expect_response works out E_AK(challenge) while the peer is busy; the check itself is then host work,
    still constant-time and still once only."""
    challenge = holder.get_challenge(1)
    holder.expect_response(1, challenge)
    holder.expect_response(1, secrets.token_bytes(8))  # not ours: nothing to work out, nothing kept
    calls = _token_calls(monkeypatch, holder)
    cryptogram = DesKey(AUTH_1).encrypt_ecb(challenge)
    if not right:
        cryptogram = bytes([cryptogram[0] ^ 1]) + cryptogram[1:]
    assert holder.external_authenticate(1, challenge, cryptogram) is right
    assert calls == []
    assert holder.external_authenticate(1, challenge, DesKey(AUTH_1).encrypt_ecb(challenge)) is False  # consumed


def test_challenges_are_not_shared_between_holders(keyed: SoftHsmToken) -> None:
    with Pkcs11KeyHolder(keyed.label, keyed.pin) as first, Pkcs11KeyHolder(keyed.label, keyed.pin) as second:
        challenge = first.get_challenge(1)
        assert second.external_authenticate(1, challenge, DesKey(AUTH_1).encrypt_ecb(challenge)) is False
        assert first.external_authenticate(1, challenge, DesKey(AUTH_1).encrypt_ecb(challenge)) is True


def test_outstanding_challenges_are_bounded(holder: Pkcs11KeyHolder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p11holder, "MAX_OUTSTANDING_CHALLENGES", 3)
    challenges = [holder.get_challenge(1) for _ in range(4)]
    assert holder.external_authenticate(1, challenges[0], DesKey(AUTH_1).encrypt_ecb(challenges[0])) is False
    for challenge in challenges[1:]:
        assert holder.external_authenticate(1, challenge, DesKey(AUTH_1).encrypt_ecb(challenge)) is True


# -- key derivation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "value"), [(1, ENC_1), (2, ENC_2), (6, fix_parity(ENC_6_BAD_PARITY))])
def test_derive_key_on_the_host_is_parity_of_ecb(holder: Pkcs11KeyHolder, index: int, value: bytes) -> None:
    block = secrets.token_bytes(8)
    expected = DesKey(fix_parity(DesKey(value).encrypt_ecb(block)))
    derived = holder.derive_key(index, block)
    assert isinstance(derived, DesKey)
    assert derived.kcv == expected.kcv
    iv, data = secrets.token_bytes(8), secrets.token_bytes(64)
    assert derived.encrypt_cbc(iv, data) == expected.encrypt_cbc(iv, data)
    assert derived.decrypt_cbc(iv, data) == expected.decrypt_cbc(iv, data)


def test_derive_key_on_the_host_leaves_no_object_behind(holder: Pkcs11KeyHolder) -> None:
    before = _session_key_count(holder)
    for _ in range(5):
        holder.derive_key(1, secrets.token_bytes(8))
    assert _session_key_count(holder) == before


@pytest.mark.parametrize(("index", "value"), [(1, ENC_1), (2, ENC_2)])
def test_derive_key_in_the_token_matches_host_des(
    token_holder: Pkcs11KeyHolder, index: int, value: bytes
) -> None:
    block = secrets.token_bytes(8)
    expected = DesKey(fix_parity(DesKey(value).encrypt_ecb(block)))
    with _token_key(token_holder, index, block) as derived:
        assert isinstance(derived, TokenDesKey)
        iv, data = secrets.token_bytes(8), secrets.token_bytes(8 * 100)
        assert derived.encrypt_cbc(iv, data) == expected.encrypt_cbc(iv, data)
        assert derived.decrypt_cbc(iv, data) == expected.decrypt_cbc(iv, data)
        assert derived.encrypt_cbc(iv, b"") == b""


def test_token_record_key_hides_its_value(token_holder: Pkcs11KeyHolder) -> None:
    block = secrets.token_bytes(8)
    value = fix_parity(DesKey(ENC_1).encrypt_ecb(block))
    derived = _token_key(token_holder, 1, block)
    assert value.hex() not in repr(derived).lower() and value.hex().upper() not in repr(derived)
    with pytest.raises(p11.AttributeSensitive):
        derived._key[Attribute.VALUE]
    attributes = derived._key.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.TOKEN])
    assert attributes == {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.TOKEN: False}
    derived.close()


def test_token_record_key_is_destroyed_by_close_or_when_dropped(token_holder: Pkcs11KeyHolder) -> None:
    before = _session_key_count(token_holder)
    derived = _token_key(token_holder, 1, secrets.token_bytes(8))
    assert _session_key_count(token_holder) == before + 1
    derived.close()
    derived.close()  # idempotent
    assert _session_key_count(token_holder) == before
    with pytest.raises(KeyHolderError):
        derived.encrypt_cbc(bytes(8), bytes(8))
    dropped = _token_key(token_holder, 1, secrets.token_bytes(8))
    del dropped
    gc.collect()
    token_holder.get_challenge(1)  # the next token call destroys what was dropped
    assert _session_key_count(token_holder) == before


def test_token_record_key_checks_lengths(token_holder: Pkcs11KeyHolder) -> None:
    with _token_key(token_holder, 1, secrets.token_bytes(8)) as derived:
        with pytest.raises(ValueError):
            derived.encrypt_cbc(bytes(7), bytes(8))
        with pytest.raises(ValueError):
            derived.decrypt_cbc(bytes(8), bytes(9))


# -- V1.00: encryption key N itself (encryption_key) ---------------------------------------------------

HOLDER_LOG = p11holder.__name__
LINK_TIMEOUT = 60.0
"""Seconds a socket operation may block: a safety net against hangs."""


def _des_cbc(key: bytes, iv: bytes, data: bytes) -> bytes:
    """DES-CBC by the cryptography package (OpenSSL), apart from iscl_hsm's own DES code."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    assert len(key) == 8
    encryptor = Cipher(TripleDES(key * 3), modes.CBC(iv)).encryptor()  # k|k|k is single DES
    return encryptor.update(data) + encryptor.finalize()


def _assert_des_key(record: RecordKey, value: bytes) -> None:
    """``record`` encrypts and decrypts DES-CBC exactly as the key ``value`` (which is never shown)."""
    iv, data = secrets.token_bytes(8), secrets.token_bytes(8 * 64)
    expected = _des_cbc(value, iv, data)
    assert record.encrypt_cbc(iv, data) == expected
    assert record.decrypt_cbc(iv, expected) == data


def _token_calls(monkeypatch: pytest.MonkeyPatch, holder: Pkcs11KeyHolder) -> list[object]:
    """Every operation ``holder`` runs on its token session from now on (the list grows)."""
    calls: list[object] = []
    run = holder._entry.run

    def counting(operation: Any) -> Any:
        calls.append(operation)
        return run(operation)

    monkeypatch.setattr(holder._entry, "run", counting)
    return calls


def _notices(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the key holder logged at INFO or above (under caplog.at_level(logging.INFO, HOLDER_LOG))."""
    return [r.getMessage() for r in caplog.records if r.name == HOLDER_LOG and r.levelno >= logging.INFO]


def test_a_host_readable_key_is_read_once_and_used_on_the_host(
    hospitals: Hospitals, holders: Callable[..., Pkcs11KeyHolder], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    holder = holders(hospitals.a)
    calls = _token_calls(monkeypatch, holder)
    with caplog.at_level(logging.INFO, logger=HOLDER_LOG):
        record = holder.encryption_key(3)
        assert calls, "the key was not read from the token"
        read = len(calls)
        assert holder.encryption_key(3) is record
    assert len(calls) == read  # the second time, nothing is asked of the token
    assert isinstance(record, DesKey) and record.in_process is True
    _assert_des_key(record, HOSPITAL_KEYS[("enc", 3)])
    assert not _notices(caplog)


def test_a_sensitive_key_is_used_in_the_token_and_outlives_its_record_key(
    hospitals: Hospitals, holders: Callable[..., Pkcs11KeyHolder], caplog: pytest.LogCaptureFixture
) -> None:
    value = HOSPITAL_KEYS[("enc", 4)]
    host_key = holders(hospitals.a).encryption_key(4)
    assert isinstance(host_key, DesKey)
    with caplog.at_level(logging.INFO, logger=HOLDER_LOG), hospitals.holder(hospitals.b) as holder:
        record = holder.encryption_key(4)
        assert holder.encryption_key(4) is record
        assert isinstance(record, TokenDesKey) and record.in_process is False
        iv, data = secrets.token_bytes(8), secrets.token_bytes(8 * 100)
        assert record.encrypt_cbc(iv, data) == host_key.encrypt_cbc(iv, data)
        assert record.decrypt_cbc(iv, data) == host_key.decrypt_cbc(iv, data)
        _assert_des_key(record, value)
        record.close()  # as a link's end might: the holder hands the same key to the next link
        assert record.encrypt_cbc(iv, data) == host_key.encrypt_cbc(iv, data)
        assert holder.encryption_key(4) is record
        assert _labelled(holder, "iscl-enc-4") == 1  # closing the record key destroyed nothing
    notices = _notices(caplog)
    assert len(notices) == 1, notices  # once, however often the key is asked for
    assert "iscl-enc-4" in notices[0] and hospitals.b.label in notices[0]
    assert "inside the token" in notices[0] and "--host-readable" in notices[0]
    with hospitals.holder(hospitals.b) as again:  # the holder closed: the key is still on the token
        assert _labelled(again, "iscl-enc-4") == 1
        _assert_des_key(again.encryption_key(4), value)


@pytest.mark.parametrize("which", ["a", "b"], ids=["host-readable", "sensitive"])
def test_record_keys_token_always_uses_the_key_in_the_token(
    hospitals: Hospitals,
    holders: Callable[..., Pkcs11KeyHolder],
    caplog: pytest.LogCaptureFixture,
    which: str,
) -> None:
    holder = holders(getattr(hospitals, which), "token")
    with caplog.at_level(logging.INFO, logger=HOLDER_LOG):
        record = holder.encryption_key(5)
    assert isinstance(record, TokenDesKey) and record.in_process is False
    _assert_des_key(record, HOSPITAL_KEYS[("enc", 5)])
    assert not _notices(caplog)  # the token was asked for, so there is nothing to tell


@pytest.mark.parametrize("record_keys", ["host", "token"])
def test_an_enc_key_made_before_v100_is_refused_and_says_what_to_do(
    mixed: SoftHsmToken, record_keys: str
) -> None:
    with Pkcs11KeyHolder(mixed.label, mixed.pin, record_keys=record_keys) as holder:
        with pytest.raises(KeyHolderError) as caught:
            holder.encryption_key(1)
        message = str(caught.value)
        assert caught.value.code is ErrorCode.KEY_NOT_FOUND
        assert "iscl-enc-1" in message and f"'{mixed.label}'" in message
        for remedy in (
            "can only derive keys",
            "make it again for V1.00, with the same value",
            "iscl keys rotate --purpose enc --index 1",
            f"{doc_reference('security-officer.md')}, section 2.3",
            "--enc-key-id session",
            "--profile hardened",
        ):
            assert remedy in message, message
        # It still serves the hardened profile and unique session keys, which derive from it.
        block = secrets.token_bytes(8)
        _assert_des_key(holder.derive_key(1, block), fix_parity(_des_cbc(ENC_1, bytes(8), block)))


@pytest.mark.parametrize("index", [2, 3], ids=["sensitive", "host-readable"])
def test_a_triple_des_enc_key_is_refused_as_v100s_des_key(mixed: SoftHsmToken, index: int) -> None:
    with Pkcs11KeyHolder(mixed.label, mixed.pin) as holder, pytest.raises(KeyHolderError) as caught:
        holder.encryption_key(index)
    message = str(caught.value)
    assert caught.value.code is ErrorCode.KEY_NOT_FOUND
    assert f"iscl-enc-{index}" in message and f"'{mixed.label}'" in message
    for words in ("triple DES", "single-DES key", "--enc-key-id session", "hardened profile"):
        assert words in message, message


@pytest.mark.parametrize(("encryption", "mac", "enc_key_id"), SUITES)
def test_a_v100_link_between_a_host_readable_and_a_sensitive_token(
    hospitals: Hospitals, holders: Callable[..., Pkcs11KeyHolder], encryption: Encryption, mac: Mac,
    enc_key_id: int,
) -> None:  # fmt: skip
    """V1.00 only: it is the profile that uses encryption key N itself (the hardened one derives keys)."""
    server, client = holders(hospitals.a), holders(hospitals.b)
    assert isinstance(server.encryption_key(1), DesKey)  # the two ends really differ
    assert isinstance(client.encryption_key(1), TokenDesKey)
    config = cfg(Profile.V100, encryption=encryption, mac=mac, enc_key_id=enc_key_id)
    messages = [os.urandom(size) for size in (0, 1, 8, 4099)]
    server_got, client_got = _echo_link(server, client, config, messages)
    assert server_got == messages
    assert client_got == [message[::-1] for message in messages]


def _echo_link(
    server: Pkcs11KeyHolder, client: Pkcs11KeyHolder, config: Config, messages: list[bytes]
) -> tuple[list[bytes], list[bytes | None]]:
    """A blocking link on loopback: the client sends each message and the server answers its reverse."""
    server_got: list[bytes] = []
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(LINK_TIMEOUT)

        def serve() -> None:
            try:
                sock, _ = listener.accept()
                with IsclSocket.accept(sock, key_holder=server, config=config) as link:
                    while (data := link.recv()) is not None:
                        server_got.append(data)
                        link.send(data[::-1])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        with IsclSocket.connect("127.0.0.1", port, key_holder=client, config=config) as link:
            client_got = []
            for message in messages:
                link.send(message)
                client_got.append(link.recv())
            link.close()
        thread.join(LINK_TIMEOUT)
    assert not thread.is_alive() and not errors, errors
    return server_got, client_got


def _labelled(holder: Pkcs11KeyHolder, label: str) -> int:
    """How many objects on the token carry ``label``."""
    with holder.session() as session:
        return len(list(session.get_objects({Attribute.LABEL: label})))


# -- key policy as stored ------------------------------------------------------------------------------


def _find(holder: Pkcs11KeyHolder, label: str, *, readable: bool = False) -> dict[Attribute, object]:
    """The policy attributes of the key labelled ``label``, after checking whether its value can be read."""
    with holder.session() as session:
        (key,) = session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
        if readable:
            assert len(key[Attribute.VALUE]) == 8
        else:
            with pytest.raises(p11.AttributeSensitive):
                key[Attribute.VALUE]
        wanted = [
            Attribute.ID,
            Attribute.TOKEN,
            Attribute.PRIVATE,
            Attribute.SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.ENCRYPT,
            Attribute.DECRYPT,
            Attribute.DERIVE,
            Attribute.SIGN,
            Attribute.WRAP,
            Attribute.UNWRAP,
            Attribute.MODIFIABLE,
            Attribute.COPYABLE,
        ]
        attributes: dict[Attribute, object] = key.get_attributes(wanted)
        return attributes


@pytest.mark.parametrize("label", ["iscl-auth-1", "iscl-auth-4"])
def test_auth_keys_encrypt_only_and_are_not_extractable(holder: Pkcs11KeyHolder, label: str) -> None:
    attributes = _find(holder, label)
    assert attributes[Attribute.ID] == bytes([1, int(label[-1]), 1])
    assert attributes[Attribute.ENCRYPT] is True
    for name in (Attribute.DECRYPT, Attribute.DERIVE, Attribute.SIGN, Attribute.WRAP, Attribute.UNWRAP):
        assert attributes[name] is False, name
    assert attributes[Attribute.SENSITIVE] is True and attributes[Attribute.EXTRACTABLE] is False
    assert attributes[Attribute.TOKEN] is True and attributes[Attribute.PRIVATE] is True
    assert attributes[Attribute.MODIFIABLE] is False and attributes[Attribute.COPYABLE] is False


def _assert_enc_capabilities(attributes: dict[Attribute, object]) -> None:
    """DERIVE (hardened profile, session keys), ENCRYPT and DECRYPT (V1.00 uses the key itself), no more."""
    for name in (Attribute.DERIVE, Attribute.ENCRYPT, Attribute.DECRYPT):
        assert attributes[name] is True, name
    for name in (Attribute.SIGN, Attribute.WRAP, Attribute.UNWRAP):
        assert attributes[name] is False, name
    assert attributes[Attribute.TOKEN] is True and attributes[Attribute.PRIVATE] is True
    assert attributes[Attribute.MODIFIABLE] is False and attributes[Attribute.COPYABLE] is False


@pytest.mark.parametrize("label", ["iscl-enc-1", "iscl-enc-3"])
def test_enc_keys_derive_encrypt_and_decrypt_and_are_not_extractable(
    holder: Pkcs11KeyHolder, label: str
) -> None:
    attributes = _find(holder, label)
    assert attributes[Attribute.ID] == bytes([2, int(label[-1]), 1])
    _assert_enc_capabilities(attributes)
    assert attributes[Attribute.SENSITIVE] is True and attributes[Attribute.EXTRACTABLE] is False


@pytest.mark.parametrize("value", [ENC_1, None], ids=["imported", "generated"])
def test_a_host_readable_enc_key_has_the_same_capabilities_and_can_be_read(
    mixed: SoftHsmToken, value: bytes | None
) -> None:
    index = 7 if value is None else 6
    with Pkcs11KeyHolder(mixed.label, mixed.pin) as holder:
        store_key(holder, "enc", index, value, host_readable=True)
        attributes = _find(holder, f"iscl-enc-{index}", readable=True)
    _assert_enc_capabilities(attributes)
    assert attributes[Attribute.SENSITIVE] is False and attributes[Attribute.EXTRACTABLE] is True


@pytest.mark.parametrize(
    ("purpose", "options", "refusal"),
    [
        ("auth", {"host_readable": True}, "only encryption keys can be made host-readable"),
        ("transport", {"host_readable": True}, "only encryption keys can be made host-readable"),
        ("enc", {"host_readable": True, "exportable": True}, "either exportable .* or host-readable"),
    ],
    ids=["auth", "transport", "enc-exportable-too"],
)
def test_only_enc_keys_can_be_host_readable_and_never_also_exportable(
    holder: Pkcs11KeyHolder, purpose: str, options: dict[str, bool], refusal: str
) -> None:
    with pytest.raises(KeyHolderError, match=refusal) as caught:
        p11holder.key_policy(purpose, **options)
    assert caught.value.code is ErrorCode.BAD_OPTION
    if purpose != "transport":  # store_key takes auth and enc keys; it refuses before touching the token
        with pytest.raises(KeyHolderError, match=refusal):
            store_key(holder, purpose, 8, None, **options)
        with holder.session() as session:
            assert not list(session.get_objects({Attribute.LABEL: f"iscl-{purpose}-8"}))


def test_store_key_refuses_a_duplicate_and_a_weak_key(holder: Pkcs11KeyHolder) -> None:
    with pytest.raises(KeyHolderError, match="iscl-auth-1"):
        store_key(holder, "auth", 1, None)
    with pytest.raises(KeyHolderError, match="weak"):
        store_key(holder, "auth", 7, bytes.fromhex("0101010101010101"))
    with pytest.raises(KeyHolderError):
        store_key(holder, "auth", 9, None)


def test_pkcs11_tool_lists_the_keys(softhsm: SoftHsm, keyed: SoftHsmToken) -> None:
    """An independent client (OpenSC) sees the labels, ids and usages of the key convention."""
    listed = secret_key_objects(softhsm, keyed.label, keyed.pin)
    objects = {obj["label"]: obj for obj in listed}
    assert len(objects) == len(listed), listed  # one version of each
    expected = {
        "iscl-auth-1",
        "iscl-auth-2",
        "iscl-auth-4",
        "iscl-enc-1",
        "iscl-enc-2",
        "iscl-enc-3",
        "iscl-enc-6",
    }
    assert set(objects) == expected, listed
    assert objects["iscl-auth-1"]["ID"] == "010101" and objects["iscl-auth-1"]["Usage"] == "encrypt"
    assert objects["iscl-auth-1"]["type"] == "DES"  # (pkcs11-tool 0.23 calls DES2 "unknown key algorithm 20")
    enc_usage = "encrypt, decrypt, derive"  # derive for the hardened profile, the key itself for V1.00
    assert objects["iscl-enc-2"]["type"] == "DES3" and objects["iscl-enc-2"]["Usage"] == enc_usage
    assert objects["iscl-auth-4"]["Access"] == "sensitive, always sensitive, never extractable, local"
    assert objects["iscl-enc-3"]["ID"] == "020301" and objects["iscl-enc-3"]["Usage"] == enc_usage
    assert objects["iscl-enc-3"]["Access"] == "sensitive, always sensitive, never extractable, local"


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "label"),
    [
        (lambda h: h.get_challenge(3), "iscl-auth-3"),
        (lambda h: h.internal_authenticate(3, bytes(8)), "iscl-auth-3"),
        (lambda h: h.external_authenticate(3, bytes(8), bytes(8)), None),
        (lambda h: h.derive_key(5, bytes(8)), "iscl-enc-5"),
    ],
)
def test_a_missing_key_is_named(holder: Pkcs11KeyHolder, keyed: SoftHsmToken, call, label) -> None:  # type: ignore[no-untyped-def]
    if label is None:  # no challenge was issued, so there is nothing to check against
        assert call(holder) is False
        return
    with pytest.raises(KeyHolderError) as caught:
        call(holder)
    assert caught.value.code is ErrorCode.KEY_NOT_FOUND
    assert f"'{label}'" in str(caught.value) and keyed.label in str(caught.value)
    assert "create" in str(caught.value)


def test_a_key_replaced_by_another_process_is_looked_up_again(softhsm: SoftHsm) -> None:
    """The cached key handles go stale when another process replaces a key; the next call finds the
    new key instead of failing (both calls that go straight through the function list)."""
    token = softhsm.take()
    block = secrets.token_bytes(8)
    replacement = (DesKey(AUTH_1), DesKey(ENC_1))
    with Pkcs11KeyHolder(token.label, token.pin) as holder:
        store_key(holder, "auth", 7, AUTH_2[8:])
        store_key(holder, "enc", 7, ENC_2[8:16])
        assert holder.internal_authenticate(7, block) == DesKey(AUTH_2[8:]).encrypt_ecb(block)
        holder.encrypt_blocks(7, [block])  # both handles are cached now
        code = (
            "from pkcs11 import Attribute\n"
            "from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder\n"
            "from iscl_hsm.keyholder.provision import store_key\n"
            f"with Pkcs11KeyHolder({token.label!r}, {token.pin!r}) as h:\n"
            "    with h.session() as s:\n"
            "        for label in ('iscl-auth-7', 'iscl-enc-7'):\n"
            "            for key in s.get_objects({Attribute.LABEL: label}):\n"
            "                key.destroy()\n"
            f"    store_key(h, 'auth', 7, {AUTH_1!r})\n"
            f"    store_key(h, 'enc', 7, {ENC_1!r})\n"
        )
        done = _python(code, softhsm.tool_env())
        assert done.returncode == 0, done.stderr
        assert holder.internal_authenticate(7, block) == replacement[0].encrypt_ecb(block)
        assert holder.encrypt_blocks(7, [block]) == replacement[1].encrypt_ecb(block)


# python-pkcs11 leaves a search whose start failed open, and its finalizer then fails again
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_session_that_ended_is_named(softhsm: SoftHsm) -> None:
    token = softhsm.take()
    with Pkcs11KeyHolder(token.label, token.pin) as holder:
        store_key(holder, "auth", 1, AUTH_1)
        store_key(holder, "enc", 1, ENC_1)
        with holder.session() as session:
            session.close()
        for call in (
            lambda: holder.internal_authenticate(1, bytes(8)),
            lambda: holder.derive_key(1, bytes(8)),
            lambda: holder.get_challenge(1),
        ):
            with pytest.raises(KeyHolderError) as caught:
                call()
            assert f"token '{token.label}'" in str(caught.value)
            assert "the token was removed or its session ended" in str(caught.value)
            assert "open the key holder again" in str(caught.value)


def test_direct_calls_answer_like_python_pkcs11_and_raise_its_errors(holder: Pkcs11KeyHolder) -> None:
    direct = direct_calls(os.path.realpath(p11holder.DEFAULT_MODULE))
    block = secrets.token_bytes(8)
    before = _session_key_count(holder)
    with holder.session() as session:
        auth, enc = (session.get_key(label=label) for label in ("iscl-auth-1", "iscl-enc-1"))
        handle = session.handle
        assert direct.encrypt_block(handle, auth.handle, Mechanism._DES_ECB, block) == DesKey(
            AUTH_1
        ).encrypt_ecb(block)
        assert direct.derive_value(handle, enc.handle, Mechanism.DES_ECB_ENCRYPT_DATA, block * 3) == (
            DesKey(ENC_1).encrypt_ecb(block * 3)
        )
        with pytest.raises(p11.SessionHandleInvalid):
            direct.encrypt_block(handle + 1000, auth.handle, Mechanism._DES_ECB, block)
        with pytest.raises((p11.KeyHandleInvalid, p11.ObjectHandleInvalid)):
            direct.derive_value(handle, 0xFFFFFF, Mechanism.DES_ECB_ENCRYPT_DATA, block)
        with pytest.raises(p11.PKCS11Error, match="CKR 0x00000068"):  # KEY_FUNCTION_NOT_PERMITTED
            direct.derive_value(handle, auth.handle, Mechanism.DES_ECB_ENCRYPT_DATA, block)
    assert _session_key_count(holder) == before  # the derivations, failed or not, left nothing behind


def test_a_key_id_outside_1_to_8_is_refused(holder: Pkcs11KeyHolder) -> None:
    for bad in (0, 9):
        with pytest.raises(KeyHolderError, match=r"outside 1\.\.8"):
            holder.get_challenge(bad)


def test_a_token_the_modules_scan_missed_is_found_in_a_fresh_scan(softhsm: SoftHsm) -> None:
    """SoftHSM2 scans its tokens once, when loaded. A token it did not see then (created since, or
    being rewritten by another process's login at that moment) is looked for again in a fresh scan
    while no key holder of the process has the module open. In a child process: this one's own
    key holders would keep it from rescanning."""
    first = softhsm.take()
    late = SoftHsmToken(f"iscl-late-{secrets.token_hex(4)}", secrets.token_hex(8), secrets.token_hex(8))
    init = ["softhsm2-util", "--init-token", "--free", "--label", late.label, "--so-pin", late.so_pin,
            "--pin", late.pin]  # fmt: skip
    code = (
        "import subprocess\n"
        "from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder\n"
        f"Pkcs11KeyHolder({first.label!r}, {first.pin!r}).close()  # loaded: the module has scanned\n"
        f"subprocess.run({init!r}, check=True, capture_output=True)\n"
        f"with Pkcs11KeyHolder({late.label!r}, {late.pin!r}):\n"
        "    print('opened')\n"
    )
    done = _python(code, softhsm.tool_env())
    assert done.returncode == 0 and done.stdout == "opened\n", done.stderr


def test_an_unknown_token_label_is_named_and_not_matched_by_prefix(keyed: SoftHsmToken) -> None:
    prefix = keyed.label[:-1]
    with pytest.raises(KeyHolderError) as caught:
        Pkcs11KeyHolder(prefix, keyed.pin)
    message = str(caught.value)
    assert f"'{prefix}' not found" in message
    assert f"'{keyed.label}'" in message  # the labels present are listed
    assert keyed.pin not in message


def test_a_wrong_pin_is_reported_without_the_pin(softhsm: SoftHsm) -> None:
    token = softhsm.take()
    wrong = "wrong-" + secrets.token_hex(6)
    with pytest.raises(KeyHolderError) as caught:
        Pkcs11KeyHolder(token.label, wrong)
    message = str(caught.value)
    assert "wrong PIN" in message and token.label in message and "tries" in message
    assert wrong not in message and wrong not in repr(caught.value)
    assert caught.value.__cause__ is None
    with Pkcs11KeyHolder(token.label, token.pin) as holder:  # the right PIN still works
        assert holder.description == f"PKCS#11 token '{token.label}' (module {token.module})"


def test_a_second_holder_shares_the_login_and_checks_the_pin(keyed: SoftHsmToken) -> None:
    with Pkcs11KeyHolder(keyed.label, keyed.pin) as first:
        second = Pkcs11KeyHolder(keyed.label, keyed.pin, record_keys="token")
        assert second._entry is first._entry
        wrong = "other-" + secrets.token_hex(4)
        with pytest.raises(KeyHolderError) as caught:
            Pkcs11KeyHolder(keyed.label, wrong)
        assert "differs" in str(caught.value) and wrong not in str(caught.value)
        second.close()
        assert first.internal_authenticate(1, b"Now is t") == bytes.fromhex("3FA40E8A984D4815")
    with pytest.raises(KeyHolderError, match="closed"):
        first.get_challenge(1)


def test_the_same_module_under_another_path_shares_the_login(keyed: SoftHsmToken, tmp_path: Path) -> None:
    alias = tmp_path / "libsofthsm2-alias.so"
    alias.symlink_to(keyed.module)
    with (
        Pkcs11KeyHolder(keyed.label, keyed.pin) as first,
        Pkcs11KeyHolder(keyed.label, keyed.pin, module=str(alias)) as second,
    ):
        assert second._entry is first._entry  # one C_Initialize and one login per module file
        assert second.description == f"PKCS#11 token '{keyed.label}' (module {alias})"


def test_repr_shows_no_pin(keyed: SoftHsmToken) -> None:
    with Pkcs11KeyHolder(keyed.label, keyed.pin) as holder:
        assert keyed.pin not in repr(holder) and keyed.label in repr(holder)


def test_a_missing_module_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "libnothere.so")
    with pytest.raises(KeyHolderError) as caught:
        Pkcs11KeyHolder("any", "1234", module=missing)
    assert missing in str(caught.value) and "Install softhsm2 or pass --pkcs11-module" in str(caught.value)


def test_a_file_that_is_not_a_module_is_named(tmp_path: Path) -> None:
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"not a shared object at all\n" * 10)
    with pytest.raises(KeyHolderError) as caught:
        Pkcs11KeyHolder("any", "1234", module=str(bogus))
    assert f"PKCS#11 module {bogus} could not be loaded" in str(caught.value)


def test_bad_record_keys_option() -> None:
    with pytest.raises(KeyHolderError) as caught:
        Pkcs11KeyHolder("any", "1234", record_keys="card")
    assert caught.value.code is ErrorCode.BAD_OPTION


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**env, "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=60
    )


def test_a_bad_softhsm2_conf_is_named(tmp_path: Path) -> None:
    conf = tmp_path / "missing.conf"
    env = {key: value for key, value in os.environ.items() if key != "OPENSSL_CONF"}
    env["SOFTHSM2_CONF"] = str(conf)
    done = _python(
        "from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder\n"
        "try:\n    Pkcs11KeyHolder('any', '1234')\nexcept Exception as e:\n    print(e)\n",
        env,
    )
    assert f"SOFTHSM2_CONF={conf}" in done.stdout and "does not exist" in done.stdout, (
        done.stdout + done.stderr
    )


def test_self_test_fails_loudly_without_the_legacy_provider(softhsm: SoftHsm) -> None:
    token = softhsm.take()
    env = {key: value for key, value in os.environ.items() if key != "OPENSSL_CONF"}
    code = (
        "import iscl_hsm.keyholder.pkcs11 as m\n"
        "m.enable_legacy_in_default_context = lambda: None  # what an OpenSSL without legacy looks like\n"
        "try:\n"
        f"    m.Pkcs11KeyHolder({token.label!r}, {token.pin!r})\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    done = _python(code, env)
    assert done.stdout.startswith("KeyHolderError single DES does not work"), done.stdout + done.stderr
    assert "legacy provider" in done.stdout


# -- threads ----------------------------------------------------------------------------------------


def test_many_threads_share_one_token_safely(keyed: SoftHsmToken) -> None:
    errors: list[BaseException] = []
    with (
        Pkcs11KeyHolder(keyed.label, keyed.pin) as host,
        Pkcs11KeyHolder(keyed.label, keyed.pin, record_keys="token") as token,
    ):

        def work() -> None:
            try:
                for _ in range(50):
                    challenge = host.get_challenge(1)
                    assert host.external_authenticate(1, challenge, DesKey(AUTH_1).encrypt_ecb(challenge))
                    block = secrets.token_bytes(8)
                    expected = DesKey(fix_parity(DesKey(ENC_1).encrypt_ecb(block)))
                    assert _host_key(host, 1, block).kcv == expected.kcv
                    with _token_key(token, 1, block) as derived:
                        assert derived.encrypt_cbc(bytes(8), bytes(32)) == expected.encrypt_cbc(
                            bytes(8), bytes(32)
                        )
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors


# -- provisioning command -----------------------------------------------------------------------------


def test_provision_command_creates_a_token_idempotently(tmp_path: Path) -> None:
    """Runs in a child process: this one has SoftHSM2 loaded with the session's configuration."""
    env = {key: value for key, value in os.environ.items() if key not in ("SOFTHSM2_CONF", "OPENSSL_CONF")}
    env["PYTHONPATH"] = str(REPO)
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# shared with the peer site\nauth 1 {AUTH_1.hex()}\nenc 2 {ENC_2.hex()}\n")
    data_dir = tmp_path / "site"
    command = [str(REPO / "softhsm" / "setup-token.sh"), "--data-dir", str(data_dir), "--label", "site-a",
               "--key-file", str(key_file)]  # fmt: skip
    first = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "iscl-auth-1    KCV D5D44F" in first.stdout
    assert f"iscl-enc-2     KCV {kcv(ENC_2).hex().upper()}" in first.stdout
    assert sum(line.startswith("iscl-") for line in first.stdout.splitlines()) == 16
    assert AUTH_1.hex() not in first.stdout.lower() and ENC_2.hex() not in first.stdout.lower()
    pin_file = data_dir / "pin"
    assert pin_file.stat().st_mode & 0o777 == 0o600
    assert pin_file.read_text().strip() not in first.stdout + first.stderr
    second = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout  # nothing new, same keys
    key_file.write_text(f"auth 1 {AUTH_2[8:].hex()}\n")
    third = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 1 and "iscl-auth-1" in third.stderr and "destroy it first" in third.stderr


def test_ensure_demo_token_in_the_default_data_dir(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("SOFTHSM2_CONF", "OPENSSL_CONF")}
    env["XDG_DATA_HOME"] = str(tmp_path)
    code = (
        "from iscl_hsm.keyholder.provision import ensure_demo_token\n"
        "from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder\n"
        "label, pin_file = ensure_demo_token()\n"
        "assert ensure_demo_token() == (label, pin_file)\n"
        "with Pkcs11KeyHolder(label, pin_file.read_text().strip()) as holder:\n"
        "    c = holder.get_challenge(8)\n"
        "    assert holder.external_authenticate(8, c, holder.internal_authenticate(8, c))\n"
        "    holder.derive_key(8, c)\n"
        "print(label, pin_file)\n"
    )
    done = _python(code, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["iscl-demo", str(tmp_path / "iscl-hsm" / "pin")]
    assert (tmp_path / "iscl-hsm").stat().st_mode & 0o777 == 0o700


def test_after_fork_the_child_opens_its_own_session(softhsm: SoftHsm) -> None:
    token = softhsm.take()
    code = (
        "import os\n"
        "from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder\n"
        "from iscl_hsm.keyholder.provision import store_key\n"
        f"h = Pkcs11KeyHolder({token.label!r}, {token.pin!r})\n"
        "store_key(h, 'auth', 1, None)\n"
        "c = h.get_challenge(1)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        h.get_challenge(1)\n"
        "        print('inherited holder worked')\n"
        "    except Exception as e:\n"
        "        print('inherited:', 'forked' in str(e))\n"
        f"    with Pkcs11KeyHolder({token.label!r}, {token.pin!r}) as h2:\n"
        "        c2 = h2.get_challenge(1)\n"
        "        print('child:', h2.external_authenticate(1, c2, h2.internal_authenticate(1, c2)))\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('parent:', h.external_authenticate(1, c, h.internal_authenticate(1, c)))\n"
    )
    done = _python(code, softhsm.tool_env())
    assert done.stdout.splitlines() == ["inherited: True", "child: True", "parent: True"], done.stderr
