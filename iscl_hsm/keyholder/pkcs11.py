"""Key holder on a PKCS#11 token (SoftHSM2 or a hardware HSM): the long-term keys never leave it.

Key convention (the contract with security officers)
====================================================

Every ISCL key is a token object (CKA_TOKEN true) of class CKO_SECRET_KEY, found by its label::

    purpose     number  CKA_LABEL          CKA_ID (3 bytes)        CKA_KEY_TYPE        capabilities
    auth        1       "iscl-auth-N"      01 N version            DES (or DES2/DES3)  ENCRYPT only
    enc         2       "iscl-enc-N"       02 N version            DES (or DES2/DES3)  DERIVE, ENCRYPT, DECRYPT
    transport   3       "iscl-transport-N" 03 N version            AES                 WRAP and UNWRAP

N is the ISCL key id 1..8; version starts at 1 and ``iscl keys rotate`` adds version+1 under the same
label (when several objects share a label, the one with the highest version is used). All keys are
CKA_PRIVATE, CKA_SENSITIVE, not CKA_EXTRACTABLE, and created with CKA_MODIFIABLE and CKA_COPYABLE
false, so their capabilities cannot be widened later; every capability not listed above is false. An
auth or enc key created *exportable* is CKA_EXTRACTABLE and CKA_WRAP_WITH_TRUSTED (still sensitive):
only a transport key the security officer marked CKA_TRUSTED can wrap it (see :mod:`iscl_hsm.keys`).
An enc key created *host-readable* is not sensitive and is extractable: the V1.00 profile uses
encryption key N itself as every message's DES key, and reads such a key once so that OpenSSL
protects the records; a sensitive one is used inside the token (CKM_DES_CBC, slower). A key that
breaks this policy but has the capability a use needs is used, with a logged warning. Enc keys made
before the V1.00 profile existed are DERIVE only: they serve the hardened profile and session keys.

What the token computes (identical bytes to an ISO 7816-4 card holding the same keys):

* INTERNAL AUTHENTICATE under auth key N: C_Encrypt of the 8-byte block with CKM_DES_ECB
  (CKM_DES3_ECB for a DES2/DES3 key).
* EXTERNAL AUTHENTICATE: the same encryption of our own outstanding challenge, compared in constant
  time with the peer's cryptogram; each challenge is consumed by its first check.
* V1.00 with encryption key N (1..8): the key itself (:meth:`Pkcs11KeyHolder.encryption_key`).
* Record key from enc key N: C_DeriveKey with CKM_DES_ECB_ENCRYPT_DATA (CKM_DES3_ECB_ENCRYPT_DATA for
  a DES2/DES3 key) of the 8-byte block: the record key is parity(E_KE(block)). With
  ``record_keys="host"`` (the default) all the blocks a link needs at once go into one derivation of
  a readable session generic secret (ECB: each block's E_KE(block) in turn), which is read once and
  destroyed at once; the host sets the parity and OpenSSL protects the records. With
  ``record_keys="token"`` each block becomes a sensitive, non-extractable session single-DES key
  (the token sets its parity) and every record goes through CKM_DES_CBC there (:class:`TokenDesKey`).

Sessions and threads
====================

PKCS#11 login is per process and token, so one logged-in R/W session per (module file, token) is
opened and shared by every :class:`Pkcs11KeyHolder` of the process on that token (reference counted;
the last ``close()`` closes it; a second holder must give the same PIN). A session runs one operation
at a time, so every token call holds that session's lock. On SoftHSM2 a handshake call takes about
40-100 microseconds (a derivation 120-300; the two kinds a handshake makes go straight through the
module's function list, see :mod:`iscl_hsm.keyholder.p11direct`) and record protection defaults to
the host, so the lock costs little; it also keeps key handles, derived session objects and the login state in
one place, with no per-thread sessions to track and close. After ``fork()`` the child re-initialises
the module on its next open, and holders inherited from the parent refuse to work.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, Self, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.constants import DEFAULT

from iscl_hsm.errors import ErrorCode, KeyHolderConfigError, KeyHolderError
from iscl_hsm.keyholder.base import KEY_INDEXES, Buffer, KeyHolder, RecordKey
from iscl_hsm.keyholder.key_records import Expiry, read_expiry

from ..crypto.des import DesKey, enable_legacy_in_default_context, fix_parity, self_test_once
from ..shared import doc_reference
from .p11direct import DirectCalls, derivation_param, direct_calls

__all__ = [
    "DEFAULT_MODULE",
    "KEY_VERSION",
    "MAX_OUTSTANDING_CHALLENGES",
    "PURPOSES",
    "Pkcs11KeyHolder",
    "TokenDesKey",
    "find_token",
    "is_module_loaded",
    "key_id",
    "key_label",
    "key_policy",
    "pin_error",
    "pin_tries_hint",
    "refresh_token_list",
]

log = logging.getLogger(__name__)

DEFAULT_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
PURPOSES: Final = {"auth": 1, "enc": 2, "transport": 3}
"""Key purpose name -> first byte of CKA_ID."""
KEY_VERSION: Final = 1
"""Third byte of CKA_ID of the keys this version creates."""
MAX_OUTSTANDING_CHALLENGES: Final = 4096
"""Challenges remembered per key id; beyond that the oldest is forgotten (and then fails)."""

_PURPOSE_NAMES: Final = {"auth": "authentication key", "enc": "encryption key", "transport": "transport key"}
_NEEDED_CAPABILITY: Final = {"auth": Attribute.ENCRYPT, "enc": Attribute.DERIVE}
"""What the handshake and the derivations need of each purpose."""
_POLICY_CAPABILITIES: Final = {
    "auth": (Attribute.ENCRYPT,),
    "enc": (Attribute.DERIVE, Attribute.ENCRYPT, Attribute.DECRYPT),
    "transport": (Attribute.WRAP, Attribute.UNWRAP),
}
_DIRECT_USE: Final = (Attribute.ENCRYPT, Attribute.DECRYPT)
"""What V1.00 needs of encryption key N to use it inside the token as every message's DES key."""
_ALL_CAPABILITY_ATTRIBUTES: Final = (
    Attribute.ENCRYPT,
    Attribute.DECRYPT,
    Attribute.SIGN,
    Attribute.VERIFY,
    Attribute.WRAP,
    Attribute.UNWRAP,
    Attribute.DERIVE,
)
_DES_TYPES: Final = (KeyType._DES, KeyType.DES2, KeyType.DES3)
_ECB: Final = {
    KeyType._DES: Mechanism._DES_ECB,
    KeyType.DES2: Mechanism.DES3_ECB,
    KeyType.DES3: Mechanism.DES3_ECB,
}
_ECB_ENCRYPT_DATA: Final = {
    KeyType._DES: Mechanism.DES_ECB_ENCRYPT_DATA,
    KeyType.DES2: Mechanism.DES3_ECB_ENCRYPT_DATA,
    KeyType.DES3: Mechanism.DES3_ECB_ENCRYPT_DATA,
}
_RECORD_KEY_MODES: Final = ("host", "token")

