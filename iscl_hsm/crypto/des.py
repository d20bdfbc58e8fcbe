"""Single DES and two/three-key triple DES from OpenSSL 3's legacy provider, through ctypes.

ISCL V1.00 mandates single DES (DES-CBC records, ISO/IEC 9797-1 MAC algorithm 1). The
``cryptography`` package offers only triple DES, three times slower; OpenSSL 3 keeps single DES in
its "legacy" provider. We load that provider into a private library context, so the result does not
depend on OPENSSL_CONF and changes nothing for the ``ssl`` module or anything else in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from typing import Final

from iscl_hsm.errors import KeyHolderError

BytesLike = bytes | bytearray | memoryview
"""What the cipher methods accept; writable contiguous buffers are read in place, without a copy."""

BLOCK_SIZE: Final = 8

_KEY_KINDS: Final = {8: "single-DES", 16: "two-key-3DES", 24: "three-key-3DES"}
_CIPHER_NAMES: Final = {
    (8, "cbc"): b"DES-CBC",
    (8, "ecb"): b"DES-ECB",
    (16, "cbc"): b"DES-EDE-CBC",
    (16, "ecb"): b"DES-EDE-ECB",
    (24, "cbc"): b"DES-EDE3-CBC",
    (24, "ecb"): b"DES-EDE3-ECB",
}
_MAX_LENGTH: Final = (1 << 31) - BLOCK_SIZE
"""EVP_CipherUpdate takes an ``int`` length; ISCL records are far shorter."""

_NO_LEGACY: Final = (
    "OpenSSL's legacy provider (legacy.so) could not be loaded: single DES, which ISCL V1.00"
    " requires, is unavailable; install libssl3 with its ossl-modules"
)


class _OpenSsl:
    """libcrypto.so.3 with a private library context holding the default and legacy providers.

    Made once and kept for the life of the process, like the ciphers fetched from it.
    """

    def __init__(self) -> None:
        name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
        try:
            lib = ctypes.CDLL(name)
            _declare(lib)  # AttributeError when ``name`` is an OpenSSL older than 3.0
        except (OSError, AttributeError) as exc:
            raise KeyHolderError(
                f"OpenSSL 3's libcrypto ({name}) could not be loaded: single DES, which ISCL V1.00"
                " requires, is unavailable; install libssl3"
            ) from exc
        self.lib = lib
        libctx = lib.OSSL_LIB_CTX_new()
        if not libctx:
            raise KeyHolderError("OpenSSL could not create a library context; the process is out of memory")
        for provider in (b"default", b"legacy"):
            if not lib.OSSL_PROVIDER_load(libctx, provider):
                lib.ERR_clear_error()
                raise KeyHolderError(_NO_LEGACY)
        self.ciphers: dict[tuple[int, str], int] = {}
        for spec, cipher_name in _CIPHER_NAMES.items():
            cipher = lib.EVP_CIPHER_fetch(libctx, cipher_name, None)
            if not cipher:
                lib.ERR_clear_error()
                raise KeyHolderError(f"{_NO_LEGACY} (no {cipher_name.decode()} cipher)")
            self.ciphers[spec] = cipher

    def failure(self, what: str) -> KeyHolderError:
        """Clear OpenSSL's error queue (so nothing stale reaches the ``ssl`` module) and say what failed."""
        self.lib.ERR_clear_error()
        return KeyHolderError(f"OpenSSL failed to {what}; libcrypto or its legacy provider is broken")


