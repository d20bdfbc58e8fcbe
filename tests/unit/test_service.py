"""sd_notify without libsystemd: what reaches a real AF_UNIX datagram socket, by path and abstract name."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscl_hsm import service


class Manager:
    """A stand-in for systemd: a bound datagram socket, and what $NOTIFY_SOCKET says to reach it."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def received(self) -> list[str]:
        """The next datagram's assignments."""
        return self.sock.recv(4096).decode().split("\n")


@pytest.fixture(params=["path", "abstract"])
def manager(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Manager]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if request.param == "path":
            sock.bind(str(tmp_path / "notify"))
            address = str(tmp_path / "notify")
        else:
            name = f"iscl-test-{secrets.token_hex(8)}"
            sock.bind("\0" + name)
            address = "@" + name
        sock.settimeout(10)  # a safety net against a hang, never an assertion
        monkeypatch.setenv(service.NOTIFY_SOCKET, address)
        yield Manager(sock, address)


def test_ready_carries_the_status(manager: Manager) -> None:
    assert service.ready("listening on 127.0.0.1:2761, links go to 127.0.0.1:104")
    assert manager.received() == ["READY=1", "STATUS=listening on 127.0.0.1:2761, links go to 127.0.0.1:104"]


def test_stopping(manager: Manager) -> None:
    assert service.stopping("stopping; waiting up to 30 s for 2 open link(s)")
    assert manager.received() == ["STOPPING=1", "STATUS=stopping; waiting up to 30 s for 2 open link(s)"]


def test_a_line_break_cannot_end_the_status_early(manager: Manager) -> None:
    service.ready("two\nlines")
    assert manager.received() == ["READY=1", "STATUS=two lines"]


def test_a_reload_is_reported_and_then_ready_again(manager: Manager) -> None:
    with service.reloading("listening again"):
        reloading = manager.received()  # before the reload's work, not after it
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=") and int(reloading[1].split("=")[1]) > 0
    assert manager.received() == ["READY=1", "STATUS=listening again"]


def test_a_failed_reload_still_ends_ready(manager: Manager) -> None:
    with pytest.raises(ValueError), service.reloading("the old settings serve on"):
        manager.received()
        raise ValueError("the new config file is bad")
    assert manager.received() == ["READY=1", "STATUS=the old settings serve on"]


def test_without_a_manager_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(service.NOTIFY_SOCKET, raising=False)
    assert not service.ready("up")
    assert not service.stopping("down")


def test_an_unreachable_manager_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone"
    monkeypatch.setenv(service.NOTIFY_SOCKET, str(missing))
    with caplog.at_level(logging.WARNING, logger=service.__name__):
        assert not service.ready("up")
    assert f"cannot notify the service manager at {missing}" in caplog.text
    assert not os.path.exists(missing)