# Known answers (FIPS 81): DES key 0123456789ABCDEF.
_KAT_KEY: Final = bytes.fromhex("0123456789ABCDEF")
_KAT_PLAIN: Final = b"Now is t"
_KAT_ECB: Final = bytes.fromhex("3FA40E8A984D4815")
_KAT_CBC_IV: Final = bytes.fromhex("1234567890ABCDEF")
_KAT_CBC_PLAIN: Final = b"Now is the time for all "
_KAT_CBC: Final = bytes.fromhex("E5C7CDDE872BF27C43E934008C389C0F683788499A7C05F6")

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# The key convention


def key_label(purpose: str, index: int) -> str:
    """CKA_LABEL of key ``index`` (1..8) for ``purpose`` ("auth", "enc" or "transport")."""
    _check_purpose(purpose)
    return f"iscl-{purpose}-{index}"


def key_id(purpose: str, index: int, version: int = KEY_VERSION) -> bytes:
    """CKA_ID of key ``index`` for ``purpose``: purpose number, index, version (one byte each)."""
    _check_purpose(purpose)
    return bytes([PURPOSES[purpose], index, version])


def key_policy(purpose: str, *, exportable: bool = False, host_readable: bool = False) -> dict[Attribute, Any]:
    """The attributes (besides class, type, label, id, value) an ISCL key of ``purpose`` carries.

    ``exportable`` (auth and enc keys only) makes the key extractable, but only under a trusted
    wrapping key (CKA_WRAP_WITH_TRUSTED); it stays sensitive. ``host_readable`` (enc keys only)
    makes it readable by a logged-in user, for V1.00 links that use it as their DES key on the host.
    """
    if purpose not in _POLICY_CAPABILITIES:
        raise KeyHolderError(
            f"key purpose {purpose!r} has no policy; use 'auth', 'enc' or 'transport'", ErrorCode.BAD_OPTION
        )
    policy: dict[Attribute, Any] = {attribute: False for attribute in _ALL_CAPABILITY_ATTRIBUTES}
    for capability in _POLICY_CAPABILITIES[purpose]:
        policy[capability] = True
    policy.update(
        {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False,
            Attribute.COPYABLE: False,
        }
    )
    if exportable and host_readable:
        raise KeyHolderError("a key is either exportable (wrapped) or host-readable, not both", ErrorCode.BAD_OPTION)
    if exportable:
        if purpose == "transport":
            raise KeyHolderError("a transport key cannot be made exportable", ErrorCode.BAD_OPTION)
        policy[Attribute.EXTRACTABLE] = True
        policy[Attribute.WRAP_WITH_TRUSTED] = True
    if host_readable:
        if purpose != "enc":
            raise KeyHolderError("only encryption keys can be made host-readable (for V1.00)", ErrorCode.BAD_OPTION)
        policy[Attribute.SENSITIVE] = False
        policy[Attribute.EXTRACTABLE] = True
    return policy


def _check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise KeyHolderError(
            f"unknown key purpose {purpose!r}; use one of {', '.join(PURPOSES)}", ErrorCode.BAD_OPTION
        )


def _check_index(index: int) -> None:
    if not isinstance(index, int) or index not in KEY_INDEXES:
        raise KeyHolderConfigError(f"key id {index!r} is outside 1..8", ErrorCode.KEY_NOT_FOUND)


def _check_block(block: bytes, what: str) -> bytes:
    block = bytes(block)
    if len(block) != 8:
        raise KeyHolderError(f"{what} must be 8 bytes long, not {len(block)}", ErrorCode.BAD_LENGTH)
    return block


# --------------------------------------------------------------------------------------------------
# Loading modules, one logged-in session per (module, token)


_registry_lock = threading.Lock()
_sessions: dict[tuple[str, str], _TokenSession] = {}
_module_locks: dict[str, threading.RLock] = {}
"""One lock per module: python-pkcs11 runs C_Initialize(NULL), which tells the module (SoftHSM2
among them) that the application serialises its calls, so two tokens of one module used from two
threads must not call it at once."""
_stale_modules: set[str] = set()
"""Modules loaded before a fork(): the child re-initialises them before use."""


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    _stale_modules.update(module for module, _ in _sessions)
    _stale_modules.update(pkcs11._loaded)
    _module_locks.clear()
    for entry in _sessions.values():
        entry.lock = threading.RLock()
    _sessions.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _softhsm_conf_hint() -> str:
    conf = os.environ.get("SOFTHSM2_CONF")
    if conf is None:
        return (
            "SOFTHSM2_CONF is not set, so SoftHSM2 reads /etc/softhsm/softhsm2.conf; check that file,"
            " or set SOFTHSM2_CONF before starting the process"
        )
    missing = "" if os.path.isfile(conf) else ", which does not exist"
    return (
        f"check the SoftHSM2 configuration named by SOFTHSM2_CONF={conf}{missing}: it must exist and its"
        " directories.tokendir must be an existing directory this user can write"
    )


