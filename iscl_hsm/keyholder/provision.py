"""Create SoftHSM2 tokens and ISCL keys on them (the demo, the tests, and later ``iscl keys``).

Keys follow the convention in :mod:`iscl_hsm.keyholder.pkcs11` (labels ``iscl-auth-N`` and
``iscl-enc-N``, CKA_ID purpose|N|version; auth keys ENCRYPT only, enc keys DERIVE, ENCRYPT and DECRYPT;
sensitive and never extractable, except enc keys made host-readable for V1.00 links).
Nothing here prints, logs or returns a key value or a PIN: keys are shown by label and key check
value (KCV: first 3 bytes of the key's encryption of a zero block).

Run ``python3 -m iscl_hsm.keyholder.provision --help`` (or softhsm/setup-token.sh) to create a token
with 16 keys for demos and tests; security officers make a site's keys with ``iscl keys``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.constants import DEFAULT

from iscl_hsm.crypto.des import fix_parity, is_weak, kcv
from iscl_hsm.errors import ErrorCode, KeyHolderConfigError, KeyHolderError
from iscl_hsm.keyholder.base import KEY_INDEXES
from iscl_hsm.keyholder.pkcs11 import (
    DEFAULT_MODULE,
    KEY_VERSION,
    Pkcs11KeyHolder,
    is_module_loaded,
    key_id,
    key_label,
    key_policy,
    refresh_token_list,
)
from iscl_hsm.locking import lock_exclusive
from iscl_hsm.shared import SOFTHSM

__all__ = [
    "DEMO_LABEL",
    "default_data_dir",
    "ensure_demo_token",
    "ensure_token",
    "init_token",
    "softhsm_environment",
    "softhsm_token_labels",
    "store_key",
    "use_softhsm_conf",
]

DEMO_LABEL = "iscl-demo"
_KEY_TYPES = {8: KeyType._DES, 16: KeyType.DES2, 24: KeyType.DES3}
_CAPABILITY = {"auth": MechanismFlag.ENCRYPT, "enc": MechanismFlag.DERIVE | MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT}
_GENERATED_TYPES = {8: (KeyType._DES, Mechanism._DES_KEY_GEN), 24: (KeyType.DES3, Mechanism.DES3_KEY_GEN)}


def _softhsm_dir() -> Path:
    """The softhsm/ folder with the configuration templates (in the source tree, or installed)."""
    folder = SOFTHSM.find()
    if folder is None:
        raise KeyHolderError(
            "the SoftHSM2 configuration templates (softhsm/softhsm2.conf.in) are missing; looked in "
            + ", ".join(str(c) for c in SOFTHSM.candidates())
            + ". Reinstall iscl-hsm or run from its source tree"
        )
    return folder


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/iscl-hsm, or ~/.local/share/iscl-hsm."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "iscl-hsm"


def softhsm_environment(data_dir: Path, conf_name: str = "softhsm2.conf") -> dict[str, str]:
    """Write <data_dir>/<conf_name> (tokens in <data_dir>/tokens) and return the variables to use.

    Returns SOFTHSM2_CONF (must be in the environment before a process loads libsofthsm2.so) and
    OPENSSL_CONF (enables single DES for command-line tools such as softhsm2-util and pkcs11-tool;
    iscl_hsm itself does not need it).
    """
    data_dir = Path(data_dir).absolute()
    tokendir = data_dir / "tokens"
    if "\n" in str(tokendir):
        raise KeyHolderError(f"the data directory {data_dir!r} contains a line break; choose another")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokendir.mkdir(mode=0o700, exist_ok=True)
    templates = _softhsm_dir()
    text = (templates / "softhsm2.conf.in").read_text().replace("@TOKENDIR@", str(tokendir))
    conf = data_dir / conf_name
    if not conf.is_file() or conf.read_text() != text:
        temporary = conf.with_name(conf.name + ".tmp")
        temporary.write_text(text)
        temporary.replace(conf)
    return {"SOFTHSM2_CONF": str(conf), "OPENSSL_CONF": str(templates / "openssl-legacy.cnf")}


def _tool_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    merged.update(env or {})
    return merged


def _redact(text: str, *hidden: str) -> str:
    for value in hidden:
        if value:
            text = text.replace(value, "***")
    return text.strip()


def _run_softhsm_util(args: list[str], env: Mapping[str, str] | None, *hidden: str) -> str:
    command = ["softhsm2-util", *args]
    try:
        done = subprocess.run(command, env=_tool_env(env), capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise KeyHolderError("softhsm2-util is not installed; install the softhsm2 package") from None
    except subprocess.TimeoutExpired:
        raise KeyHolderError(f"softhsm2-util {args[0]} did not finish within 60 s") from None
    if done.returncode != 0:
        output = _redact(done.stderr + done.stdout, *hidden)
        conf = _tool_env(env).get("SOFTHSM2_CONF", "/etc/softhsm/softhsm2.conf (SOFTHSM2_CONF unset)")
        raise KeyHolderError(
            f"softhsm2-util {args[0]} failed (exit {done.returncode}, configuration {conf}): {output}"
        )
    return done.stdout


def softhsm_token_labels(env: Mapping[str, str] | None = None) -> list[str]:
    """Labels of the initialised SoftHSM2 tokens, asked of softhsm2-util (a fresh process).

    A process that has loaded libsofthsm2.so does not see tokens created after that; this does.
    """
    labels = []
    initialised = False
    for line in _run_softhsm_util(["--show-slots"], env).splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Initialized":
            initialised = value.strip() == "yes"
        elif key == "Label" and initialised:
            labels.append(value.strip())
            initialised = False
    return labels


def init_token(
    label: str,
    so_pin: str,
    user_pin: str,
    module: str = DEFAULT_MODULE,
    env: Mapping[str, str] | None = None,
    *,
    replace: bool = False,
) -> None:
    """Initialise a free SoftHSM2 slot as token ``label`` with the given SO and user PINs.

    Runs softhsm2-util with SOFTHSM2_CONF from ``env`` or the process environment. The PINs are on
    its command line for the moment it runs (softhsm2-util reads them from a terminal otherwise),
    and never in an error message. Refuses an existing label, unless ``replace``: then that token
    is erased and initialised again, which needs its current SO PIN. If this process has the
    module loaded already, its token list is refreshed so the new token can be opened.
    """
    if "softhsm" not in os.path.basename(module).lower():
        raise KeyHolderError(
            f"init_token creates SoftHSM2 tokens only, not tokens of {module}; initialise that token with"
            " its vendor's tools"
        )
    if not label or len(label.encode("utf-8")) > 32:
        raise KeyHolderError(f"a token label is 1 to 32 bytes long; {label!r} is not", ErrorCode.BAD_OPTION)
    for name, pin in (("SO PIN", so_pin), ("user PIN", user_pin)):
        if not 4 <= len(pin) <= 255:
            raise KeyHolderError(f"the {name} must be 4 to 255 characters long", ErrorCode.BAD_OPTION)
    exists = label in softhsm_token_labels(env)
    if exists and not replace:
        raise KeyHolderError(
            f"a SoftHSM2 token labelled '{label}' already exists; choose another label, or erase that token"
            " and initialise it again with its SO PIN (iscl keys init-token --replace)",
            ErrorCode.BAD_OPTION,
        )
    args = [
        "--init-token",
        *(["--token", label] if exists else ["--free"]),
        "--label",
        label,
        "--so-pin",
        so_pin,
        "--pin",
        user_pin,
        "--module",
        module,
    ]
    try:
        _run_softhsm_util(args, env, so_pin, user_pin)
    except KeyHolderError as exc:
        if "CKR_PIN_INCORRECT" in str(exc):
            raise KeyHolderConfigError(
                f"wrong SO PIN for SoftHSM2 token '{label}': initialising it again needs its current SO PIN;"
                " the token was left as it was"
            ) from None
        raise
    if is_module_loaded(module):
        refresh_token_list(module)


@contextlib.contextmanager
def _session_of(target: Any) -> Iterator[Any]:
    if isinstance(target, Pkcs11KeyHolder):
        with target.session() as session:
            yield session
    else:
        yield target


def store_key(
    target: Pkcs11KeyHolder | Any,
    purpose: str,
    index: int,
    value: bytes | None = None,
    *,
    version: int = KEY_VERSION,
    exportable: bool = False,
    host_readable: bool = False,
    key_length: int = 8,
) -> bytes:
    """Create auth or enc key ``index`` (1..8) on the token and return its 3-byte KCV.

    ``target`` is a :class:`Pkcs11KeyHolder` or a logged-in R/W python-pkcs11 session. ``value``
    None generates a single-DES key (``key_length`` 8, CKM_DES_KEY_GEN) or a three-key triple-DES
    key (24, CKM_DES3_KEY_GEN) inside the token; 8, 16 or 24 bytes import a DES, DES2 or DES3 key
    (parity fixed first; weak keys refused). Refuses a label already present, unless every version
    present is lower than ``version`` (a rotation: the new version becomes the current one).
    ``exportable`` creates the key extractable under trusted wrapping keys only; ``host_readable`` (enc
    keys) lets a logged-in user read it, for V1.00 links that use it on the host (see key_policy).
    """
    policy = key_policy(purpose, exportable=exportable, host_readable=host_readable)
    if index not in KEY_INDEXES:
        raise KeyHolderError(f"key id {index!r} is outside 1..8", ErrorCode.BAD_OPTION)
    if not 1 <= version <= 255:
        raise KeyHolderError(f"key version {version!r} is outside 1..255", ErrorCode.BAD_OPTION)
    if value is None and key_length not in _GENERATED_TYPES:
        raise KeyHolderError(
            f"a generated DES key is 8 or 24 bytes long, not {key_length}", ErrorCode.BAD_LENGTH
        )
    label = key_label(purpose, index)
    ident = key_id(purpose, index, version)
    fixed = None
    if value is not None:
        if len(value) not in _KEY_TYPES:
            raise KeyHolderError(
                f"a key for {label} must be 8, 16 or 24 bytes long, not {len(value)}", ErrorCode.BAD_LENGTH
            )
        fixed = fix_parity(bytes(value))
        if is_weak(fixed):
            raise KeyHolderError(f"the key given for {label} is a weak or semi-weak DES key; choose another")
    with _session_of(target) as session:
        try:
            existing = list(
                session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
            )
            newest = max((_version_of(obj, ident) for obj in existing), default=0)
            if newest >= version:
                raise KeyHolderError(
                    f"a key labelled '{label}' already exists on the token"
                    + (f" (version {newest})" if version != KEY_VERSION else "")
                    + "; destroy it first to replace it, or rotate it to a new version"
                )
            if fixed is None:
                key_type, mechanism = _GENERATED_TYPES[key_length]
                key = session.generate_key(
                    key_type,
                    key_length * 8,
                    id=ident,
                    label=label,
                    store=True,
                    capabilities=_CAPABILITY[purpose],
                    mechanism=mechanism,
                    template={Attribute.VALUE_LEN: DEFAULT, **policy},
                )
            else:
                template = {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: _KEY_TYPES[len(fixed)],
                    Attribute.VALUE: fixed,
                    Attribute.LABEL: label,
                    Attribute.ID: ident,
                    **policy,
                }
                key = session.create_object(template)
            check = bytes(key[Attribute.CHECK_VALUE])
        except p11.MechanismInvalid:
            raise KeyHolderError(
                f"the token cannot create the DES key {label} (CKR_MECHANISM_INVALID); single DES needs"
                " OpenSSL's legacy provider in the PKCS#11 module"
            ) from None
        except p11.PKCS11Error as exc:
            raise KeyHolderError(f"the token refused to create key {label} ({type(exc).__name__})") from None
        if fixed is not None:
            expected = kcv(fixed)
            if check and check != expected:
                _destroy(key)
                raise KeyHolderError(
                    f"the token computed check value {check.hex().upper()} for {label}, not"
                    f" {expected.hex().upper()}; its DES is broken, so the key was destroyed again"
                )
            check = expected
        if len(check) != 3:
            raise KeyHolderError(
                f"the token gave no check value for {label}; single DES does not work in its PKCS#11 module"
                " (OpenSSL's legacy provider is missing)"
            )
        return check


def _version_of(obj: Any, ident: bytes) -> int:
    """Version byte of a key sharing ``ident``'s label; 255 for an object off the convention."""
    found = bytes(obj[Attribute.ID])
    return found[2] if len(found) == 3 and found[:2] == ident[:2] else 255