def _declare(lib: ctypes.CDLL) -> None:
    """Set argtypes and restype of every libcrypto function this module calls."""
    p, i = ctypes.c_void_p, ctypes.c_int
    signatures: dict[str, tuple[list[type], type | None]] = {
        "OSSL_LIB_CTX_new": ([], p),
        "OSSL_PROVIDER_load": ([p, ctypes.c_char_p], p),
        "EVP_CIPHER_fetch": ([p, ctypes.c_char_p, ctypes.c_char_p], p),
        "EVP_CIPHER_CTX_new": ([], p),
        "EVP_CIPHER_CTX_free": ([p], None),
        "EVP_CipherInit_ex2": ([p, p, p, p, i, p], i),
        "EVP_CIPHER_CTX_set_padding": ([p, i], i),
        "EVP_CipherUpdate": ([p, p, ctypes.POINTER(i), p, i], i),
        "ERR_clear_error": ([], None),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype


_lock = threading.Lock()
_openssl: _OpenSsl | None = None
_default_context_enabled = False


def _get_openssl() -> _OpenSsl:
    """Load libcrypto and fetch the DES ciphers once, on first use, whichever thread comes first."""
    global _openssl
    openssl = _openssl
    if openssl is None:
        with _lock:
            if _openssl is None:
                _openssl = _OpenSsl()
            openssl = _openssl
    return openssl


def enable_legacy_in_default_context() -> None:
    """Load the legacy and default providers into OpenSSL's default library context.

    SoftHSM2 links the same libcrypto.so.3 and uses the default context, which Python has already
    initialised by the time a token is opened, so OPENSSL_CONF would come too late. Loading legacy
    switches off the automatic fallback to default, hence both. Later calls do nothing.
    """
    global _default_context_enabled
    lib = _get_openssl().lib
    with _lock:
        if _default_context_enabled:
            return
        for provider in (b"default", b"legacy"):
            if not lib.OSSL_PROVIDER_load(None, provider):
                lib.ERR_clear_error()
                raise KeyHolderError(_NO_LEGACY)
        _default_context_enabled = True


_new_bytes = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
    ("PyBytes_FromStringAndSize", ctypes.pythonapi)
)
"""Creates the result uninitialised for OpenSSL to fill before anyone else sees it.

Cheaper than a zeroed ctypes buffer and a copy to bytes: 12 % faster at 1 MiB. A length of 0 gives
the shared empty bytes object, into which OpenSSL then writes nothing. A private prototype, so no
other user of ``ctypes.pythonapi`` sees its argtypes changed.
"""


def _check_iv(iv: BytesLike) -> bytes:
    """Return ``iv`` as bytes, refusing anything but one DES block."""
    iv = bytes(iv)
    if len(iv) != BLOCK_SIZE:
        raise ValueError(f"a DES IV is 8 bytes long, not {len(iv)}")
    return iv


def _readable(data: BytesLike) -> tuple[bytes | ctypes.Array[ctypes.c_char], int]:
    """Return something ctypes passes as a pointer to ``data``'s bytes, and their number.

    bytes and writable contiguous buffers are passed in place; only read-only views are copied.
    """
    if isinstance(data, bytes):
        return data, len(data)
    view = memoryview(data)
    if view.readonly or not view.c_contiguous:
        return view.tobytes(), view.nbytes
    return (ctypes.c_char * view.nbytes).from_buffer(view), view.nbytes


class _CipherContext:
    """One EVP_CIPHER_CTX with the key schedule set up, used by a single thread."""

    __slots__ = ("_free", "pointer", "written", "written_ref")

    def __init__(self, openssl: _OpenSsl, cipher: int, key: bytes) -> None:
        lib = openssl.lib
        self._free = lib.EVP_CIPHER_CTX_free
        self.written = ctypes.c_int()
        self.written_ref = ctypes.byref(self.written)  # made once: EVP_CipherUpdate's out-length
        self.pointer: int | None = lib.EVP_CIPHER_CTX_new()
        if not self.pointer:
            raise MemoryError("OpenSSL could not allocate a cipher context")
        if (
            lib.EVP_CipherInit_ex2(self.pointer, cipher, key, None, 1, None) != 1
            or lib.EVP_CIPHER_CTX_set_padding(self.pointer, 0) != 1
        ):
            raise openssl.failure("set up a DES key")

    def __del__(self) -> None:
        self._free(self.pointer)  # cleanses the key schedule; NULL is a no-op