def _load_module(module: str) -> Any:
    """Load and initialise ``module`` once per process; translate failures into KeyHolderError."""
    if not os.path.isfile(module):
        raise KeyHolderConfigError(
            f"PKCS#11 module {module} could not be loaded: no such file. Install softhsm2 or pass"
            " --pkcs11-module with the path of your token's PKCS#11 library"
        )
    enable_legacy_in_default_context()
    try:
        lib = pkcs11.lib(os.path.realpath(module))  # one load (one C_Initialize) per file, whatever its name
        if os.path.realpath(module) in _stale_modules:
            lib.reinitialize()
            _stale_modules.discard(os.path.realpath(module))
    except p11.GeneralError as exc:
        # SoftHSM2 fails so only over its configuration file, which no retry mends; another module's
        # failure may be passing (a network HSM out of reach).
        softhsm = "softhsm" in os.path.basename(module).lower()
        error = KeyHolderConfigError if softhsm else KeyHolderError
        hint = _softhsm_conf_hint() if softhsm else "check its configuration"
        raise error(f"PKCS#11 module {module} failed to initialise (CKR_GENERAL_ERROR); {hint}") from exc
    except p11.PKCS11Error as exc:
        detail = str(exc) or type(exc).__name__
        raise KeyHolderError(
            f"PKCS#11 module {module} could not be loaded: {detail}. Install softhsm2 or pass"
            " --pkcs11-module with the path of your token's PKCS#11 library"
        ) from exc
    return lib


def _token_labels(lib: Any) -> list[str]:
    try:
        return sorted(token.label for token in lib.get_tokens() if token.label)
    except p11.PKCS11Error:
        return []


def is_module_loaded(module: str = DEFAULT_MODULE) -> bool:
    """Tell whether this process has loaded (and so initialised) ``module`` already."""
    lib = pkcs11._loaded.get(os.path.realpath(module))
    return lib is not None and bool(lib.initialized)


def refresh_token_list(module: str = DEFAULT_MODULE) -> None:
    """Make tokens created since ``module`` was loaded in this process visible (SoftHSM2 scans once).

    This re-initialises the module, which would end every session, so it refuses while a key holder
    of this process is open on the module. Nothing happens if the module is not loaded yet.
    """
    canonical = os.path.realpath(module)
    with _registry_lock:
        lib = pkcs11._loaded.get(canonical)
        if lib is None:
            return
        if not _rescan(lib, canonical):
            raise KeyHolderError(
                f"PKCS#11 module {module} cannot rescan its tokens while key holders of this process are"
                " open on it; close them first, or create tokens before opening any key holder"
            )


def _rescan(lib: Any, canonical: str) -> bool:
    """Re-initialise ``lib`` (at path ``canonical``) so that it scans its tokens again; False, and
    nothing done, while a key holder of this process has a session on it, which that would end.
    The caller holds _registry_lock."""
    if any(entry_module == canonical for entry_module, _ in _sessions):
        return False
    lib.reinitialize()
    _stale_modules.discard(canonical)
    return True


class _TokenSession:
    """The one logged-in session of this process on one token, shared by its key holders."""

    def __init__(self, module: str, label: str, session: Any, pin: str) -> None:
        self.module = module
        self.label = label
        self.registry_key = (os.path.realpath(module), label)
        self.description = f"PKCS#11 token '{label}' (module {module})"
        self.session = session
        self.direct: DirectCalls = direct_calls(self.registry_key[0])
        self.lock = _module_locks.setdefault(self.registry_key[0], threading.RLock())
        self.users = 0
        self.closed = False
        self.pid = os.getpid()
        self._pin_salt = secrets.token_bytes(16)
        self._pin_digest = self._digest(pin)
        self._doomed: collections.deque[Any] = collections.deque()

    def _digest(self, pin: str) -> bytes:
        return hashlib.sha256(self._pin_salt + pin.encode("utf-8")).digest()

    def pin_matches(self, pin: str) -> bool:
        return hmac.compare_digest(self._digest(pin), self._pin_digest)

    def check_usable(self) -> None:
        if self.pid != os.getpid():
            raise KeyHolderError(
                f"{self.description} was opened before this process forked; open a new key holder in the"
                " child process"
            )
        if self.closed:
            raise KeyHolderError(f"{self.description} is closed; open the key holder again")

    def doom(self, key: Any) -> None:
        """Queue a session object for destruction at the next token call (called from finalizers)."""
        self._doomed.append(key)

    def run(self, operation: Callable[[Any], T]) -> T:
        """Run ``operation(session)`` alone on the session, destroying queued objects first."""
        with self.lock:
            self.check_usable()
            while self._doomed:
                _destroy_quietly(self._doomed.popleft())
            return operation(self.session)

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self._doomed.clear()  # session objects die with the session
            if self.pid == os.getpid():
                try:
                    self.session.close()
                except p11.PKCS11Error as exc:
                    log.warning("closing the session on %s failed: %s", self.description, type(exc).__name__)


def _call_with_key(operation: Callable[[Any, KeyType], T], key: Any, key_type: KeyType, session: Any) -> T:
    return operation(key, key_type)


def _destroy_quietly(key: Any) -> None:
    try:
        key.destroy()
    except p11.PKCS11Error as exc:  # already gone with its session, or the token was removed
        log.debug("destroying a session key failed: %s", type(exc).__name__)