def _destroy(key: Any) -> None:
    with contextlib.suppress(p11.PKCS11Error):
        key.destroy()


def _key_check_values(session: Any) -> dict[str, bytes]:
    """KCV by label of the ISCL keys present on the token."""
    result = {}
    for purpose in ("auth", "enc"):
        for index in KEY_INDEXES:
            label = key_label(purpose, index)
            for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}):
                result[label] = bytes(obj[Attribute.CHECK_VALUE])
    return result


def _read_or_create_pin(pin_file: Path) -> str:
    try:
        return pin_file.read_text().strip()
    except FileNotFoundError:
        pass
    pin = secrets.token_hex(16)
    pin_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(pin + "\n")
    return pin


def use_softhsm_conf(conf: str, module: str) -> None:
    """Point this process's SOFTHSM2_CONF at ``conf``; impossible once the module is loaded elsewhere."""
    if os.environ.get("SOFTHSM2_CONF") == conf:
        return
    if is_module_loaded(module):
        raise KeyHolderError(
            f"this process loaded {module} with SOFTHSM2_CONF={os.environ.get('SOFTHSM2_CONF')}, so it cannot"
            f" switch to {conf}; set SOFTHSM2_CONF={conf} before starting the process"
        )
    os.environ["SOFTHSM2_CONF"] = conf