class DesKey:
    """A single-DES (8-byte), two-key (16) or three-key (24) triple-DES key; safe to share between threads.

    Each thread keeps its own OpenSSL contexts with the key schedule already computed, so a call costs
    one re-initialisation (IV and direction) and one EVP_CipherUpdate, run without the GIL. They are
    kept in a plain dict by thread and mode rather than a ``threading.local``, which costs 0.7 KB a key
    however few threads use it: a hardened link holds five keys at each end. A thread's identity may
    be reused once it has ended, and its contexts with it, never by two living threads at once.
    """

    __slots__ = ("_cbc", "_contexts", "_ecb", "_key", "_openssl")

    in_process = True

    def __init__(self, key: BytesLike) -> None:
        key = bytes(key)
        if len(key) not in _KEY_KINDS:
            raise ValueError(f"a DES key is 8, 16 or 24 bytes long, not {len(key)}")
        self._key = key
        self._openssl = _get_openssl()
        self._cbc = self._openssl.ciphers[len(key), "cbc"]
        self._ecb = self._openssl.ciphers[len(key), "ecb"]
        self._contexts: dict[tuple[int, str], _CipherContext] = {}

    def __repr__(self) -> str:
        return f"<DesKey {_KEY_KINDS[len(self._key)]} kcv={self.kcv.hex().upper()}>"

    @property
    def size(self) -> int:
        """8 for single DES, 16 or 24 for triple DES."""
        return len(self._key)

    @property
    def kcv(self) -> bytes:
        """Key check value: the first 3 bytes of the key's encryption of eight zero bytes."""
        return self.encrypt_ecb(bytes(BLOCK_SIZE))[:3]

    def encrypt_cbc(self, iv: BytesLike, data: BytesLike) -> bytes:
        """CBC-encrypt ``data`` (a multiple of 8 bytes, no padding) from the 8-byte ``iv``."""
        return self._run("_cbc", _check_iv(iv), 1, data)

    def decrypt_cbc(self, iv: BytesLike, data: BytesLike) -> bytes:
        """CBC-decrypt ``data`` (a multiple of 8 bytes, no padding) from the 8-byte ``iv``."""
        return self._run("_cbc", _check_iv(iv), 0, data)

    def encrypt_ecb(self, data: BytesLike) -> bytes:
        """ECB-encrypt ``data`` (a multiple of 8 bytes, no padding)."""
        return self._run("_ecb", None, 1, data)

    def decrypt_ecb(self, data: BytesLike) -> bytes:
        """ECB-decrypt ``data`` (a multiple of 8 bytes, no padding)."""
        return self._run("_ecb", None, 0, data)

    def _run(self, mode: str, iv: bytes | None, encrypt: int, data: BytesLike) -> bytes:
        """Run the cipher in slot ``mode`` over ``data`` with one EVP_CipherUpdate."""
        source, length = _readable(data)
        if length % BLOCK_SIZE or length > _MAX_LENGTH:
            raise ValueError(f"DES data must be a multiple of 8 bytes up to 2 GiB long, not {length}")
        slot = (threading.get_ident(), mode)
        context = self._contexts.get(slot)
        if context is None:
            context = self._contexts[slot] = _CipherContext(self._openssl, getattr(self, mode), self._key)
        lib = self._openssl.lib
        out: bytes = _new_bytes(None, length)
        if (
            lib.EVP_CipherInit_ex2(context.pointer, None, None, iv, encrypt, None) != 1
            or lib.EVP_CipherUpdate(context.pointer, out, context.written_ref, source, length) != 1
            or context.written.value != length
        ):
            raise self._openssl.failure("run DES")
        return out


def fix_parity(key: bytes) -> bytes:
    """Set each byte's low bit so the byte has odd parity, as DES keys conventionally do."""
    return bytes((b & 0xFE) | ((b >> 1).bit_count() + 1) % 2 for b in key)


