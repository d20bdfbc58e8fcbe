"""The component form: one sheet per custodian, printed and sealed in an envelope.

It carries what docs/security-officer.md (section 1) asks of a form: site (token), date, key name
and algorithm, component number ("1 of 2"), the component in groups of four hex digits, its KCV, and
blank lines for the custodian's name and signature. Every line but the component starts with ``#``,
so that ``iscl keys import-components --component-file FORM`` at the other site reads the form as
written (``#`` lines are comments there).

Nothing here writes a file or prints: the text is a secret, and the caller decides where it goes.
"""

from __future__ import annotations

import datetime

from .components import Algorithm, format_hex, kcv_of

__all__ = ["component_form", "form_name"]

_BLANK = "_" * 36


def form_name(key: str, number: int, count: int) -> str:
    """The form's file name, e.g. ``iscl-auth-1-component-1-of-2.txt``."""
    return f"{key}-component-{number}-of-{count}.txt"


def component_form(
    *,
    token: str,
    serial: str | None,
    key: str,
    algorithm: Algorithm,
    number: int,
    count: int,
    component: bytes,
    date: datetime.date,
) -> str:
    """The form of component ``number`` of ``count`` of ``key`` on ``token``, made on ``date``."""
    site = f"token '{token}'" + (f", serial {serial}" if serial else "")
    return (
        f"# ISCL key component form: for custodian {number} only; seal it in an envelope.\n"
        "#\n"
        f"# Site:            {site}\n"
        f"# Date:            {date.isoformat()}\n"
        f"# Key:             {key} ({algorithm.name})\n"
        f"# Component:       {number} of {count}\n"
        f"# Component KCV:   {kcv_of(algorithm, component).hex().upper()}\n"
        "#\n"
        f"# The component ({algorithm.hex_digits} hex digits):\n"
        f"{format_hex(component)}\n"
        "#\n"
        f"# Custodian's name:       {_BLANK}\n"
        "#\n"
        f"# Custodian's signature:  {_BLANK}\n"
    )
