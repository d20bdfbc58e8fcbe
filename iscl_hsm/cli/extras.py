"""The optional parts of iscl-hsm (pip extras), and the one-line error of a command that needs a missing one.

The core install (python-pkcs11, cryptography) runs every command's --help, the links, the gateway and the
key ceremonies on a token. The DICOM commands need the ``dicom`` extra, IC cards the ``card`` extra; their
modules are imported only when such a command runs, through :func:`import_for`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from ..errors import ErrorCode, IsclError


@dataclass(frozen=True)
class Extra:
    """One pip extra: its name, what a command that lacks it says, and the top-level modules it installs."""

    name: str
    needs: str
    modules: tuple[str, ...]
    note: str = ""

    def installed(self) -> bool:
        """True when every module of the extra can be imported (without importing it)."""
        return all(importlib.util.find_spec(module) is not None for module in self.modules)

    @property
    def advice(self) -> str:
        return f"{self.needs}: pip install 'iscl-hsm[{self.name}]'{self.note}"


DICOM = Extra("dicom", "needs the DICOM packages (pydicom, pynetdicom)", ("pydicom", "pynetdicom"))
CARD = Extra("card", "IC cards need pyscard", ("smartcard",), " (it builds with swig and libpcsclite-dev)")


class MissingExtraError(IsclError):
    """A command needs an extra that is not installed. Its text is the advice alone, without an ISCL code:
    ``iscl`` prints it after the command's name, e.g. ``iscl store: needs the DICOM packages ...``."""

    def __init__(self, extra: Extra) -> None:
        super().__init__(ErrorCode.BAD_OPTION, extra.advice)
        self.extra = extra

    def __str__(self) -> str:
        return self.extra.advice


def import_for(module: str, extra: Extra) -> ModuleType:
    """Import ``module``, which needs ``extra``; :class:`MissingExtraError` if one of the extra's own
    modules is missing. Any other ImportError (ours, or a name an installed package lacks) goes up
    unchanged: it is a fault to fix, not advice to give."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in extra.modules:
            raise
        raise MissingExtraError(extra) from None