def has_odd_parity(key: bytes) -> bool:
    """Tell whether every byte of ``key`` has an odd number of set bits."""
    return all(b.bit_count() % 2 == 1 for b in key)


_WEAK_KEYS: Final = frozenset(
    bytes.fromhex(h)
    for h in (
        # weak: encryption is its own inverse
        "0101010101010101", "FEFEFEFEFEFEFEFE", "E0E0E0E0F1F1F1F1", "1F1F1F1F0E0E0E0E",
        # semi-weak pairs: one key decrypts what the other encrypts
        "01FE01FE01FE01FE", "FE01FE01FE01FE01", "1FE01FE00EF10EF1", "E01FE01FF10EF10E",
        "01E001E001F101F1", "E001E001F101F101", "1FFE1FFE0EFE0EFE", "FE1FFE1FFE0EFE0E",
        "011F011F010E010E", "1F011F010E010E01", "E0FEE0FEF1FEF1FE", "FEE0FEE0FEF1FEF1",
    )
)  # fmt: skip


def is_weak(key: bytes) -> bool:
    """Tell whether ``key``, or any 8-byte part of a triple-DES key, is a weak or semi-weak DES key."""
    if len(key) not in _KEY_KINDS:
        raise ValueError(f"a DES key is 8, 16 or 24 bytes long, not {len(key)}")
    fixed = fix_parity(key)
    return any(fixed[i : i + 8] in _WEAK_KEYS for i in range(0, len(fixed), 8))


def kcv(key: bytes) -> bytes:
    """Key check value of ``key``: first 3 bytes of its encryption of eight zero bytes."""
    return DesKey(key).kcv


def des_mac(key: DesKey, data: BytesLike) -> bytes:
    """ISO/IEC 9797-1 MAC algorithm 1 (CBC-MAC, zero IV, full last block) with padding method 1.

    Padding method 1 appends zero bytes up to a multiple of 8; empty data becomes one zero block.
    """
    length = memoryview(data).nbytes
    if length == 0 or length % BLOCK_SIZE:
        data = bytes(data) + bytes(-length % BLOCK_SIZE or BLOCK_SIZE)
    return key.encrypt_cbc(bytes(BLOCK_SIZE), data)[-BLOCK_SIZE:]


@functools.cache
def self_test_once() -> None:
    """:func:`self_test`, once per process: key holders call it before handing out host DES keys."""
    self_test()


def self_test() -> None:
    """Check published known answers, so a broken or substituted libcrypto fails loudly at start-up."""
    raw_key = bytes.fromhex("0123456789ABCDEF")
    key = DesKey(raw_key)
    plain = b"Now is the time for all "
    cipher = bytes.fromhex("E5C7CDDE872BF27C43E934008C389C0F683788499A7C05F6")
    iv = bytes.fromhex("1234567890ABCDEF")
    checks = {
        "DES-ECB": key.encrypt_ecb(b"Now is t") == bytes.fromhex("3FA40E8A984D4815"),
        "DES-ECB decryption": key.decrypt_ecb(bytes.fromhex("3FA40E8A984D4815")) == b"Now is t",
        "DES-CBC (FIPS 81)": key.encrypt_cbc(iv, plain) == cipher,
        "DES-CBC decryption (FIPS 81)": key.decrypt_cbc(iv, cipher) == plain,
        "DES-MAC (FIPS 113)": des_mac(key, b"7654321 Now is the time for ")
        == bytes.fromhex("F1D30F6849312CA4"),
        "key check value": key.kcv == bytes.fromhex("D5D44F"),
        "two-key triple DES": DesKey(raw_key * 2).encrypt_cbc(iv, plain) == cipher,
        "three-key triple DES": DesKey(raw_key * 3).encrypt_cbc(iv, plain) == cipher,
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise KeyHolderError(
            f"OpenSSL's DES gave wrong known answers ({', '.join(failed)}); libcrypto is broken,"
            " so no ISCL key can be trusted with it"
        )