def pin_tries_hint(lib: Any, label: str, *, so: bool = False) -> str:
    """One sentence on the PIN's remaining tries, from the token's flags when it reports them."""
    prefix = "SO_PIN" if so else "USER_PIN"
    try:
        flags = pkcs11.TokenFlag(lib.get_token(token_label=label).flags)
    except (p11.PKCS11Error, ValueError):
        flags = pkcs11.TokenFlag(0)
    if flags & getattr(pkcs11.TokenFlag, f"{prefix}_LOCKED"):
        return "The token reports the PIN is now locked; the security officer must unlock it"
    if flags & getattr(pkcs11.TokenFlag, f"{prefix}_FINAL_TRY"):
        return "The token reports one try left before it locks the PIN"
    if flags & getattr(pkcs11.TokenFlag, f"{prefix}_COUNT_LOW"):
        return "The token reports that few tries are left before it locks the PIN"
    return "The token may allow only a few wrong tries before it locks the PIN"


def pin_error(exc: p11.PKCS11Error, description: str, lib: Any, label: str, *, so: bool = False) -> KeyHolderError | None:
    """One sentence for a login the token refused over the PIN (the user's, or with ``so`` the SO's);
    None when ``exc`` is about something else."""
    pin, source = ("SO PIN", "the SO PIN or its file") if so else ("PIN", "the PIN or PIN file")
    if isinstance(exc, p11.PinIncorrect):
        return KeyHolderConfigError(
            f"wrong {pin} for {description}; check {source}. {pin_tries_hint(lib, label, so=so)}"
        )
    if isinstance(exc, p11.PinLocked):
        remedy = "the token must be initialised again" if so else "the security officer must unlock it"
        return KeyHolderConfigError(f"the {'SO' if so else 'user'} PIN of {description} is locked; {remedy}")
    if isinstance(exc, p11.PinLenRange | p11.PinInvalid):
        return KeyHolderConfigError(
            f"the {pin} given for {description} has a length or characters the token does not accept; check {source}"
        )
    return None


LOGIN_RETRY_DELAYS: Final = (0.05, 0.2, 0.5)
"""Seconds to wait before each new try of a login that failed with CKR_GENERAL_ERROR or
CKR_USER_PIN_NOT_INITIALIZED. SoftHSM2 2.6 rewrites its token files at every login and object change,
and a process that logs in while another writes them now and then gets one of those (SoftHSMv2 issue
#573); every `iscl keys` command writes the token (its audit anchor), so a service starting during a
ceremony would otherwise fail."""


def log_in(token: Any, pin: str, delays: Sequence[float] = LOGIN_RETRY_DELAYS) -> Any:
    """``token.open(user_pin=pin, rw=True)``, tried again after each of ``delays`` while it fails with
    CKR_GENERAL_ERROR or CKR_USER_PIN_NOT_INITIALIZED (both what SoftHSM2 answers from token files
    half rewritten); any other refusal (a wrong PIN above all) is raised at once, never retried."""
    for delay in delays:
        try:
            return token.open(user_pin=pin, rw=True)
        except (p11.GeneralError, p11.UserPinNotInitialized) as exc:
            log.debug("login failed with %s; trying again in %.2f s", type(exc).__name__, delay)
            time.sleep(delay)
    return token.open(user_pin=pin, rw=True)


RESCAN_DELAYS: Final = (0.05, 0.15, 0.3)
"""Seconds to wait before each new scan for a token that was not found or could not be listed.
SoftHSM2 scans its tokens once, when the module is initialised, and misses (or fails to list) a
token whose files another process is rewriting at that moment (every login rewrites them: see
LOGIN_RETRY_DELAYS)."""


def find_token(lib: Any, label: str, delays: Sequence[float] = RESCAN_DELAYS) -> Any:
    """The token labelled ``label``; one not found, or a listing that fails with CKR_GENERAL_ERROR, is
    tried again after each of ``delays`` in a fresh scan of the module's tokens, unless a key holder
    of this process has the module open (a rescan would end its session). The caller holds
    _registry_lock."""
    for delay in delays:
        try:
            return lib.get_token(token_label=label)
        except (p11.NoSuchToken, p11.GeneralError) as exc:
            log.debug("token '%s' not in the module's scan (%s); scanning again in %.2f s", label,
                      type(exc).__name__, delay)  # fmt: skip
            time.sleep(delay)
            if not _rescan(lib, os.path.realpath(lib.so)):
                raise
    return lib.get_token(token_label=label)


def _open_token_session(module: str, label: str, pin: str) -> _TokenSession:
    """Find the token by exact label, log in once, run the DES self-test; caller holds _registry_lock."""
    lib = _load_module(module)
    try:
        token = find_token(lib, label)
    except p11.NoSuchToken:
        labels = _token_labels(lib)
        present = ", ".join(f"'{name}'" for name in labels) if labels else "none"
        raise KeyHolderConfigError(
            f"PKCS#11 token '{label}' not found in module {module} (tokens present: {present}); check the"
            " label, or create the token (iscl keys init-token)"
        ) from None
    except p11.MultipleTokensReturned:
        raise KeyHolderConfigError(
            f"several PKCS#11 tokens in module {module} carry the label '{label}';"
            " give each token its own label"
        ) from None
    except p11.PKCS11Error as exc:
        raise KeyHolderError(
            f"PKCS#11 module {module} could not list its tokens ({type(exc).__name__}); check the module"
        ) from exc
    description = f"PKCS#11 token '{label}' (module {module})"
    try:
        session = log_in(token, pin)
    except p11.UserAlreadyLoggedIn:
        # Someone else in this process logged in to the token (not through this module's cache).
        session = _translate(lambda: token.open(rw=True), description, "open a session")
    except p11.PinExpired:
        raise KeyHolderConfigError(f"the user PIN of {description} has expired; set a new one") from None
    except p11.UserPinNotInitialized:
        raise KeyHolderConfigError(
            f"{description} has no user PIN yet; the security officer must set one (softhsm2-util or"
            " pkcs11-tool --init-pin)"
        ) from None
    except p11.PKCS11Error as exc:
        raise pin_error(exc, description, lib, label) or KeyHolderError(
            f"{description} refused to open a session ({type(exc).__name__}); check the token"
        ) from None
    entry = _TokenSession(module, label, session, pin)
    try:
        _self_test(entry)
    except BaseException:
        entry.close()
        raise
    return entry


