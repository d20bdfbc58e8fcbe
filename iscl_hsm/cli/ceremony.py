"""The custodians' side of a component ceremony: prompts, the screen, component files and forms.

Used by `iscl keys` (generate-components, import-components, rotate) and `iscl card load-key`.
A component is secret, so:

* it is shown only on the terminal's *alternate screen*, which is wiped, with the scrollback, before
  the terminal switches back and before the next custodian: nothing of it stays in the terminal's
  history (a terminal emulator's scrollback, ``tmux capture-pane``);
* typed components are read without echo, and the normal screen and its scrollback are wiped between
  custodians too (in case one typed a component at the wrong prompt, where it was echoed);
* in files (``--component-file``, ``--form-dir``) it is written to new files only, mode 0600;
* a custodian's mistake is said (without the component) and asked again, up to ATTEMPTS times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import getpass
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Final

from ..errors import ErrorCode, KeyHolderError
from ..keys.components import Algorithm, ComponentError, combine, format_hex, kcv_of, parse_component
from ..keys.forms import component_form, form_name
from ..keys.store import KeyStore

WIPE: Final = "\x1b[H\x1b[2J\x1b[3J"
"""Cursor home, erase the screen, erase the scrollback (xterm's ED 3, which tmux and VTE honour)."""
ALTERNATE_SCREEN: Final = "\x1b[?1049h"
NORMAL_SCREEN: Final = "\x1b[?1049l"
ATTEMPTS: Final = 3
"""How many times a custodian at the terminal may enter a component before the ceremony stops."""


class Console:
    """Prompts and screens: a terminal, or (scripted) a file descriptor, never echoing secrets."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.assume_yes = bool(getattr(args, "yes", False))
        fd = getattr(args, "input_fd", None)
        self.stream: IO[str] | None = None
        if fd is not None:
            try:
                self.stream = os.fdopen(fd, "r", closefd=False)
            except OSError as exc:
                raise KeyHolderError(
                    f"cannot read --input-fd {fd}: {exc.strerror}", ErrorCode.BAD_OPTION
                ) from None
        self.terminal = self.stream is None and sys.stdin.isatty()

    def _line(self, prompt: str, *, secret: bool) -> str:
        ended = KeyHolderError(
            f"the input ended before the answer to {prompt.strip()!r}", ErrorCode.BAD_OPTION
        )
        if self.stream is not None:
            print(prompt, file=sys.stderr, flush=True)
            line = self.stream.readline()
            if not line:
                raise ended
            return line.rstrip("\r\n")
        if not self.terminal:
            raise KeyHolderError(
                f"cannot ask {prompt.strip().rstrip(':')!r}: stdin is not a terminal;"
                " run this at a terminal, or"
                " for automation give the answers with --input-fd, --component-file, the PIN files or --yes",
                ErrorCode.BAD_OPTION,
            )
        try:
            return getpass.getpass(prompt) if secret else input(prompt)
        except EOFError:  # Ctrl-D
            raise ended from None

    def secret(self, prompt: str) -> str:
        return self._line(prompt, secret=True)

    def secret_twice(self, what: str) -> str:
        first = self.secret(f"{what}: ")
        if first != self.secret(f"{what} again: "):
            raise KeyHolderError(
                f"the two entries of the {what} differ; nothing was changed", ErrorCode.NOT_CONFIRMED
            )
        return first

    def confirm(self, question: str) -> bool:
        if self.assume_yes:
            print(f"{question} yes (--yes)", flush=True)
            return True
        return self._line(f"{question} [y/N] ", secret=False).strip().lower() in ("y", "yes")

    def pause(self, prompt: str) -> None:
        self._line(f"{prompt} ", secret=False)

    def clear(self) -> None:
        """Wipe the screen and its scrollback (on a terminal)."""
        _control(WIPE)

    @contextlib.contextmanager
    def private_screen(self) -> Iterator[None]:
        """The alternate screen, wiped on the way in and out (also on Ctrl-C): for a component."""
        _control(ALTERNATE_SCREEN + WIPE)
        try:
            yield
        finally:
            _control(WIPE + NORMAL_SCREEN)


def _control(sequence: str) -> None:
    if sys.stdout.isatty():
        sys.stdout.write(sequence)
        sys.stdout.flush()


def read_text_file(path: Path, what: str) -> str:
    """The text of ``what`` (e.g. "wrapped-key file"), or one sentence saying why it cannot be read."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyHolderError(
            f"cannot read the {what} {path}: {getattr(exc, 'strerror', None) or exc}", ErrorCode.BAD_OPTION
        ) from None


