"""pynetdicom over ISCL: associations requested over an ISCL link, and an SCP that accepts ISCL links.

pynetdicom talks to an :class:`~iscl_hsm.dicom.bridge.IsclBridge`'s plain socket, so its own
``select()`` loop, timeouts and state machine work unchanged. The hooks are the two places where
pynetdicom makes its sockets: ``AE._create_socket`` (requestor) and the server's request handler
(acceptor).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.transport import (
    T_CONNECT,
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from .. import wire
from ..engine import Config, Role, check_key_holder
from ..errors import ErrorCode, IsclError
from ..keyholder.base import KeyHolder
from ..transport.common import DEFAULT_TIMEOUTS, Timeouts
from .bridge import IsclBridge

LOGGER = logging.getLogger(__name__)

MAXIMUM_PDU_SIZE = 1024 * 1024
"""The largest P-DATA PDU our AEs accept (``ae.maximum_pdu_size``), announced to the peer at
association. pynetdicom's default of 16 KiB costs Python work per PDU that an ISCL link, already
carrying 1 MiB messages, does not need: with 1 MiB, `iscl store` to `iscl serve` of 8 MiB images ran
1.3x faster (with the bridge's 1 MiB messages). Set it on your own AEs too."""

LinkErrorHandler = Callable[[str, BaseException], None]
"""``on_link_error(peer, error)``: an ISCL link failed, in its handshake or later."""

_BRIDGES: weakref.WeakKeyDictionary[Association, IsclBridge] = weakref.WeakKeyDictionary()
_pending = threading.local()  # the link settings of the associate() running in this thread


@dataclass(frozen=True)
class LinkSettings:
    """What one end of an ISCL link needs besides the socket."""

    key_holder: KeyHolder = field(repr=False)
    config: Config | None = None
    timeouts: Timeouts = DEFAULT_TIMEOUTS


class AssociationRefusedError(IsclError):
    """The ISCL link was up but the peer rejected or aborted the DICOM association request."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(ErrorCode.CONNECTION_LOST, f"the DICOM peer at {peer} {reason}")


def link_of(assoc: Association) -> IsclBridge | None:
    """The ISCL link under ``assoc`` (its ``parameters`` and, after a failure, its ``error``)."""
    return _BRIDGES.get(assoc)


def associate(
    ae: ApplicationEntity,
    host: str,
    port: int = wire.DEFAULT_PORT,
    *,
    key_holder: KeyHolder,
    config: Config | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    **kwargs: Any,
) -> Association:
    """Request an association with ``ae`` over an ISCL link; ``kwargs`` go to ``ae.associate``.

    Returns the established association. Raises :class:`~iscl_hsm.errors.IsclError` if the TCP
    connection or the ISCL handshake fails (``timeouts`` bound the link's waits), and
    :class:`AssociationRefusedError` if the peer rejects or aborts the request. If the link fails
    later, the association is aborted and ``link_of(assoc).error`` says why.
    """
    _install(ae)
    _pending.settings = LinkSettings(key_holder, config, timeouts)
    try:
        assoc = ae.associate(host, port, **kwargs)
    finally:
        del _pending.settings
    peer = f"{host}:{port}"
    socket_ = assoc.dul.socket
    if isinstance(socket_, _IsclAssociationSocket) and socket_.failure is not None:
        raise socket_.failure
    if assoc.is_established:
        return assoc
    bridge = link_of(assoc)
    if bridge is not None and bridge.error is not None:
        raise bridge.error
    if assoc.is_rejected:
        raise AssociationRefusedError(peer, "rejected the association (check the AE titles and the SOP classes it accepts)")
    raise AssociationRefusedError(peer, "aborted the association request")


def _install(ae: ApplicationEntity) -> None:
    """Make ``ae`` build ISCL sockets inside :func:`associate` calls (once; plain ones otherwise)."""
    if getattr(ae, "_iscl_installed", False):
        return
    plain = ae._create_socket

    def create_socket(assoc: Association, address: AddressInformation, tls_args: Any) -> AssociationSocket:
        settings: LinkSettings | None = getattr(_pending, "settings", None)
        if settings is None:
            return plain(assoc, address, tls_args)
        if tls_args is not None:
            raise ValueError("tls_args cannot be combined with an ISCL link")
        return _IsclAssociationSocket(assoc, address, settings)

    ae._create_socket = create_socket  # type: ignore[method-assign]
    ae._iscl_installed = True  # type: ignore[attr-defined]


class _IsclAssociationSocket(AssociationSocket):
    """The requestor's socket: TCP connect as pynetdicom would, then the ISCL handshake, then the bridge."""

    def __init__(self, assoc: Association, address: AddressInformation, settings: LinkSettings) -> None:
        super().__init__(assoc, address=address)
        self._settings = settings
        self.failure: IsclError | None = None

    def connect(self, primitive: T_CONNECT) -> None:
        sock = self.socket
        assert sock is not None
        remote = primitive.address_info
        peer = f"{remote.address}:{remote.port}"
        try:
            bridge = self._open_link(sock, remote.as_tuple, peer)
        except IsclError as exc:
            LOGGER.info("ISCL link to %s failed: %s", peer, exc)
            self.failure = exc
            sock.close()
            self.socket = None
            primitive.result = "Evt17"
            self.provider_queue.put(primitive)
            self._ready.set()
            return
        _BRIDGES[self.assoc] = bridge
        self.socket = bridge.app_socket
        self._is_connected = True
        self.assoc.requestor.address_info = AddressInformation.from_tuple(bridge.local_address)
        evt.trigger(self.assoc, evt.EVT_CONN_OPEN, {"address": remote.as_tuple})
        primitive.result = "Evt2"
        self.provider_queue.put(primitive)
        self._ready.set()


    def _open_link(self, sock: socket.socket, address: tuple[Any, ...], peer: str) -> IsclBridge:
        """TCP connect as pynetdicom would (its connection timeout), then the ISCL handshake."""
        try:
            sock.settimeout(self.assoc.connection_timeout)
            sock.connect(address)
            sock.settimeout(None)
        except OSError as exc:
            raise IsclError(
                ErrorCode.CONNECTION_LOST,
                f"cannot connect to {peer}: {exc.strerror or exc}; is an ISCL endpoint listening there?",
            ) from None
        settings = self._settings
        try:
            return IsclBridge(
                sock, Role.CLIENT, key_holder=settings.key_holder, config=settings.config,
                timeouts=settings.timeouts, peer=peer,
            )  # fmt: skip
        except OSError as exc:
            raise IsclError(
                ErrorCode.CONNECTION_LOST, f"the connection to {peer} failed during the ISCL handshake: {exc}"
            ) from None


class _IsclRequestHandler(RequestHandler):
    """The acceptor's handler: ISCL handshake on the accepted socket, then pynetdicom on the bridge."""

    def __init__(
        self, request: socket.socket, client_address: Any, server: ThreadedAssociationServer,
        settings: LinkSettings, on_link_error: LinkErrorHandler,
    ) -> None:  # fmt: skip
        self._settings = settings
        self._on_link_error = on_link_error
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        settings = self._settings
        sock = self.request
        assert isinstance(sock, socket.socket)
        peer = self.remote.as_tuple
        peer_text = f"{peer[0]}:{peer[1]}"
        try:
            bridge = IsclBridge(
                sock, Role.SERVER, key_holder=settings.key_holder, config=settings.config,
                timeouts=settings.timeouts, peer=peer_text,
                on_failure=lambda error: self._on_link_error(peer_text, error),
            )  # fmt: skip
        except (IsclError, OSError) as exc:
            sock.close()
            self._on_link_error(peer_text, exc)
            return
        self.request = bridge.app_socket
        server = self.server
        assert isinstance(server, IsclAssociationServer)
        with server.admitting() as admitted:
            if not admitted:  # the link ends with its application side: the peer sees the line closed
                bridge.app_socket.close()
                return
            assoc = self._create_association()
            _BRIDGES[assoc] = bridge
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()


class IsclAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, except that no association starts once :meth:`shutdown` has begun.

    A link whose handshake completes after that is closed instead: its association's DUL thread is
    not a daemon, and would keep the process alive until the ACSE timeout waiting for a request. So
    after ``shutdown()``, :attr:`active_associations` is every association there will be.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admission = threading.Lock()
        self._stopping = False

    @contextlib.contextmanager
    def admitting(self) -> Iterator[bool]:
        """Whether a new association may start; it is started inside this block (shutdown waits)."""
        with self._admission:
            yield not self._stopping

    def shutdown(self) -> None:
        """Stop serving (see pynetdicom); a second call does nothing."""
        with self._admission:
            if self._stopping:
                return
            self._stopping = True
        super().shutdown()


def _log_link_error(peer: str, error: BaseException) -> None:
    LOGGER.warning("ISCL link from %s failed: %s", peer, error)


def start_scp(
    ae: ApplicationEntity,
    address: tuple[str, int],
    *,
    key_holder: KeyHolder,
    config: Config | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    evt_handlers: list[Any] | None = None,
    ae_title: str | None = None,
    contexts: list[Any] | None = None,
    on_link_error: LinkErrorHandler = _log_link_error,
) -> IsclAssociationServer:
    """Start ``ae`` as an SCP that accepts associations over ISCL links only, in a background thread.

    Like ``ae.start_server(address, block=False, ...)``: stop it with ``server.shutdown()`` or
    ``ae.shutdown()``; ``server.server_address`` has the bound port. ``timeouts`` bound each ISCL
    link's waits; a link that fails (wrong keys, a client that does not speak ISCL, a bad MAC later)
    goes to ``on_link_error(peer, error)`` (default: logged) and never reaches pynetdicom. A key
    holder that can never serve ``config`` raises KeyHolderError here, before anything listens.
    """
    check_key_holder(config or Config(), key_holder)
    settings = LinkSettings(key_holder, config, timeouts)

    def request_handler(request: socket.socket, client_address: Any, server: Any) -> _IsclRequestHandler:
        return _IsclRequestHandler(request, client_address, server, settings, on_link_error)

    server = ae.make_server(
        address, ae_title=ae_title, contexts=contexts, evt_handlers=evt_handlers,
        server_class=IsclAssociationServer, request_handler=request_handler,
    )  # fmt: skip
    assert isinstance(server, IsclAssociationServer)
    thread = threading.Thread(target=server.serve_forever, name=f"iscl-scp {address[0]}:{address[1]}", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server


__all__ = ["AssociationRefusedError", "IsclAssociationServer", "LinkSettings", "associate", "link_of", "start_scp"]