def ensure_token(
    data_dir: Path | None,
    label: str,
    pin_file: Path | None = None,
    keys: Mapping[tuple[str, int], bytes] | None = None,
    module: str = DEFAULT_MODULE,
    *,
    host_readable: bool = False,
) -> tuple[str, Path, dict[str, bytes]]:
    """Make sure SoftHSM2 token ``label`` exists in ``data_dir`` with auth and enc keys 1..8.

    Idempotent. Sets SOFTHSM2_CONF in this process's environment to <data_dir>/softhsm2.conf. The
    user PIN is read from ``pin_file`` (default <data_dir>/pin), or made up and written there
    (mode 0600) when the file is absent; the SO PIN is random and not kept (delete the token to
    start over). Missing keys are imported from ``keys`` ((purpose, index) -> value) or generated in
    the token; a present key that differs from a value in ``keys`` is an error. ``host_readable``
    makes the enc keys it creates readable by the host (for V1.00 links at OpenSSL's speed).
    Returns (label, PIN file, KCV by key label).
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    env = softhsm_environment(data_dir)
    use_softhsm_conf(env["SOFTHSM2_CONF"], module)
    pin_path = Path(pin_file) if pin_file is not None else data_dir / "pin"
    keys = dict(keys or {})
    with open(data_dir / ".lock", "a") as lock:
        lock_exclusive(lock)
        if label not in softhsm_token_labels(env):
            init_token(label, secrets.token_urlsafe(24), _read_or_create_pin(pin_path), module, env)
        elif not pin_path.is_file():
            raise KeyHolderError(
                f"SoftHSM2 token '{label}' exists in {data_dir} but its PIN file {pin_path} is missing; give"
                " the right --pin-file, or delete the token to start over"
            )
        pin = _read_or_create_pin(pin_path)
        if is_module_loaded(module):  # another process may have made the token after we loaded SoftHSM2
            with contextlib.suppress(KeyHolderError):  # key holders open: NoSuchToken will explain
                refresh_token_list(module)
        with Pkcs11KeyHolder(label, pin, module) as holder, holder.session() as session:
            present = _key_check_values(session)
            for purpose in ("auth", "enc"):
                for index in KEY_INDEXES:
                    name = key_label(purpose, index)
                    value = keys.get((purpose, index))
                    if name not in present:
                        readable = host_readable and purpose == "enc"
                        present[name] = store_key(session, purpose, index, value, host_readable=readable)
                    elif value is not None and present[name] != kcv(fix_parity(value)):
                        raise KeyHolderError(
                            f"key {name} on token '{label}' has KCV {present[name].hex().upper()},"
                            " not that of"
                            " the value given; destroy it first to replace it"
                        )
    order = [key_label(purpose, index) for purpose in ("auth", "enc") for index in KEY_INDEXES]
    return label, pin_path, {name: present[name] for name in order}


DEMO_TOKEN_FORMAT = "2"
"""The demo token's make: 2 has host-readable encryption keys, which V1.00 links use as they are."""