def read_secret_file(path: Path, what: str) -> str:
    """A PIN or component from ``path``: its lines joined by spaces, ``#`` lines and blank lines left out."""
    lines = [line.strip() for line in read_text_file(path, f"{what} file").splitlines()]
    text = " ".join(line for line in lines if line and not line.startswith("#"))
    if not text:
        raise KeyHolderError(f"the {what} file {path} is empty", ErrorCode.BAD_OPTION)
    return text


def refuse_existing(path: Path, what: str) -> None:
    """Fail (before the token is touched, say) when an output file exists: it is never overwritten."""
    if path.exists():
        raise KeyHolderError(f"the {what} {path} exists already; name a new file", ErrorCode.BAD_OPTION)


def write_new_files(contents: dict[Path, str], what: str) -> None:
    """Write each secret file new (O_EXCL, mode 0600): all of them, or none (an existing one is refused).

    Components and forms, wrapped keys and backups."""
    for path in contents:
        refuse_existing(path, what)
    written: list[Path] = []
    for path, text in contents.items():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            written.append(path)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        except OSError as exc:
            for done in written:
                done.unlink(missing_ok=True)
            raise KeyHolderError(
                f"cannot write the {what} {path}: {exc.strerror}; none was kept", ErrorCode.BAD_OPTION
            ) from None


# --------------------------------------------------------------------------------------------------
# Entering components (import-components, rotate --import-components, iscl card load-key)


def collect_components(
    console: Console, files: list[Path], fix: bool, purpose: str, index: int, algorithm: Algorithm, count: int
) -> bytes:
    """The key made of ``count`` components, each from its file or typed twice by its custodian.

    Each custodian confirms their component's KCV. A custodian's mistake is asked again (ATTEMPTS in
    all); a component file has no one to ask, so a bad one stops the ceremony at once.
    """
    values = []
    for number in range(1, count + 1):
        console.clear()
        print(
            f"Custodian {number} of {count}: component {number} of iscl-{purpose}-{index}"
            f" ({algorithm.name}, {algorithm.hex_digits} hex digits)",
            flush=True,
        )
        if files:
            read = functools.partial(read_secret_file, files[number - 1], f"component {number}")
            values.append(_component(console, read, number, algorithm, fix, attempts=1))
        else:
            read = functools.partial(_typed_twice, console, number)
            values.append(_component(console, read, number, algorithm, fix, attempts=ATTEMPTS))
            if number < count:
                console.clear()
                console.pause(f"Press Enter when custodian {number + 1} is ready.")
    console.clear()
    return combine(algorithm, values)


def _typed_twice(console: Console, number: int) -> str:
    text = console.secret(f"component {number} (hidden): ")
    again = console.secret(f"component {number} again: ")
    if "".join(again.split()).upper() != "".join(text.split()).upper():
        raise ComponentError(f"the two entries of component {number} differ", ErrorCode.NOT_CONFIRMED)
    return text