def _self_test(entry: _TokenSession) -> None:
    """Check single DES (ECB, CBC, ECB_ENCRYPT_DATA derivation) against FIPS 81 inside the token,
    through python-pkcs11 and through the direct calls (p11direct) alike."""
    failure = (
        f"single DES does not work in PKCS#11 module {entry.module} (self-test on {entry.description}"
        " failed: {what}); the module needs OpenSSL's legacy provider (ossl-modules/legacy.so from libssl3)"
        " to be available"
    )

    def test(session: Any) -> str | None:
        template: dict[Attribute, Any] = {attribute: False for attribute in _ALL_CAPABILITY_ATTRIBUTES}
        template.update(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType._DES,
                Attribute.VALUE: _KAT_KEY,
                Attribute.TOKEN: False,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DERIVE: True,
                Attribute.LABEL: "iscl-self-test",
            }
        )
        key = session.create_object(template)
        try:
            if key.encrypt(_KAT_PLAIN, mechanism=Mechanism._DES_ECB) != _KAT_ECB:
                return "DES-ECB gave a wrong answer"
            handles = (session.handle, key.handle)
            if entry.direct.encrypt_block(*handles, Mechanism._DES_ECB, _KAT_PLAIN) != _KAT_ECB:
                return "DES-ECB through the module's function list gave a wrong answer"
            if entry.direct.derive_value(*handles, Mechanism.DES_ECB_ENCRYPT_DATA, _KAT_PLAIN) != _KAT_ECB:
                return "DES_ECB_ENCRYPT_DATA through the module's function list gave a wrong value"
            if (
                key.encrypt(_KAT_CBC_PLAIN, mechanism=Mechanism._DES_CBC, mechanism_param=_KAT_CBC_IV)
                != _KAT_CBC
            ):
                return "DES-CBC gave a wrong answer"
            param, buffer = derivation_param(_KAT_PLAIN)
            derived = key.derive_key(
                KeyType._DES,
                64,
                mechanism=Mechanism.DES_ECB_ENCRYPT_DATA,
                mechanism_param=bytes(param),
                store=False,
                capabilities=MechanismFlag(0),
                template={
                    Attribute.VALUE_LEN: DEFAULT,
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,
                },
            )
            del buffer
            try:
                if derived[Attribute.VALUE] != fix_parity(_KAT_ECB):
                    return "DES_ECB_ENCRYPT_DATA derivation gave a wrong key"
            finally:
                _destroy_quietly(derived)
            return None
        finally:
            _destroy_quietly(key)

    try:
        problem = entry.run(test)
    except (
        p11.MechanismInvalid,
        p11.KeyTypeInconsistent,
        p11.TemplateInconsistent,
        p11.FunctionFailed,
    ) as exc:
        raise KeyHolderError(failure.format(what=type(exc).__name__)) from None
    except p11.PKCS11Error as exc:
        raise KeyHolderError(
            f"the DES self-test on {entry.description} failed ({type(exc).__name__}); check the token"
        ) from None
    if problem is not None:
        raise KeyHolderError(failure.format(what=problem))


def _translate(call: Callable[[], T], description: str, what: str) -> T:
    try:
        return call()
    except p11.PKCS11Error as exc:
        raise _operation_error(exc, description, what) from None


_VANISHED: Final = (
    "the token's files may have been removed, or the token initialised again or its keys replaced, while"
    " links used it; restore the token, then start the links again"
)


def _operation_error(exc: BaseException, description: str, what: str) -> KeyHolderError:
    name = str(exc) if type(exc) is p11.PKCS11Error else type(exc).__name__  # (a code with no class)
    if isinstance(exc, (p11.DeviceRemoved, p11.TokenNotPresent, p11.SessionClosed, p11.SessionHandleInvalid)):
        return KeyHolderError(
            f"{description} could not {what}: the token was removed or its session ended ({name});"
            " open the key holder again"
        )
    if isinstance(exc, (p11.KeyHandleInvalid, p11.ObjectHandleInvalid)):
        return KeyHolderError(f"{description} could not {what}: the key is no longer in the token ({name}); {_VANISHED}")
    if isinstance(exc, p11.UserNotLoggedIn):
        return KeyHolderError(
            f"{description} could not {what}: the session is no longer logged in; open the key holder again"
        )
    if isinstance(exc, p11.MechanismInvalid):
        return KeyHolderError(
            f"{description} could not {what}: the module does not offer the mechanism needed ({name})"
        )
    return KeyHolderError(f"{description} could not {what} ({name}); check the token and its keys")


# --------------------------------------------------------------------------------------------------
# Record keys that stay in the token


