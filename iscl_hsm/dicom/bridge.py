"""An authenticated ISCL link joined to one end of a socket pair, for code that wants a plain socket.

pynetdicom polls its socket with ``select()`` and so cannot see bytes a wrapper has already verified
and buffered. The bridge keeps the ISCL link on the real TCP socket in its own thread (an asyncio
loop) and copies verified messages into a :func:`socket.socketpair`; the application gets the other
end, whose readiness ``select()`` reports truthfully.

Failure rule: when the link fails (bad MAC, peer abort, lost connection), the bridge closes the
application's socket at once and writes nothing more to it, so the application sees the connection
drop and never receives a byte that arrived after the failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Callable

from ..engine import Config, LinkParameters, Role
from ..keyholder.base import KeyHolder
from ..transport import aio
from ..transport.common import DEFAULT_TIMEOUTS, Timeouts
from ..transport.relay import DEFAULT_CHUNK, Address, Link, LinkRecord

LOGGER = logging.getLogger(__name__)


class IsclBridge:
    """One ISCL link on a connected TCP socket, relayed to :attr:`app_socket`.

    The constructor runs the handshake and returns once the link is up; it raises
    :class:`~iscl_hsm.errors.IsclError` (and closes ``sock``) if authentication fails or takes longer
    than ``timeouts.handshake`` seconds. Afterwards :attr:`error` holds the failure that ended the link, if any,
    and ``on_failure(error)`` is called with it (in the bridge's thread).
    """

    def __init__(
        self,
        sock: socket.socket,
        role: Role,
        *,
        key_holder: KeyHolder,
        config: Config | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        peer: str | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        remote = Address.of(sock.getpeername())
        self.peer = peer or str(remote)
        self._on_failure = on_failure
        self.local_address: tuple[str, int] = sock.getsockname()[:2]
        self._record = LinkRecord(remote, Address.of(self.local_address))
        self.parameters: LinkParameters | None = None
        self.error: BaseException | None = None
        self.app_socket, self._inner = socket.socketpair()
        self._ready: concurrent.futures.Future[LinkParameters] = concurrent.futures.Future()
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._run(sock, role, key_holder, config or Config(), timeouts),),
            name=f"iscl-bridge {self.peer}",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        try:
            self.parameters = self._ready.result()
        except BaseException:
            self.app_socket.close()
            self._thread.join()
            raise

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the link has ended (either way); True if it has."""
        return self._done.wait(timeout)

    # --- the bridge thread ----------------------------------------------------------------------

    async def _run(
        self, sock: socket.socket, role: Role, key_holder: KeyHolder, config: Config, timeouts: Timeouts
    ) -> None:
        try:
            stream = await aio.handshake_on(
                sock, role, key_holder=key_holder, config=config, timeouts=timeouts
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's thread
            self._inner.close()
            self._done.set()
            self._ready.set_exception(exc)
            return
        assert stream.parameters is not None  # set by a completed handshake
        self._ready.set_result(stream.parameters)
        try:
            reader, writer = await asyncio.open_connection(sock=self._inner, limit=2 * DEFAULT_CHUNK)
            link = Link(self._record, plain="the local socket pair", iscl=self.peer, chunk_size=DEFAULT_CHUNK)
            link.attach_plain(reader, writer)
            link.attach_iscl(stream)
            failure = await link.run()
            if failure is not None:
                self.error = failure
                LOGGER.info("ISCL link with %s failed: %s", self.peer, failure)
                if self._on_failure is not None:
                    self._on_failure(failure)
        finally:
            self._done.set()


__all__ = ["IsclBridge"]
