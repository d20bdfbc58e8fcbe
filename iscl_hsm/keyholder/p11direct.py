"""The two PKCS#11 calls of every handshake, made straight through the module's function list.

INTERNAL and EXTERNAL AUTHENTICATE are a one-block ECB encryption under an authentication key; host
record keys are one CKM_*_ECB_ENCRYPT_DATA derivation read out and destroyed at once. A link makes
four of these per end, and a message under unique session keys one more per end. python-pkcs11,
which the key holder uses for everything else, wraps each encryption in a mechanism object and each
derivation in a full default template and a Python class built for the derived object after ten
attribute reads: on SoftHSM2 that adds about 10 µs to an encryption (40-60 µs) and 100 µs or more
to a derivation (120-150 µs), which made the two a sixth of a whole handshake.

The calls here use python-pkcs11's own session and key handles, under the key holder's session lock
(the module was initialised with no locking of its own), and the module it already loaded: dlopen()
of a loaded file returns the same instance. Failures raise python-pkcs11's exception classes, so
callers handle both paths alike.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Final

import pkcs11.exceptions as p11
from pkcs11 import Attribute, KeyType, ObjectClass

_ULONG = ctypes.c_ulong
_ULONG_P = ctypes.POINTER(ctypes.c_ulong)
_USABLE_FOR: Final = (
    Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP, Attribute.UNWRAP, Attribute.SIGN, Attribute.VERIFY,
    Attribute.DERIVE,
)  # fmt: skip

_ERRORS: Final[dict[int, type[p11.PKCS11Error]]] = {
    0x002: p11.HostMemory,
    0x005: p11.GeneralError,
    0x006: p11.FunctionFailed,
    0x007: p11.ArgumentsBad,
    0x012: p11.AttributeTypeInvalid,
    0x013: p11.AttributeValueInvalid,
    0x021: p11.DataLenRange,
    0x030: p11.DeviceError,
    0x031: p11.DeviceMemory,
    0x032: p11.DeviceRemoved,
    0x054: p11.FunctionNotSupported,
    0x060: p11.KeyHandleInvalid,
    0x063: p11.KeyTypeInconsistent,
    0x070: p11.MechanismInvalid,
    0x071: p11.MechanismParamInvalid,
    0x082: p11.ObjectHandleInvalid,
    0x090: p11.OperationActive,
    0x0B0: p11.SessionClosed,
    0x0B3: p11.SessionHandleInvalid,
    0x0D0: p11.TemplateIncomplete,
    0x0D1: p11.TemplateInconsistent,
    0x0E0: p11.TokenNotPresent,
    0x101: p11.UserNotLoggedIn,
}
"""CK_RV codes a key holder can meet here, as the exception classes python-pkcs11 raises for them."""


class KeyDerivationStringData(ctypes.Structure):
    """CK_KEY_DERIVATION_STRING_DATA, the parameter of CKM_DES_ECB_ENCRYPT_DATA and its DES3 twin
    (python-pkcs11 marshals it only for AES); ``bytes()`` of it is what python-pkcs11 passes on."""

    _fields_ = [("pData", ctypes.c_void_p), ("ulLen", ctypes.c_ulong)]


def derivation_param(data: bytes) -> tuple[KeyDerivationStringData, ctypes.Array[ctypes.c_char]]:
    """The parameter for deriving from ``data``, and the buffer it points to: keep both alive
    during the call."""
    source = ctypes.create_string_buffer(data, len(data))
    return KeyDerivationStringData(ctypes.addressof(source), len(data)), source


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", ctypes.c_ulong), ("pParameter", ctypes.c_void_p), ("ulParameterLen", ctypes.c_ulong)]


class _Attribute(ctypes.Structure):
    _fields_ = [("type", ctypes.c_ulong), ("pValue", ctypes.c_void_p), ("ulValueLen", ctypes.c_ulong)]


_MECHANISM_P = ctypes.POINTER(_Mechanism)
_ATTRIBUTE_P = ctypes.POINTER(_Attribute)
_FUNCTION_COUNT: Final = 68


class _FunctionList(ctypes.Structure):
    """CK_FUNCTION_LIST (PKCS#11 v2.40, section 5.16): a CK_VERSION, then the functions in order."""

    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [
        (f"slot{i}", ctypes.c_void_p) for i in range(_FUNCTION_COUNT)
    ]


def _function(table: _FunctionList, slot: int, *argtypes: type) -> Callable[..., int]:
    """The function in ``slot`` of ``table``, callable with ``argtypes``; the call releases the GIL."""
    return ctypes.CFUNCTYPE(ctypes.c_ulong, *argtypes)(getattr(table, f"slot{slot}"))


def _check(rv: int) -> None:
    if rv:
        raise _ERRORS.get(rv, p11.PKCS11Error)(f"CKR 0x{rv:08X}")


def _attribute(kind: int, value: ctypes.c_ulong | ctypes.c_ubyte) -> _Attribute:
    return _Attribute(kind, ctypes.addressof(value), ctypes.sizeof(value))


class DirectCalls:
    """The calls above on one loaded module; safe to share, if each call holds the session's lock."""

    def __init__(self, module_file: str) -> None:
        library = ctypes.CDLL(module_file)
        pointer = ctypes.POINTER(_FunctionList)()
        _check(library.C_GetFunctionList(ctypes.byref(pointer)))
        table = pointer.contents
        self._destroy_object = _function(table, 22, _ULONG, _ULONG)
        self._get_attribute_value = _function(table, 24, _ULONG, _ULONG, _ATTRIBUTE_P, _ULONG)
        self._encrypt_init = _function(table, 29, _ULONG, _MECHANISM_P, _ULONG)
        self._encrypt = _function(table, 30, _ULONG, ctypes.c_char_p, _ULONG, ctypes.c_char_p, _ULONG_P)
        self._derive_key = _function(table, 62, _ULONG, _MECHANISM_P, _ULONG, _ATTRIBUTE_P, _ULONG, _ULONG_P)
        self._library = library  # keeps the module loaded as long as the function pointers live

    def encrypt_block(self, session: int, key: int, mechanism: int, block: bytes) -> bytes:
        """One 8-byte block encrypted by ``key`` with an ECB ``mechanism`` (no parameter)."""
        out = ctypes.create_string_buffer(8)
        length = _ULONG(8)
        _check(self._encrypt_init(session, ctypes.byref(_Mechanism(mechanism, None, 0)), key))
        _check(self._encrypt(session, block, len(block), out, ctypes.byref(length)))
        return out.raw[: length.value]

    def derive_value(self, session: int, key: int, mechanism: int, data: bytes) -> bytes:
        """``data`` encrypted by ``key`` through an ECB_ENCRYPT_DATA ``mechanism``: a derived object
        (a session generic secret, readable, usable for nothing) read once and destroyed at once.
        """
        param, _source = derivation_param(data)  # (_source, the bytes it points at, lives until return)
        mech = _Mechanism(mechanism, ctypes.addressof(param), ctypes.sizeof(param))
        true, false = ctypes.c_ubyte(1), ctypes.c_ubyte(0)
        values = (_ULONG(ObjectClass.SECRET_KEY), _ULONG(KeyType.GENERIC_SECRET), _ULONG(len(data)))
        template = (_Attribute * (7 + len(_USABLE_FOR)))(
            _attribute(Attribute.CLASS, values[0]),
            _attribute(Attribute.KEY_TYPE, values[1]),
            _attribute(Attribute.VALUE_LEN, values[2]),
            _attribute(Attribute.TOKEN, false),
            _attribute(Attribute.PRIVATE, true),
            _attribute(Attribute.SENSITIVE, false),
            _attribute(Attribute.EXTRACTABLE, true),
            *(_attribute(kind, false) for kind in _USABLE_FOR),
        )
        handle = _ULONG()
        _check(self._derive_key(session, ctypes.byref(mech), key, template, len(template), ctypes.byref(handle)))
        try:
            value = ctypes.create_string_buffer(len(data))
            read = _Attribute(Attribute.VALUE, ctypes.addressof(value), len(data))
            _check(self._get_attribute_value(session, handle, ctypes.byref(read), 1))
            return value.raw[: read.ulValueLen]
        finally:
            self._destroy_object(session, handle)  # a failure leaves a session object, gone with the session


@functools.cache
def direct_calls(module_file: str) -> DirectCalls:
    """The calls of the module at ``module_file`` (a real path, so one set per file)."""
    return DirectCalls(module_file)