def _component(
    console: Console, read: Callable[[], str], number: int, algorithm: Algorithm, fix: bool, *, attempts: int
) -> bytes:
    """Component ``number`` as ``read`` gives it, checked and its KCV confirmed, within ``attempts`` tries."""
    attempt = 1
    while True:
        try:
            value, note = parse_component(read(), algorithm, number, fix=fix)
            if note:
                print(note, flush=True)
            check = kcv_of(algorithm, value).hex().upper()
            print(f"component {number} KCV: {check}", flush=True)
            if not console.confirm(f"Custodian {number}: does KCV {check} match your component form?"):
                raise ComponentError(
                    f"custodian {number} did not confirm the KCV of component {number}", ErrorCode.NOT_CONFIRMED
                )
            return value
        except ComponentError as exc:
            reason = exc.args[0]  # the sentence, without str()'s error code
            if attempt == attempts:
                last = f" after {attempts} attempts: check the form and start the ceremony again"
                raise ComponentError(
                    f"{reason}; nothing was stored{last if attempts > 1 else ''}", exc.code
                ) from None
            attempt += 1
            print(
                f"{reason}. Custodian {number}, enter component {number} again (attempt {attempt} of {attempts}).",
                flush=True,
            )


# --------------------------------------------------------------------------------------------------
# Handing out components (generate-components, rotate --generate-components)


def show_components(
    console: Console,
    files: list[Path],
    store: KeyStore,
    purpose: str,
    index: int,
    algorithm: Algorithm,
    components: list[bytes],
    *,
    form_dir: Path | None = None,
) -> None:
    """Give each custodian their component: in a file (``files``), on a form (``form_dir``), or on screen."""
    count = len(components)
    name = f"iscl-{purpose}-{index}"
    checks = [kcv_of(algorithm, c).hex().upper() for c in components]
    if files:
        write_new_files(
            {
                path: f"# component {number} of {count} of {name} ({algorithm.name}) for token"
                f" '{store.token_label}'\n# KCV {check}\n{format_hex(component)}\n"
                for number, (path, component, check) in enumerate(zip(files, components, checks), 1)
            },
            "component file",
        )
        for number, (path, check) in enumerate(zip(files, checks), 1):
            print(f"component {number} written to {path}, KCV {check}", flush=True)
        return
    if form_dir is not None:
        _write_forms(form_dir, store, name, algorithm, components, checks)
        return
    if not sys.stdout.isatty():
        raise KeyHolderError(
            "components are shown only on a terminal (stdout is not one); run this at a terminal, write"
            " the custodians' forms with --form-dir, or for automation pass --component-file once per component",
            ErrorCode.BAD_OPTION,
        )
    for number, (component, check) in enumerate(zip(components, checks), 1):
        console.clear()
        console.pause(
            f"Only custodian {number} of {count} may look at the screen now. Press Enter to show"
            f" component {number}."
        )
        with console.private_screen():
            print(
                f"\n  {name} ({algorithm.name}) on token '{store.token_label}'\n"
                f"  component {number} of {count}:  {format_hex(component)}\n"
                f"  component KCV:        {check}\n"
            )
            console.pause(
                f"Custodian {number}: copy the component and its KCV onto your form, then press Enter."
            )
    print(f"{count} components shown for {name} and wiped from the screen", flush=True)


def _write_forms(
    folder: Path, store: KeyStore, name: str, algorithm: Algorithm, components: list[bytes], checks: list[str]
) -> None:
    """One component form per custodian in ``folder`` (see :mod:`iscl_hsm.keys.forms`)."""
    if not folder.is_dir():
        raise KeyHolderError(
            f"--form-dir {folder} is not a directory; create it (mkdir -m 700 {folder}) and run the command again",
            ErrorCode.BAD_OPTION,
        )
    count = len(components)
    today = datetime.datetime.now(datetime.UTC).date()
    paths = [folder / form_name(name, number, count) for number in range(1, count + 1)]
    write_new_files(
        {
            path: component_form(
                token=store.token_label,
                serial=store.serial,
                key=name,
                algorithm=algorithm,
                number=number,
                count=count,
                component=component,
                date=today,
            )
            for number, (path, component) in enumerate(zip(paths, components), 1)
        },
        "component form",
    )
    for number, (path, check) in enumerate(zip(paths, checks), 1):
        print(f"component {number} form written to {path}, KCV {check}", flush=True)
    print(
        f"print each form for its custodian only, then delete the files (shred -u {folder}/{name}-component-*)",
        flush=True,
    )
