"""iscl_hsm must import where POSIX does not exist (Windows), and lock files there too.

A Windows machine cannot be had in CI; a child process stands in for one: it hides the POSIX-only
modules (sys.modules[name] = None makes their import fail as on Windows) and the signals and os
functions Windows lacks, then imports every module of the package. Only import time is checked here:
what runs later is the README's "What runs where".
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import IO, Any

import pytest

import iscl_hsm
from iscl_hsm import locking

PACKAGE = Path(iscl_hsm.__file__).parent
POSIX_ONLY_MODULES = ("fcntl", "termios", "pwd", "grp", "resource", "posix")
POSIX_ONLY_SIGNALS = ("SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGALRM", "SIGCHLD", "SIGPIPE",
                      "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGWINCH")  # fmt: skip
POSIX_ONLY_OS = ("fork", "getuid", "geteuid", "getgid", "getegid", "setsid", "killpg", "getpgid", "O_DIRECTORY",
                 "O_NOFOLLOW", "sched_getaffinity", "mkfifo", "getloadavg")  # fmt: skip

IMPORT_ALL = """
import importlib, os, signal, sys
for name in {modules!r}:
    sys.modules[name] = None
for owner, names in ((signal, {signals!r}), (os, {os_names!r})):
    for name in names:
        if hasattr(owner, name):
            delattr(owner, name)
failures = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failures.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
print("\\n".join(failures))
"""


def package_modules() -> list[str]:
    """Every module of iscl_hsm by name, found on disk (importing a package to list it would hide its
    failure); __main__ runs the command line, so it is left out."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def import_without_posix(modules: list[str], *, path: Path | None = None) -> str:
    """The import failures, one line each, of ``modules`` in a child process without POSIX (``path``:
    a folder to import from too)."""
    code = IMPORT_ALL.format(modules=POSIX_ONLY_MODULES, signals=POSIX_ONLY_SIGNALS, os_names=POSIX_ONLY_OS)
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    child = subprocess.run([sys.executable, "-c", code, *modules], check=False, capture_output=True, text=True,
                           timeout=120, env=env)  # fmt: skip
    assert child.returncode == 0, child.stderr
    return child.stdout.strip()


def test_every_module_imports_without_posix() -> None:
    modules = package_modules()
    assert {"iscl_hsm.cli.main", "iscl_hsm.keys.audit", "iscl_hsm.keyholder.provision"} <= set(modules)
    assert import_without_posix(modules) == ""


def test_the_check_sees_posix_at_import_time(tmp_path: Path) -> None:
    """The stand-in for Windows is strict enough: a module-level fcntl import or SIGHUP fails in it."""
    (tmp_path / "needs_fcntl.py").write_text("import fcntl\n")
    (tmp_path / "needs_sighup.py").write_text("import signal\nRELOAD = signal.SIGHUP\n")
    assert import_without_posix(["needs_fcntl", "needs_sighup"], path=tmp_path).splitlines() == [
        "needs_fcntl: ModuleNotFoundError: import of fcntl halted; None in sys.modules",
        "needs_sighup: AttributeError: module 'signal' has no attribute 'SIGHUP'",
    ]


def test_the_lock_excludes_another_open_file(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with open(path, "a") as held:
        locking.lock_exclusive(held)
        with open(path, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(path, "a") as other:  # closing the file released it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


class FakeMsvcrt(types.ModuleType):
    """msvcrt.locking as Windows answers it: EDEADLOCK after ten tries while another process holds the
    range. Records the file position of each call: the locked byte."""

    LK_LOCK = 1

    def __init__(self, handle: IO[Any], busy_answers: int, failure: int = errno.EDEADLOCK) -> None:
        super().__init__("msvcrt")
        self.handle, self.busy_answers, self.failure = handle, busy_answers, failure
        self.calls: list[tuple[int, int]] = []

    def locking(self, fd: int, mode: int, length: int) -> None:
        assert mode == self.LK_LOCK and length == 1
        self.calls.append((fd, self.handle.tell()))
        if len(self.calls) <= self.busy_answers:
            raise OSError(self.failure, "busy")


def as_windows(monkeypatch: pytest.MonkeyPatch, fake: FakeMsvcrt) -> None:
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)


@pytest.mark.parametrize("busy_answers", [0, 2])
def test_windows_lock_waits_past_lk_lock_giving_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busy_answers: int) -> None:
    with open(tmp_path / "audit.log", "a+b") as handle:
        handle.write(b"entry\n")
        fake = FakeMsvcrt(handle, busy_answers)
        as_windows(monkeypatch, fake)
        locking.lock_exclusive(handle)
        assert fake.calls == [(handle.fileno(), locking._WINDOWS_LOCK_OFFSET)] * (busy_answers + 1)
        assert handle.tell() == 6  # where it was: the caller's reads and writes are not moved


def test_windows_lock_reports_other_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "lock", "a") as handle:
        fake = FakeMsvcrt(handle, busy_answers=1, failure=errno.EBADF)
        as_windows(monkeypatch, fake)
        with pytest.raises(OSError) as raised:
            locking.lock_exclusive(handle)
    assert raised.value.errno == errno.EBADF and len(fake.calls) == 1