def ensure_demo_token(data_dir: Path | None = None) -> tuple[str, Path]:
    """Token "iscl-demo" with 16 keys generated inside it; returns (label, path of the PIN file).

    Its encryption keys are host-readable, so that the default V1.00 link (encryption key 1 used as
    the DES key) runs at OpenSSL's speed. A demo token of an earlier make is deleted and made anew:
    it holds nothing but random demo keys.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    marker = data_dir / "demo-token-format"
    if (data_dir / "tokens").is_dir() and not _marker_says(marker, DEMO_TOKEN_FORMAT):
        _forget_demo_token(data_dir)
    label, pin_path, _ = ensure_token(data_dir, DEMO_LABEL, host_readable=True)
    marker.write_text(DEMO_TOKEN_FORMAT + "\n")
    return label, pin_path


def _marker_says(marker: Path, expected: str) -> bool:
    try:
        return marker.read_text().strip() == expected
    except FileNotFoundError:
        return False


def _forget_demo_token(data_dir: Path) -> None:
    """Delete an old demo token (files and PIN), before any process of ours has loaded SoftHSM2."""
    if is_module_loaded(DEFAULT_MODULE):
        raise KeyHolderError(
            f"the demo token in {data_dir} is of an earlier make (its encryption keys cannot serve V1.00 links);"
            f" delete {data_dir / 'tokens'} and {data_dir / 'pin'} to have it made anew"
        )
    print(f"iscl: making the demo token in {data_dir} anew (V1.00 links need its encryption keys host-readable)",
          file=sys.stderr)
    for entry in (data_dir / "tokens").iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (data_dir / "pin").unlink(missing_ok=True)


def _read_key_file(path: Path) -> dict[tuple[str, int], bytes]:
    """Lines "auth 1 <hex>" / "enc 3 <hex>"; '#' starts a comment."""
    keys = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            purpose, index, value = fields[0], int(fields[1]), bytes.fromhex(fields[2])
            if purpose not in _CAPABILITY or index not in KEY_INDEXES or len(fields) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise KeyHolderError(
                f"{path} line {number} is not 'auth|enc <1..8> <hex key>'", ErrorCode.BAD_OPTION
            ) from None
        keys[(purpose, index)] = value
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m iscl_hsm.keyholder.provision",
        description="Create a SoftHSM2 token holding the ISCL keys iscl-auth-1..8 and iscl-enc-1..8, for"
        " demos and tests. A site's keys are made with `iscl keys` (`iscl docs security-officer`).",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"SoftHSM2 data (default {default_data_dir()})"
    )
    parser.add_argument("--label", default=DEMO_LABEL, help=f"token label (default {DEMO_LABEL})")
    parser.add_argument(
        "--pin-file", type=Path, default=None, help="user PIN file, made if absent (default DATA_DIR/pin)"
    )
    parser.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="keys to import, lines 'auth|enc N HEX' (others are generated)",
    )
    parser.add_argument(
        "--host-readable",
        action="store_true",
        help="make the encryption keys readable by a logged-in host, so V1.00 links with fixed key ids"
        " protect records with OpenSSL (else inside the token, slower)",
    )
    args = parser.parse_args(argv)
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    try:
        keys = _read_key_file(args.key_file) if args.key_file else None
        label, pin_path, kcvs = ensure_token(data_dir, args.label, args.pin_file, keys, host_readable=args.host_readable)
    except KeyHolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    env = softhsm_environment(data_dir)
    print(f"token '{label}' ready; PIN in {pin_path}")
    for name, value in env.items():
        print(f"export {name}={value}")
    for name, check in kcvs.items():
        print(f"{name:14s} KCV {check.hex().upper()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
