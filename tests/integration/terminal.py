"""Run a command on a pseudo-terminal, as a custodian at a console would, and keep what it showed."""

from __future__ import annotations

import os
import pty
import select
import time


def at_terminal(argv: list[str], env: dict[str, str], dialogue: list[tuple[str, str]]) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal; for each (prompt, answer) wait for the prompt, then type the
    answer and Enter ("\\x03", Ctrl-C, interrupts). Returns the exit status and everything shown
    (escape sequences included, line ends as "\\n")."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal, as at a real console
        os.execvpe(argv[0], argv, env)
    transcript, pending = b"", b""  # everything shown; what was shown since the last answer

    def read_until(text: str | None) -> None:
        nonlocal transcript, pending
        deadline = time.monotonic() + 60
        while text is None or text.encode() not in pending:
            assert time.monotonic() < deadline, f"no {text!r} on the terminal:\n{transcript!r}"
            if not select.select([fd], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(fd, 4096).replace(b"\r\n", b"\n")
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                assert text is None, f"the command ended before {text!r}:\n{transcript!r}"
                return
            transcript, pending = transcript + chunk, pending + chunk

    for prompt, answer in dialogue:
        read_until(prompt)
        pending = b""
        os.write(fd, answer.encode() + b"\r")
    read_until(None)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), transcript.decode(errors="replace")