class TokenDesKey:
    """A single-DES record key used inside the token (a derived session key, or V1.00's encryption key N).

    Implements the RecordKey protocol through CKM_DES_CBC in the token. ``close()`` destroys a
    derived key's token object; a derived key dropped without ``close()`` is destroyed at the token's
    next call. A long-term key (``owned`` false) is never destroyed.
    """

    __slots__ = ("__weakref__", "_entry", "_finalizer", "_key", "_open")

    in_process = False

    def __init__(self, entry: _TokenSession, key: Any, *, owned: bool = True) -> None:
        self._entry = entry
        self._key = key
        self._open = True
        self._finalizer = weakref.finalize(self, entry.doom, key) if owned else None

    def __repr__(self) -> str:
        return f"<TokenDesKey single-DES in {self._entry.description}, {'open' if self._open else 'closed'}>"

    def encrypt_cbc(self, iv: bytes, data: Buffer) -> bytes:
        """DES-CBC encrypt ``data`` (a multiple of 8 bytes) from ``iv`` inside the token; no padding."""
        return self._cbc(iv, data, encrypt=True)

    def decrypt_cbc(self, iv: bytes, data: Buffer) -> bytes:
        """DES-CBC decrypt ``data`` (a multiple of 8 bytes) from ``iv`` inside the token; no padding."""
        return self._cbc(iv, data, encrypt=False)

    def _cbc(self, iv: bytes, data: Buffer, *, encrypt: bool) -> bytes:
        iv = bytes(iv)
        data = bytes(data)
        if len(iv) != 8:
            raise ValueError(f"a DES IV is 8 bytes long, not {len(iv)}")
        if len(data) % 8:
            raise ValueError(f"DES data must be a multiple of 8 bytes long, not {len(data)}")
        if not self._open:
            raise KeyHolderError(f"this record key in {self._entry.description} was closed")
        if not data:
            return b""
        key = self._key

        def operation(session: Any) -> bytes:
            if encrypt:
                return bytes(key.encrypt(data, mechanism=Mechanism._DES_CBC, mechanism_param=iv))
            return bytes(key.decrypt(data, mechanism=Mechanism._DES_CBC, mechanism_param=iv))

        what = "encrypt a record" if encrypt else "decrypt a record"
        try:
            return self._entry.run(operation)
        except p11.PKCS11Error as exc:
            raise _operation_error(exc, self._entry.description, what) from None

    def close(self) -> None:
        """Destroy a derived key in the token now (idempotent). A long-term key stays usable: the key
        holder hands the same one to every V1.00 link, so one link's end must not close it for the next."""
        if self._finalizer is None:
            return
        self._open = False
        if self._finalizer.detach() is None:
            return
        entry = self._entry
        with entry.lock:
            if not entry.closed and entry.pid == os.getpid():
                _destroy_quietly(self._key)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# The key holder


