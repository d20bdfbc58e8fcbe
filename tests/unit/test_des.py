"""Single and triple DES through OpenSSL's legacy provider: published vectors and cross-checks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from iscl_hsm.crypto import des
from iscl_hsm.crypto.des import DesKey

KEY = bytes.fromhex("0123456789ABCDEF")
FIPS81_IV = bytes.fromhex("1234567890ABCDEF")
FIPS81_PLAIN = b"Now is the time for all "
FIPS81_CIPHER = bytes.fromhex("E5C7CDDE872BF27C43E934008C389C0F683788499A7C05F6")
ROOT = Path(__file__).resolve().parents[2]


def reference(key: bytes, mode: modes.CBC | modes.ECB, encrypt: bool, data: bytes) -> bytes:
    """The ``cryptography`` package's triple DES, which equals single DES when the key is k|k|k.

    A two-key k1|k2 is given as the equal three-key k1|k2|k1, which ``cryptography`` does not deprecate.
    """
    cipher = Cipher(TripleDES(key if len(key) == 24 else key + key[:8]), mode)
    context = cipher.encryptor() if encrypt else cipher.decryptor()
    return context.update(data) + context.finalize()


def test_ecb_known_answer() -> None:
    key = DesKey(KEY)
    assert key.encrypt_ecb(b"Now is t") == bytes.fromhex("3FA40E8A984D4815")
    assert key.decrypt_ecb(bytes.fromhex("3FA40E8A984D4815")) == b"Now is t"


def test_fips81_cbc_known_answer() -> None:
    key = DesKey(KEY)
    assert key.encrypt_cbc(FIPS81_IV, FIPS81_PLAIN) == FIPS81_CIPHER
    assert key.decrypt_cbc(FIPS81_IV, FIPS81_CIPHER) == FIPS81_PLAIN


def test_fips113_des_mac_known_answer() -> None:
    mac = des.des_mac(DesKey(KEY), b"7654321 Now is the time for ")
    assert mac == bytes.fromhex("F1D30F6849312CA4")


def test_des_mac_padding_method_1() -> None:
    key = DesKey(KEY)
    assert des.des_mac(key, b"") == key.encrypt_ecb(bytes(8))
    assert des.des_mac(key, b"abc") == des.des_mac(key, b"abc\0\0\0\0\0")
    last_block = key.encrypt_cbc(bytes(8), FIPS81_PLAIN)[-8:]
    assert des.des_mac(key, FIPS81_PLAIN) == last_block  # no padding block when already aligned
    assert des.des_mac(key, bytearray(FIPS81_PLAIN)) == last_block


def test_kcv() -> None:
    assert des.kcv(KEY) == bytes.fromhex("D5D44F")
    assert DesKey(KEY).kcv == bytes.fromhex("D5D44F")


def test_self_test_passes() -> None:
    des.self_test()


@pytest.mark.parametrize("size", [0, 8, 24, 8160, 65536])
def test_single_des_equals_triple_des_with_repeated_key(size: int) -> None:
    raw_key, iv, data = os.urandom(8), os.urandom(8), os.urandom(size)
    key, triple = DesKey(raw_key), raw_key * 3
    assert key.encrypt_cbc(iv, data) == reference(triple, modes.CBC(iv), True, data)
    assert key.decrypt_cbc(iv, data) == reference(triple, modes.CBC(iv), False, data)
    assert key.encrypt_ecb(data) == reference(triple, modes.ECB(), True, data)
    assert key.decrypt_ecb(data) == reference(triple, modes.ECB(), False, data)


@pytest.mark.parametrize("length", [16, 24])
def test_triple_des_keys_equal_cryptography(length: int) -> None:
    raw_key, iv, data = os.urandom(length), os.urandom(8), os.urandom(4096)
    key = DesKey(raw_key)
    assert key.encrypt_cbc(iv, data) == reference(raw_key, modes.CBC(iv), True, data)
    assert key.decrypt_cbc(iv, data) == reference(raw_key, modes.CBC(iv), False, data)
    assert key.encrypt_ecb(data) == reference(raw_key, modes.ECB(), True, data)
    assert key.decrypt_ecb(data) == reference(raw_key, modes.ECB(), False, data)


def test_alternating_directions_and_modes_on_one_key() -> None:
    key, iv = DesKey(KEY), FIPS81_IV
    for _ in range(3):
        assert key.encrypt_cbc(iv, FIPS81_PLAIN) == FIPS81_CIPHER
        assert key.encrypt_ecb(b"Now is t") == bytes.fromhex("3FA40E8A984D4815")
        assert key.decrypt_cbc(iv, FIPS81_CIPHER) == FIPS81_PLAIN
        assert key.decrypt_ecb(bytes.fromhex("3FA40E8A984D4815")) == b"Now is t"


def test_parity() -> None:
    assert des.has_odd_parity(KEY)
    assert not des.has_odd_parity(bytes(8))
    assert des.fix_parity(bytes(8)) == bytes.fromhex("0101010101010101")
    assert des.fix_parity(KEY) == KEY
    every_byte = bytes(range(256))
    fixed = des.fix_parity(every_byte)
    assert des.has_odd_parity(fixed)
    assert all(a & 0xFE == b & 0xFE for a, b in zip(every_byte, fixed))


@pytest.mark.parametrize(
    "hex_key",
    ["0101010101010101", "FEFEFEFEFEFEFEFE", "01FE01FE01FE01FE", "0000000000000000", "E0E0E0E0F1F1F1F1"],
)
def test_weak_keys(hex_key: str) -> None:
    key = bytes.fromhex(hex_key)
    assert des.is_weak(key)
    assert des.is_weak(KEY + key)
    assert des.is_weak(KEY + KEY + key)


def test_weak_key_table_has_the_defining_property() -> None:
    """Each of the 16 keys has a partner (itself, if weak) whose encryption undoes its own."""
    assert len(des._WEAK_KEYS) == 16
    block = os.urandom(8)
    keys = {raw: DesKey(raw) for raw in des._WEAK_KEYS}
    for raw, key in keys.items():
        once = key.encrypt_ecb(block)
        assert sum(other.encrypt_ecb(once) == block for other in keys.values()) == 1, raw.hex()


def test_strong_keys() -> None:
    assert not des.is_weak(KEY)
    assert not des.is_weak(KEY * 2)
    assert not des.is_weak(KEY * 3)


@pytest.mark.parametrize("length", [0, 7, 9, 15, 32])
def test_wrong_key_length_does_not_reveal_key(length: int) -> None:
    secret = bytes.fromhex("A5C3E1F7B9D2864F" * 4)[:length]
    for call in (DesKey, des.is_weak, des.kcv):
        with pytest.raises(ValueError) as caught:
            call(secret)
        text = str(caught.value)
        assert str(length) in text
        if secret:
            assert secret.hex() not in text.lower()
            assert repr(secret) not in text


def test_wrong_data_and_iv_lengths() -> None:
    key = DesKey(KEY)
    with pytest.raises(ValueError, match="multiple of 8"):
        key.encrypt_cbc(bytes(8), bytes(7))
    with pytest.raises(ValueError, match="multiple of 8"):
        key.decrypt_ecb(bytes(9))
    with pytest.raises(ValueError, match="IV"):
        key.encrypt_cbc(bytes(7), bytes(8))
    with pytest.raises(ValueError, match="IV"):
        key.decrypt_cbc(bytes(16), bytes(8))


@pytest.mark.parametrize(
    "raw_key", [KEY, KEY * 2, bytes.fromhex("0123456789ABCDEF FEDCBA9876543210 89ABCDEF01234567")]
)
def test_repr_hides_key(raw_key: bytes) -> None:
    key = DesKey(raw_key)
    text = repr(key)
    for part in (raw_key[i : i + 8] for i in range(0, len(raw_key), 8)):
        assert part.hex() not in text.lower()
    assert key.kcv.hex().upper() in text
    assert repr(DesKey(KEY)) == "<DesKey single-DES kcv=D5D44F>"


def test_buffer_types() -> None:
    key = DesKey(bytearray(KEY))
    writable = bytearray(b"xx" + FIPS81_PLAIN)
    inputs: list[des.BytesLike] = [
        FIPS81_PLAIN,
        bytearray(FIPS81_PLAIN),
        memoryview(FIPS81_PLAIN),
        memoryview(writable)[2:],
        memoryview(bytearray(FIPS81_PLAIN)),
        memoryview(bytearray(b"".join(bytes([c, 0]) for c in FIPS81_PLAIN)))[::2],  # not contiguous
        memoryview(bytearray(FIPS81_PLAIN)).cast("I"),
    ]
    for data in inputs:
        assert key.encrypt_cbc(memoryview(FIPS81_IV), data) == FIPS81_CIPHER
        assert key.encrypt_cbc(bytearray(FIPS81_IV), data) == FIPS81_CIPHER
    assert key.decrypt_cbc(FIPS81_IV, bytearray(FIPS81_CIPHER)) == FIPS81_PLAIN
    assert key.decrypt_cbc(FIPS81_IV, memoryview(FIPS81_CIPHER)) == FIPS81_PLAIN
    assert bytes(writable) == b"xx" + FIPS81_PLAIN  # input left alone
    result = key.encrypt_ecb(bytearray(8))
    assert type(result) is bytes and result == key.encrypt_ecb(bytes(8))


def test_threads_share_one_key() -> None:
    raw_key = os.urandom(8)
    key = DesKey(raw_key)
    jobs = []
    for _ in range(4):
        iv, data = os.urandom(8), os.urandom(8160)
        jobs.append((iv, data, reference(raw_key * 3, modes.CBC(iv), True, data)))
    start = threading.Barrier(len(jobs))
    failures: list[str] = []

    def work(iv: bytes, plain: bytes, cipher: bytes) -> None:
        start.wait()
        for _ in range(200):
            if key.encrypt_cbc(iv, plain) != cipher or key.decrypt_cbc(iv, cipher) != plain:
                failures.append("wrong result")
                return

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, so OpenSSL's default context starts untouched."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **environment}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_private_context_ignores_openssl_conf(tmp_path: Path) -> None:
    empty_conf = tmp_path / "openssl.cnf"
    empty_conf.write_text("")
    result = run_python("from iscl_hsm.crypto import des; des.self_test()", OPENSSL_CONF=str(empty_conf))
    assert result.returncode == 0, result.stderr


def test_enable_legacy_in_default_context(tmp_path: Path) -> None:
    empty_conf = tmp_path / "openssl.cnf"
    empty_conf.write_text("")
    code = (
        "from iscl_hsm.crypto import des\n"
        "fetch = des._get_openssl().lib.EVP_CIPHER_fetch\n"
        "print(bool(fetch(None, b'DES-CBC', None)))\n"
        "des.enable_legacy_in_default_context()\n"
        "des.enable_legacy_in_default_context()\n"
        "print(bool(fetch(None, b'DES-CBC', None)), bool(fetch(None, b'AES-128-CBC', None)))\n"
    )
    result = run_python(code, OPENSSL_CONF=str(empty_conf))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True"]


def test_missing_legacy_provider_is_a_clear_key_holder_error(tmp_path: Path) -> None:
    code = (
        "from iscl_hsm.crypto import des\n"
        "from iscl_hsm.errors import KeyHolderError\n"
        "try:\n"
        "    des.DesKey(bytes(8))\n"
        "except KeyHolderError as error:\n"
        "    print(error)\n"
    )
    result = run_python(code, OPENSSL_MODULES=str(tmp_path))  # an empty modules directory
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OpenSSL's legacy provider (legacy.so) could not be loaded")
    assert "install libssl3" in result.stdout
