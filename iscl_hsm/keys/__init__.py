"""Key management for security officers (``iscl keys``): ceremonies, rotation, wrapping, audit.

* :mod:`.components` -- key components: parse, check, XOR, key check values (no token needed).
* :mod:`.store` -- token operations on ISCL keys (list, create, rotate, retire, delete, export,
  import), built on :mod:`iscl_hsm.keyholder.pkcs11` and :mod:`iscl_hsm.keyholder.provision`.
* :mod:`.binding` -- binds a wrapped-key file's fields to the transport key (HMAC, one-time key).
* :mod:`.backup` -- every exportable key of a token in one bound file, and restoring it.
* :mod:`.audit` -- the hash-chained audit log.
* :mod:`.anchor` -- audit entries anchored in the token (a MAC each, a count per log).
* :mod:`.forms` -- the custodian's component form, to print and seal.
* :mod:`.policy` -- dual control: the token's policy and its witnesses (passphrase hashes).

The command line around them is :mod:`iscl_hsm.cli.keys`; the procedure is docs/security-officer.md.
"""

from __future__ import annotations

from .audit import AuditError, AuditLog, AuditReport, verify
from .components import (
    ALGORITHMS,
    Algorithm,
    ComponentError,
    algorithm_for,
    combine,
    kcv_of,
    parse_component,
    split,
)
from .store import NEW, REPLACE, ROTATE, KeyInfo, KeyStore, parse_wrapped, trusted_transport_value

__all__ = [
    "ALGORITHMS",
    "NEW",
    "REPLACE",
    "ROTATE",
    "Algorithm",
    "AuditError",
    "AuditLog",
    "AuditReport",
    "ComponentError",
    "KeyInfo",
    "KeyStore",
    "algorithm_for",
    "combine",
    "kcv_of",
    "parse_component",
    "parse_wrapped",
    "split",
    "trusted_transport_value",
    "verify",
]
