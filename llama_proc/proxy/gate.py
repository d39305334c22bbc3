"""Serving the app behind a connection gate: :func:`run_proxy` and the per-connection protocol.

The gate holds client connections to ``max_connections`` (closing the oldest idle one, else
refusing with a 503) and answers requests that fail in aiohttp's HTTP parser in OpenAI's
shape; :func:`run_proxy` serves until a signal and drains in-flight requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

from aiohttp import http_exceptions, web

from llama_proc.proxy.app import PROXY_KEY
from llama_proc.proxy.options import ProxyOptions
from llama_proc.proxy.relay import error_response
from llama_proc.proxy.serve_flags import DEFAULT_DRAIN_TIMEOUT

if TYPE_CHECKING:
    from collections.abc import Callable

    from llama_proc.proxy.state import ProxyState

__all__ = [
    "run_proxy",
]

logger = logging.getLogger(__name__)

MAX_HEADER_LINE: Final = 8190
"""Longest request line or header field, in bytes."""
MAX_HEADERS: Final = 64
"""Most header fields in one request."""
LINGER_TIME: Final = 1.0
"""Seconds an unread body is drained after an early answer (401, 413) before closing."""


async def run_proxy(
    app: web.Application,
    *,
    host: str,
    port: int,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ready: Callable[[str, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM (or ``stop`` is set), then shut down gracefully.

    Shutdown stops accepting connections, gives in-flight requests ``drain_timeout`` seconds
    to finish, then stops every server in the pool.

    Args:
        app: from :func:`create_app`.
        host: address to bind.
        port: port to bind (0 = any free port).
        drain_timeout: seconds in-flight requests get to finish.
        ready: called with the bound (host, port) once listening.
        stop: an event that also triggers shutdown (for embedding and tests).
    """
    # handler_cancellation: a client that disconnects cancels its handler, which closes the
    # upstream connection and so stops llama-server's generation for it.
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=drain_timeout, access_log=None
    )
    await runner.setup()
    proxy = app.get(PROXY_KEY)
    gate = _ConnectionGate(runner, proxy.options if proxy else ProxyOptions(), proxy)
    stop_event = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop_event.set)
            installed.append(sig)
    try:
        site = _GatedSite(runner, host, port, gate=gate)
        await site.start()
        bound = _bound_address(runner, host, port)
        if ready is not None:
            ready(*bound)
        await stop_event.wait()
        logger.info("shutting down: draining requests for up to %gs", drain_timeout)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


_PARSE_ERRORS: Final[dict[type[Exception], tuple[str, str]]] = {
    http_exceptions.LineTooLong: (
        "headers_too_large",
        (
            f"A request line or header is longer than {MAX_HEADER_LINE} bytes, or there are "
            f"more than {MAX_HEADERS} headers."
        ),
    ),
    http_exceptions.BadHttpMethod: ("bad_request", "The request does not start like HTTP."),
    http_exceptions.InvalidHeader: ("bad_request", "A request header is malformed."),
}


class _ClientConnection(web.RequestHandler):
    """aiohttp's per-connection protocol, with its own error pages made OpenAI-shaped.

    Requests that fail in the HTTP parser (bad request line, oversized or malformed headers)
    never reach the app or its middleware; aiohttp answers them here. Nothing the client sent
    is logged or echoed: a malformed header may hold a key.
    """

    def __init__(self, gate: _ConnectionGate, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.evicted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.evicted:
            # Evicted between its creation and now (a burst of accepts makes every protocol
            # before any of them is connected): aiohttp's force_close had no transport then.
            self.force_close()

    def evict(self) -> None:
        """Close this idle connection to make room, now or as soon as it is connected."""
        self.evicted = True
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.gate.forget(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            msg = "response already started; cannot send an error after it"
            raise ConnectionError(msg)
        code, text = "internal_error", "Internal error in the llama-proc proxy; see its log."
        kind = "server_error"
        if status == HTTPStatus.INTERNAL_SERVER_ERROR:
            logger.error("internal error in the proxy's HTTP layer: %s", type(exc).__name__)
        elif status == HTTPStatus.GATEWAY_TIMEOUT:
            code, text = "timeout", "The request timed out in the llama-proc proxy."
        else:
            kind = "invalid_request_error"
            code, text = next(
                (v for t, v in _PARSE_ERRORS.items() if isinstance(exc, t)),
                ("bad_request", "The request is not valid HTTP."),
            )
            logger.debug("refused a malformed request (%s, HTTP %d)", type(exc).__name__, status)
        response = error_response(status, text, code=code, kind=kind)
        response.force_close()
        return response


_REFUSAL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class _Refusal(asyncio.Protocol):
    """A connection over the limit with no idle one to close: one 503 answer, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": "The llama-proc proxy has too many open connections; retry.",
                    "type": "server_error",
                    "param": None,
                    "code": "too_many_connections",
                }
            }
        ).encode()
        assert isinstance(transport, asyncio.WriteTransport)  # noqa: S101 - a TCP transport
        transport.write(_REFUSAL % (len(body), body))
        transport.close()


class _ConnectionGate:
    """Makes the protocol for every accepted connection, holding them to ``max_connections``.

    At the limit, the oldest connection with no request in the handler (idle keep-alive, or
    still sending its headers) is closed to make room, so idle or slow clients can never
    lock others out; when every connection is busy, the new one is refused with a 503.
    """

    def __init__(
        self, runner: web.AppRunner, options: ProxyOptions, proxy: ProxyState | None
    ) -> None:
        self.runner = runner
        self.limit = max(1, options.max_connections)
        self.busy: dict[object, int] = proxy.busy if proxy is not None else {}
        self.open: dict[_ClientConnection, None] = {}
        self.closed_idle = 0
        self.refused = 0
        self.kwargs: dict[str, Any] = {
            "keepalive_timeout": options.idle_timeout,
            "max_line_size": MAX_HEADER_LINE,
            "max_field_size": MAX_HEADER_LINE,
            "max_headers": MAX_HEADERS,
            "lingering_time": LINGER_TIME,
            "access_log": None,
        }

    def __call__(self) -> asyncio.BaseProtocol:
        server = self.runner.server
        assert server is not None  # noqa: S101 - the runner is set up before the site starts
        if len(self.open) >= self.limit and not self._close_idle():
            self.refused += 1
            return _Refusal()
        connection = _ClientConnection(self, server, loop=asyncio.get_running_loop(), **self.kwargs)
        self.open[connection] = None
        return connection

    def _close_idle(self) -> bool:
        for connection in self.open:
            if connection not in self.busy:
                self.forget(connection)
                connection.evict()
                self.closed_idle += 1
                return True
        return False

    def forget(self, connection: _ClientConnection) -> None:
        self.open.pop(connection, None)


class _GatedSite(web.TCPSite):
    """A TCP site whose connections are made (and counted) by a :class:`_ConnectionGate`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, gate: _ConnectionGate):
        super().__init__(runner, host, port)
        self._gate = gate

    async def start(self) -> None:
        self._runner._reg_site(self)  # what BaseSite.start does
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._gate, self._host, self._port)
        self._bound_port = self._server.sockets[0].getsockname()[1]


def _bound_address(runner: web.AppRunner, host: str, port: int) -> tuple[str, int]:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return str(address[0]), int(address[1])
    return host, port
