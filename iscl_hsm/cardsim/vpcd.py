"""Plug the applet into vsmartcard's virtual reader (vpcd, a pcscd driver) as its card.

vpcd listens on TCP (port 35963 for "Virtual PCD 00 00", 35964 for "Virtual PCD 00 01"); the card
connects to it. Each message, both ways, is a 2-byte big-endian length and a payload. A one-byte
message from the reader is control: 0 power off, 1 power on, 2 reset, 4 "send your ATR" (answered
as a normal message). A longer one is a command APDU, answered with data + SW1 SW2.

vpcd sends the length and the payload in two writes, which meets the card's delayed ACK (about
40 ms per APDU); TCP_QUICKACK, set again before every recv because Linux clears it, avoids that.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Final

from ..errors import ErrorCode, KeyHolderError
from ..keyholder import apdu
from .applet import IsclApplet

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 35963
POWER_OFF, POWER_ON, RESET, GET_ATR = 0, 1, 2, 4


class VpcdCard:
    """One virtual card inserted into one vpcd reader for as long as :meth:`run` runs."""

    def __init__(self, applet: IsclApplet, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.applet = applet
        self.address = (host, port)
        self._sock: socket.socket | None = None

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to vpcd, retrying while pcscd starts; the reader then reports a card present."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection(self.address, timeout=timeout)
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise KeyHolderError(
                        f"cannot reach the virtual reader at {self.address[0]}:{self.address[1]}"
                        f" ({exc.strerror or exc}); start pcscd with vsmartcard-vpcd installed"
                        " (mkdir -p /run/pcscd; pcscd -f) and check the port",
                        ErrorCode.CONNECTION_LOST,
                    ) from None
                time.sleep(0.05)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock

    def run(self) -> None:
        """Answer the reader until it closes the connection (pcscd stopped)."""
        while (message := self._receive()) is not None:
            if len(message) == 1:
                self._control(message[0])
            else:
                response = self.applet.process(message)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s -> %s", apdu.describe(message), response[-2:].hex().upper())
                self._send(response)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _control(self, code: int) -> None:
        if code == GET_ATR:
            self._send(self.applet.state.atr)
        elif code in (POWER_OFF, POWER_ON, RESET):
            self.applet.power_off()
        else:
            log.warning("unknown vpcd control byte %d ignored", code)

    def _receive(self) -> bytes | None:
        header = self._read(2)
        if header is None:
            return None
        return self._read(int.from_bytes(header, "big"))

    def _read(self, count: int) -> bytes | None:
        assert self._sock is not None
        data = b""
        while len(data) < count:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            chunk = self._sock.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _send(self, payload: bytes) -> None:
        assert self._sock is not None
        self._sock.sendall(len(payload).to_bytes(2, "big") + payload)