class Pkcs11KeyHolder(KeyHolder):
    """ISCL keys on a PKCS#11 token, found by label (see the module docstring for the convention)."""

    gives_encryption_keys = True

    def __init__(
        self,
        token_label: str,
        pin: str,
        module: str = DEFAULT_MODULE,
        record_keys: str = "host",
    ) -> None:
        if record_keys not in _RECORD_KEY_MODES:
            raise KeyHolderError(
                f"record_keys must be 'host' or 'token', not {record_keys!r}", ErrorCode.BAD_OPTION
            )
        if record_keys == "host":
            self_test_once()
        self.module = module
        self.token_label = token_label
        self.record_keys = record_keys
        self.host_record_keys = record_keys == "host"
        self.description = f"PKCS#11 token '{token_label}' (module {module})"
        self._challenge_lock = threading.Lock()
        self._challenges: dict[int, collections.OrderedDict[bytes, bytes | None]] = {}
        """Outstanding challenges per key id, with the response expected to each once worked out."""
        self._direct_keys: dict[int, RecordKey] = {}  # V1.00's encryption keys, once fetched
        self._keys: dict[tuple[str, int], tuple[Any, KeyType, dict[Attribute, Any], Expiry | None]] = {}
        """Key objects by (purpose, index), looked up once per holder: a holder opened after a key was
        rotated or imported (a tunnel's reload) finds the new one, while older holders keep theirs. With
        each, the version's not-after from its key record, checked at every use (:meth:`_key`)."""
        self._closed = False
        registry_key = (os.path.realpath(module), token_label)
        with _registry_lock:
            entry = _sessions.get(registry_key)
            if entry is not None and entry.pid != os.getpid():
                entry = None
            if entry is None:
                entry = _open_token_session(module, token_label, pin)
                _sessions[registry_key] = entry
            elif not entry.pin_matches(pin):
                raise KeyHolderError(
                    f"the PIN given for {self.description} differs from the one this process logged in"
                    " with; check the PIN or PIN file"
                )
            entry.users += 1
        self._entry = entry

    def __repr__(self) -> str:
        return (
            f"<Pkcs11KeyHolder token={self.token_label!r} module={self.module!r}"
            f" record_keys={self.record_keys!r}{' closed' if self._closed else ''}>"
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the KeyHolder interface --------------------------------------------------------------------

    def get_challenge(self, key_id: int) -> bytes:
        self._usable("auth", key_id)  # a challenge for a key we do not hold is an error now, not later
        challenge = bytes(
            self._run(lambda session: session.generate_random(64), "generate a random challenge")
        )
        with self._challenge_lock:
            outstanding = self._challenges.setdefault(key_id, collections.OrderedDict())
            outstanding[challenge] = None
            while len(outstanding) > MAX_OUTSTANDING_CHALLENGES:
                outstanding.popitem(last=False)
        return challenge

    def internal_authenticate(self, key_id: int, block: bytes) -> bytes:
        block = _check_block(block, "the block to authenticate")
        return self._encrypt_block(key_id, block)

    def external_authenticate(self, key_id: int, challenge: bytes, cryptogram: bytes) -> bool:
        _check_index(key_id)
        challenge = bytes(challenge)
        with self._challenge_lock:
            outstanding = self._challenges.get(key_id)
            if outstanding is None or challenge not in outstanding:
                return False
            expected = outstanding.pop(challenge)
        if expected is None:
            expected = self._encrypt_block(key_id, challenge)
        return hmac.compare_digest(expected, bytes(cryptogram))

    def expect_response(self, key_id: int, challenge: bytes) -> None:
        """E_AK(challenge) now, so that the handshake step that checks the peer's answer makes no token call."""
        challenge = bytes(challenge)
        with self._challenge_lock:
            outstanding = self._challenges.get(key_id)
            if outstanding is None or outstanding.get(challenge, b"") is not None:
                return  # not outstanding, or worked out already
        expected = self._encrypt_block(key_id, challenge)
        with self._challenge_lock:
            if challenge in outstanding:
                outstanding[challenge] = expected

    def derive_key(self, enc_key_id: int, block: bytes) -> RecordKey:
        return self.derive_keys(enc_key_id, [block])[0]

    def encryption_key(self, enc_key_id: int) -> RecordKey:
        """Encryption key N itself, for V1.00: read once (host-readable key and ``record_keys="host"``),
        else used inside the token, which its ENCRYPT and DECRYPT capabilities must allow."""
        key, key_type, attributes = self._key("enc", enc_key_id)  # (before the cache: it may have expired)
        with self._challenge_lock:
            cached = self._direct_keys.get(enc_key_id)
        if cached is not None:
            return cached
        name = f"encryption key {enc_key_id} ({key_label('enc', enc_key_id)}) on {self.description}"
        if key_type is not KeyType._DES:
            raise KeyHolderConfigError(
                f"{name} is triple DES; V1.00 links with encryption key {enc_key_id} use it as a single-DES key."
                " Use unique session keys (--enc-key-id session) or the hardened profile, or have the security"
                " officer create a single-DES key there",
                ErrorCode.KEY_NOT_FOUND,
            )
        readable = not attributes.get(Attribute.SENSITIVE) and attributes.get(Attribute.EXTRACTABLE)
        record: RecordKey
        if self.record_keys == "host" and readable:
            value = self._run(lambda session: bytes(key[Attribute.VALUE]), f"read {key_label('enc', enc_key_id)}")
            record = DesKey(value)
        elif all(attributes.get(capability) for capability in _DIRECT_USE):
            if self.record_keys == "host":
                log.info(
                    "%s is kept sensitive, so V1.00 links protect their records with it inside the token"
                    " (slower than on the host); the security officer can make it host-readable"
                    " (iscl keys generate --host-readable), or choose --record-keys token to say so",
                    name,
                )
            record = TokenDesKey(self._entry, key, owned=False)
        else:
            raise KeyHolderConfigError(
                f"{name} can only derive keys (it was made for the hardened profile); a V1.00 link with"
                f" encryption key {enc_key_id} uses the key itself. Have the security officer make it again for"
                " V1.00, with the same value (iscl keys rotate --purpose enc --index"
                f" {enc_key_id} --import-components N; {doc_reference('security-officer.md')}, section 2.3), or use unique"
                " session keys (--enc-key-id session) or the hardened profile (--profile hardened)",
                ErrorCode.KEY_NOT_FOUND,
            )
        with self._challenge_lock:
            return self._direct_keys.setdefault(enc_key_id, record)

    def derive_keys(self, enc_key_id: int, blocks: Sequence[bytes]) -> list[RecordKey]:
        """Host record keys: one C_DeriveKey over all the blocks; token record keys: one per block.

        CKM_DES_ECB_ENCRYPT_DATA over concatenated blocks is ECB, block by block, so a generic
        secret derived from them holds each block's E_KE(block); the host applies parity. A
        token derivation costs about as much for eight blocks as for one.
        """
        if self.record_keys == "token":
            return [
                self._derive_in_token(enc_key_id, _check_block(block, "the key derivation block"))
                for block in blocks
            ]
        value = self.encrypt_blocks(enc_key_id, blocks)
        return [DesKey(fix_parity(value[i : i + 8])) for i in range(0, len(value), 8)]

    def encrypt_blocks(self, enc_key_id: int, blocks: Sequence[bytes]) -> bytes:
        """E_KE(block) of each block, concatenated: the host record keys before their parity is set.

        A card answers INTERNAL AUTHENTICATE under an encryption key with exactly this, so the
        virtual card on a token (iscl_hsm.cardsim.keys.TokenKeys) uses it. Only with host record keys: with
        ``record_keys="token"`` derived values never leave the token.
        """
        if self.record_keys == "token":
            raise KeyHolderError(
                f"{self.description} keeps record keys in the token (record_keys='token'), so derived"
                " values cannot be read out; open it with record_keys='host'",
                ErrorCode.BAD_OPTION,
            )
        data = b"".join(_check_block(block, "the key derivation block") for block in blocks)
        direct = self._entry.direct

        def derive(key: Any, key_type: KeyType) -> bytes:
            return direct.derive_value(key.session.handle, key.handle, _ECB_ENCRYPT_DATA[key_type], data)

        return self._with_key("enc", enc_key_id, derive, f"derive record keys from {key_label('enc', enc_key_id)}")

    def _derive_in_token(self, enc_key_id: int, block: bytes) -> RecordKey:
        """A sensitive, non-extractable session DES key (the token sets its parity), used in the token."""

        def derive(key: Any, key_type: KeyType) -> Any:
            param, buffer = derivation_param(block)
            derived = key.derive_key(
                KeyType._DES,
                64,
                mechanism=_ECB_ENCRYPT_DATA[key_type],
                mechanism_param=bytes(param),
                store=False,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={Attribute.VALUE_LEN: DEFAULT, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            )
            del buffer
            return derived

        handle = self._with_key("enc", enc_key_id, derive, f"derive a record key from {key_label('enc', enc_key_id)}")
        return TokenDesKey(self._entry, handle)

    def close(self) -> None:
        with _registry_lock:
            if self._closed:
                return
            self._closed = True
            entry = self._entry
            entry.users -= 1
            if entry.users <= 0:
                if _sessions.get(entry.registry_key) is entry:
                    del _sessions[entry.registry_key]
                entry.close()
        with self._challenge_lock:
            self._challenges.clear()
            self._direct_keys.clear()
            self._keys.clear()

    # -- provisioning access ------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Any]:
        """Yield the logged-in R/W python-pkcs11 session, alone on it (for provisioning tools).

        The cached key handles are forgotten afterwards, since keys may have been added or destroyed.
        """
        self._check_open()
        with self._entry.lock:
            self._entry.check_usable()
            try:
                yield self._entry.session
            finally:
                self._keys.clear()

    # -- internals ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KeyHolderError(f"{self.description}: this key holder is closed; open it again")

    def _run(self, operation: Callable[[Any], T], what: str) -> T:
        """Run ``operation(session)`` alone on the shared session, translating token errors."""
        self._check_open()
        try:
            return self._entry.run(operation)
        except p11.PKCS11Error as exc:
            raise _operation_error(exc, self.description, what) from None

    def _with_key(self, purpose: str, index: int, operation: Callable[[Any, KeyType], T], what: str) -> T:
        """Run ``operation(key, key_type)`` alone on the session; look the key up again if stale."""
        for attempt in (1, 2):
            try:
                key, key_type = self._usable(purpose, index)
            except KeyHolderError as exc:
                if attempt == 1 or exc.code is not ErrorCode.KEY_NOT_FOUND:
                    raise
                # The key answered a moment ago and is gone now: not a key the officer never made.
                raise KeyHolderError(
                    f"{_PURPOSE_NAMES[purpose]} {index} (label '{key_label(purpose, index)}') is no longer on"
                    f" {self.description}, though this process used it before; {_VANISHED}"
                ) from None
            self._check_open()
            try:
                return self._entry.run(functools.partial(_call_with_key, operation, key, key_type))
            except (p11.KeyHandleInvalid, p11.ObjectHandleInvalid) as exc:
                self._keys.pop((purpose, index), None)
                if attempt == 2:
                    raise _operation_error(exc, self.description, what) from None
            except p11.PKCS11Error as exc:
                raise _operation_error(exc, self.description, what) from None
        raise AssertionError("unreachable")

    def _encrypt_block(self, key_id: int, block: bytes) -> bytes:
        direct = self._entry.direct
        return self._with_key(
            "auth",
            key_id,
            lambda key, key_type: direct.encrypt_block(key.session.handle, key.handle, _ECB[key_type], block),
            f"encrypt with {key_label('auth', key_id)}",
        )

    def _key(self, purpose: str, index: int) -> tuple[Any, KeyType, dict[Attribute, Any]]:
        """(key object, key type, attributes) of ``purpose`` key ``index``, looked up once and then cached,
        if it has not expired: the clock is read here, at each use, so a link cannot open with an
        expired key."""
        _check_index(index)
        found = self._keys.get((purpose, index))
        if found is None:
            found = self._keys[(purpose, index)] = self._run(
                lambda session: self._lookup(session, purpose, index), f"look up {key_label(purpose, index)}"
            )
        key, key_type, attributes, expiry = found
        if expiry is not None:
            expiry.check(self.description)
        return key, key_type, attributes

    def _usable(self, purpose: str, index: int) -> tuple[Any, KeyType]:
        """The key and its type, if it has the capability the handshake or a derivation needs of it (and
        has not expired, see :meth:`_key`)."""
        key, key_type, attributes = self._key(purpose, index)
        needed = _NEEDED_CAPABILITY[purpose]
        if not attributes.get(needed):
            raise KeyHolderConfigError(
                f"{_PURPOSE_NAMES[purpose]} {index} (label '{key_label(purpose, index)}') on {self.description}"
                f" lacks the {needed.name} capability it needs; the security officer must recreate it under the"
                " ISCL key convention",
                ErrorCode.KEY_NOT_FOUND,
            )
        return key, key_type

    def _lookup(
        self, session: Any, purpose: str, index: int
    ) -> tuple[Any, KeyType, dict[Attribute, Any], Expiry | None]:
        label = key_label(purpose, index)
        what = f"{_PURPOSE_NAMES[purpose]} {index} (label '{label}')"
        prefix = key_id(purpose, index)[:2]
        candidates = []
        other_ids = []
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}):
            ident = bytes(obj[Attribute.ID])
            if len(ident) == 3 and ident[:2] == prefix:
                candidates.append((ident[2], obj))
            else:
                other_ids.append(ident.hex())
        if not candidates:
            if other_ids:
                raise KeyHolderConfigError(
                    f"{what} on {self.description} has CKA_ID {', '.join(other_ids)} instead of"
                    f" {prefix.hex()}<version>; the security officer must recreate it under the ISCL key"
                    " convention (iscl keys, `iscl docs security-officer`)",
                    ErrorCode.KEY_NOT_FOUND,
                )
            raise KeyHolderConfigError(
                f"{what} is not on {self.description}; the security officer must create it (iscl keys,"
                " `iscl docs security-officer`), or choose a key id that exists",
                ErrorCode.KEY_NOT_FOUND,
            )
        candidates.sort(key=lambda pair: pair[0])
        if len(candidates) > 1 and candidates[-1][0] == candidates[-2][0]:
            raise KeyHolderConfigError(
                f"{what} exists twice with version {candidates[-1][0]} on {self.description}; the security"
                " officer must destroy one of them",
                ErrorCode.KEY_NOT_FOUND,
            )
        version, obj = candidates[-1]
        attributes = obj.get_attributes(
            [Attribute.KEY_TYPE, Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.WRAP_WITH_TRUSTED,
             *_ALL_CAPABILITY_ATTRIBUTES]
        )
        key_type = attributes.get(Attribute.KEY_TYPE)
        if key_type not in _DES_TYPES:
            raise KeyHolderConfigError(
                f"{what} on {self.description} is not a DES, DES2 or DES3 key; ISCL needs a DES key there",
                ErrorCode.KEY_NOT_FOUND,
            )
        allowed = _POLICY_CAPABILITIES[purpose]
        extra = [a.name for a in _ALL_CAPABILITY_ATTRIBUTES if a not in allowed and attributes.get(a)]
        sensitive, extractable = attributes.get(Attribute.SENSITIVE), attributes.get(Attribute.EXTRACTABLE)
        # Within policy: extractable under trusted wrapping keys only (iscl keys ... --exportable), or an
        # enc key readable by design (--host-readable, for V1.00).
        host_readable = purpose == "enc" and not sensitive and extractable
        loosely_extractable = extractable and not attributes.get(Attribute.WRAP_WITH_TRUSTED) and not host_readable
        if extra or (not sensitive and not host_readable) or loosely_extractable:
            log.warning(
                "%s on %s breaks the ISCL key policy (extra capabilities: %s; sensitive: %s;"
                " extractable: %s);"
                " ask the security officer to recreate it",
                what,
                self.description,
                ", ".join(extra) or "none",
                bool(sensitive),
                bool(extractable),
            )
        return obj, KeyType(key_type), attributes, read_expiry(session, label, version, what)
