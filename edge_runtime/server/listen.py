"""The app under uvicorn, with a deadline on every request head.

uvicorn bounds the size of a request head (``h11_max_incomplete_event_size``) and the idle time
between requests (``timeout_keep_alive``), but not the time a client takes to send a head: one
that sends ``GET / HTTP/1.1\\r\\nHost: x`` and stops holds its connection forever, and a few
hundred of them use up the process's file descriptors (slowloris). So each connection gets a
deadline: from the moment it opens, and again whenever a response has been sent, the client has
``header_timeout_s`` to get a request into the application, or the connection is closed.

Two public seams, no uvicorn internals: uvicorn's ``Config(http=...)`` takes any
``asyncio.Protocol`` class, so ``_DeadlineProtocol`` wraps uvicorn's own (``AutoHTTPProtocol``)
and keeps the timer; an ASGI wrapper around the app learns that a request began or ended, and
finds its connection by the client address, which is the connection's peer address (uvicorn's
proxy-header rewriting is off: this server never runs behind a proxy that sets them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette

Peer = tuple[str, int]
log = logging.getLogger("edgert.server")


class HeaderDeadlines:
    """The open connections by peer address, and what to do when one misses its deadline."""

    def __init__(self, seconds: float, on_expiry: Callable[[], None] = lambda: None) -> None:
        self.seconds = seconds
        self.on_expiry = on_expiry
        self.connections: dict[Peer, _DeadlineProtocol] = {}
        # Set if a request ever arrives from an unknown peer (a uvicorn that names clients some
        # other way): then no deadline closes anything, rather than cutting requests in flight.
        self.disabled = False

    def protocol_class(self) -> type[asyncio.Protocol]:
        """The class to give uvicorn as ``Config(http=...)``."""
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        return type("DeadlineProtocol", (_DeadlineProtocol,), {"deadlines": self, "inner_class": AutoHTTPProtocol})

    def wrap(self, app: Any) -> Any:
        """The ASGI app that tells each connection when a request began and ended."""
        return _RequestTracker(app, self)


class _DeadlineProtocol(asyncio.Protocol):
    """uvicorn's HTTP protocol, with a timer that closes a connection slow to send a request head."""

    deadlines: HeaderDeadlines
    inner_class: type[asyncio.Protocol]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.inner = self.inner_class(*args, **kwargs)
        self.transport: asyncio.BaseTransport | None = None
        self.peer: Peer | None = None
        self.busy = 0  # requests of this connection inside the application
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (tuple, list)) and len(peer) >= 2:  # not a Unix socket
            self.peer = (str(peer[0]), int(peer[1]))
            self.deadlines.connections[self.peer] = self
            self.arm()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.peer is not None and self.deadlines.connections.get(self.peer) is self:
            del self.deadlines.connections[self.peer]
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def __getattr__(self, name: str) -> Any:  # anything else uvicorn asks of its protocol
        if name == "inner":  # not set yet: the inner protocol's constructor failed
            raise AttributeError(name)
        return getattr(self.inner, name)

    def arm(self) -> None:
        self.disarm()
        self.timer = asyncio.get_running_loop().call_later(self.deadlines.seconds, self._expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def request_began(self) -> None:
        self.busy += 1
        self.disarm()

    def request_ended(self) -> None:
        self.busy -= 1
        if self.busy == 0 and self.transport is not None and not self.transport.is_closing():
            self.arm()

    def _expire(self) -> None:
        self.timer = None
        if self.busy or self.deadlines.disabled or self.transport is None or self.transport.is_closing():
            return
        self.deadlines.on_expiry()
        self.transport.close()


class _RequestTracker:
    """ASGI wrapper: a request reached the application (its head is complete), then it ended."""

    def __init__(self, app: Any, deadlines: HeaderDeadlines) -> None:
        self.app = app
        self.deadlines = deadlines

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        client = scope.get("client")
        connection = self.deadlines.connections.get(tuple(client)) if scope["type"] == "http" and client else None
        if connection is None:
            if scope["type"] == "http" and client and not self.deadlines.disabled:
                self.deadlines.disabled = True
                log.warning("cannot match a request from %s to its connection: request-head deadlines are off",
                            client)
            await self.app(scope, receive, send)
            return
        connection.request_began()
        ended = False

        async def send_and_note_the_end(message: MutableMapping[str, Any]) -> None:
            nonlocal ended
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not ended:
                ended = True
                connection.request_ended()

        try:
            await self.app(scope, receive, send_and_note_the_end)
        finally:
            if not ended:
                connection.request_ended()


def uvicorn_server(app: Starlette, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for an app from ``create_app``, with its request-head deadline.

    ``.run()`` serves until interrupted; tests run it in a thread and set ``should_exit``.
    """
    import uvicorn

    state = app.state.edgert
    deadlines = HeaderDeadlines(state.config.header_timeout_s, state.metrics.header_timeouts.inc)
    config = uvicorn.Config(deadlines.wrap(app), host=host, port=port, http=deadlines.protocol_class(),
                            proxy_headers=False, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)
