"""The OpenAI-compatible proxy: an aiohttp app in front of a :class:`ServerPool`.

Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` (forwarded to
the server for the request's model and flags), ``GET /v1/models``, ``GET /health`` (no key
needed), ``GET /metrics`` (the proxy's own metrics plus every server's), ``GET /servers`` and
``DELETE /servers/{key}`` (management).

Responses are passed through as they arrive: an event stream is written chunk by chunk with no
buffering, and a client that goes away cancels the upstream request (the upstream connection
is closed, which llama-server treats as a cancel).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web
from yarl import URL

from llama_proc.errors import InvalidArgumentError, LlamaProcError
from llama_proc.proxy.flag_policy import FLAGS_HEADER, parse_flags_header
from llama_proc.proxy.metrics import ProxyMetrics, merge_upstream
from llama_proc.proxy.pool import Lease, PoolBusyError, PoolClosedError, ServerPool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from llama_proc.proxy.models_config import ModelsConfig, ModelSpec

__all__ = [
    "DEFAULT_FIRST_BYTE_TIMEOUT",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_STALL_TIMEOUT",
    "ProxyOptions",
    "create_app",
    "run_proxy",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
DEFAULT_FIRST_BYTE_TIMEOUT: Final = 600.0
"""Seconds until llama-server's first response byte; for a non-streamed answer, the whole
generation happens before it, so this is generous."""
DEFAULT_STALL_TIMEOUT: Final = 120.0
"""Seconds a started stream may go without a byte before it is cut off."""
DEFAULT_DRAIN_TIMEOUT: Final = 30.0
UPSTREAM_CONNECT_TIMEOUT: Final = 10.0
UPSTREAM_METRICS_TIMEOUT: Final = 3.0
UPSTREAM_KEEPALIVE: Final = 3.0
UPSTREAM_ATTEMPTS: Final = 2
"""Tries for a request whose upstream connection fails before any response byte."""
RETRY_PAUSE: Final = 0.1
MAX_CACHED_URLS: Final = 1024
MODEL_HEADER: Final = "X-Model-Id"
SERVER_HEADER: Final = "X-Llama-Proc-Server"
RESTARTED_HEADER: Final = "X-Llama-Proc-Restarted"
FORWARDED: Final = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_PUBLIC_PATHS: Final = frozenset({"/health"})
_PASS_HEADERS: Final = ("Content-Type", "Content-Encoding")


@dataclass(frozen=True, kw_only=True)
class ProxyOptions:
    """How the proxy treats requests.

    Attributes:
        api_keys: keys accepted as ``Authorization: Bearer <key>`` or ``X-Api-Key``; empty =
            no authentication.
        max_body_bytes: largest request body accepted (413 above it).
        first_byte_timeout: seconds until llama-server's first response byte (504 after it).
        stall_timeout: seconds a started stream may go silent before it is cut off.
        drain_timeout: seconds in-flight requests get to finish at shutdown.
    """

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT


def _error(
    status: int,
    message: str,
    *,
    code: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _sse_error(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class _Proxy:
    """Request handlers sharing the pool, the upstream session and the metrics."""

    def __init__(self, models: ModelsConfig, pool: ServerPool, options: ProxyOptions) -> None:
        self.models = models
        self.pool = pool
        self.options = options
        self.metrics = ProxyMetrics()
        self.metrics.max_servers.set(value=pool.max_servers)
        self.session: aiohttp.ClientSession | None = None
        self.created = int(time.time())
        self._keys = tuple(k.encode() for k in options.api_keys)
        self._only_model = next(iter(models)).id if len(models) == 1 else None
        self._shutting_down = False
        self._urls: dict[str, URL] = {}
        # ids of requests whose stream went through to its end (a hang-up after that is no
        # client disconnect).
        self._complete: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def startup(self) -> None:
        self.session = aiohttp.ClientSession(
            # llama-server drops idle keep-alive connections after 5 s: retire ours first so a
            # request never goes out on a socket the server is closing.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE),
            timeout=aiohttp.ClientTimeout(total=None, connect=UPSTREAM_CONNECT_TIMEOUT),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        await self.pool.start()

    async def shutdown(self) -> None:
        self._shutting_down = True

    async def cleanup(self) -> None:
        await self.pool.close()
        if self.session is not None:
            await self.session.close()

    # -- middleware ------------------------------------------------------------------------

    def authorized(self, request: web.Request) -> bool:
        if not self._keys:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        offered = token.strip() if scheme.lower() == "bearer" else ""
        offered = offered or request.headers.get("X-Api-Key", "")
        given = offered.encode()
        ok = False
        # Compare against every key so timing tells nothing about which (if any) matched.
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        return ok

    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Authentication, OpenAI-shaped HTTP errors and request metrics for every route."""
        began = time.perf_counter()
        endpoint = request.path if request.path in _ENDPOINTS else "other"
        metrics = self.metrics
        metrics.in_flight.inc()
        try:
            if request.path not in _PUBLIC_PATHS and not self.authorized(request):
                response: web.StreamResponse = _error(
                    401,
                    "Incorrect API key provided: pass it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                )
            else:
                response = await handler(request)
        except web.HTTPException as exc:
            response = self._http_error(exc)
        except asyncio.CancelledError:
            # A client that hangs up right after the last event of a complete stream got its
            # answer; anything else is nginx's 499 "client closed request".
            metrics.requests.inc(endpoint, "200" if id(request) in self._complete else "499")
            raise
        finally:
            metrics.in_flight.inc(amount=-1)
            self._complete.discard(id(request))
        metrics.requests.inc(endpoint, str(response.status))
        metrics.duration.observe(time.perf_counter() - began, endpoint)
        return response

    def _http_error(self, exc: web.HTTPException) -> web.Response:
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            return _error(
                413,
                f"Request body is larger than {self.options.max_body_bytes} bytes "
                "(raise --max-body-bytes).",
                code="request_too_large",
            )
        if isinstance(exc, web.HTTPNotFound):
            return _error(404, f"Unknown route {exc.reason}.", code="not_found")
        if isinstance(exc, web.HTTPMethodNotAllowed):
            return _error(405, f"Method {exc.method} not allowed here.", code="method_not_allowed")
        return _error(exc.status, exc.reason or "HTTP error", code="http_error")

    # -- forwarded endpoints ---------------------------------------------------------------

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Route a request to its model's server and pass the response through."""
        body = await request.read()
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "The request body is not valid JSON.", code="invalid_json")
        if not isinstance(payload, dict):
            return _error(400, "The request body must be a JSON object.", code="invalid_json")
        name = request.headers.get(MODEL_HEADER) or payload.get("model") or self._only_model
        if not name:
            return _error(
                400,
                f"No model given: set 'model' in the body or the {MODEL_HEADER} header.",
                code="model_required",
                param="model",
            )
        spec = self.models.resolve(name) if isinstance(name, str) else None
        if spec is None:
            known = ", ".join(sorted(self.models.models)[:20])
            return _error(
                404,
                f"The model {str(name)[:200]!r} does not exist. Known models: {known}.",
                code="model_not_found",
                param="model",
            )
        flags: tuple[str, ...] = ()
        header = request.headers.get(FLAGS_HEADER)
        if header:
            try:
                flags = parse_flags_header(header)
            except InvalidArgumentError as err:
                return _error(400, str(err), code="invalid_flags", param=FLAGS_HEADER)
        if self._shutting_down:
            return _shutting_down()
        stream = payload.get("stream")
        for attempt in range(1, UPSTREAM_ATTEMPTS + 1):
            try:
                lease = await self.pool.acquire(spec, flags)
            except PoolClosedError:
                return _shutting_down()
            except PoolBusyError as err:
                return _error(
                    503,
                    str(err),
                    code="server_busy",
                    kind="server_error",
                    headers={"Retry-After": "5"},
                )
            except LlamaProcError as err:
                return _error(
                    503,
                    f"llama-server for model {spec.id!r} failed to start: {err}",
                    code="server_start_failed",
                    kind="server_error",
                )
            try:
                response = await self._pass_through(
                    request, lease, spec, body, stream, last=attempt == UPSTREAM_ATTEMPTS
                )
            finally:
                lease.release()
            if response is not None:
                return response
        msg = "unreachable: the last attempt always answers"  # pragma: no cover
        raise AssertionError(msg)  # pragma: no cover

    async def _pass_through(
        self,
        request: web.Request,
        lease: Lease,
        spec: ModelSpec,
        body: bytes,
        stream: object,
        *,
        last: bool,
    ) -> web.StreamResponse | None:
        """Forward one request; None = it failed before any response byte, try again."""
        assert self.session is not None  # noqa: S101 - set in startup
        options = self.options
        loop = asyncio.get_running_loop()
        sent = time.perf_counter()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        accept = request.headers.get("Accept")
        if accept:
            headers["Accept"] = accept
        if lease.api_key:
            headers["Authorization"] = f"Bearer {lease.api_key}"
        if stream is True:
            # llama-server closes the connection after an event stream although it advertises
            # keep-alive; a pooled socket would then fail the next request. Say so up front.
            headers["Connection"] = "close"
        response: web.StreamResponse | None = None
        upstream: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(options.first_byte_timeout) as deadline:
                upstream = await self.session.post(
                    self._upstream_url(lease.url, request.path), data=body, headers=headers
                )
                out_headers = {
                    h: upstream.headers[h] for h in _PASS_HEADERS if h in upstream.headers
                }
                out_headers[SERVER_HEADER] = lease.key
                if lease.restarted:
                    out_headers[RESTARTED_HEADER] = "crash"
                if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                    data = await upstream.read()
                    self.metrics.first_byte.observe(time.perf_counter() - sent, spec.id)
                    return web.Response(body=data, status=upstream.status, headers=out_headers)
                out_headers["Cache-Control"] = "no-cache"
                out_headers["X-Accel-Buffering"] = "no"
                response = web.StreamResponse(status=upstream.status, headers=out_headers)
                await response.prepare(request)
                stall = options.stall_timeout
                content = upstream.content
                first = True
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        self._complete.add(id(request))
                        break
                    if first:
                        first = False
                        self.metrics.first_byte.observe(time.perf_counter() - sent, spec.id)
                    if chunk.endswith(b"[DONE]\n\n"):
                        # The client has its whole answer once this is written, and may hang
                        # up before the upstream's end-of-stream arrives.
                        self._complete.add(id(request))
                    try:
                        await response.write(chunk)
                    except ConnectionError:
                        # The client went away (seen here when handler cancellation is off).
                        self.metrics.disconnects.inc(spec.id)
                        return response
                    deadline.reschedule(loop.time() + stall)
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response  # noqa: TRY300 - the except clauses need `response` in scope
        except TimeoutError:
            kind = "timeout" if response is None else "stall"
            self.metrics.upstream_errors.inc(spec.id, kind)
            limit = options.first_byte_timeout if response is None else options.stall_timeout
            message = (
                f"llama-server for {spec.id!r} sent no response within {limit:g}s"
                if response is None
                else f"llama-server for {spec.id!r} stalled for {limit:g}s mid-stream"
            )
            logger.warning("%s [key %s]", message, lease.key)
            return await self._fail(request, response, 504, message, "upstream_timeout")
        except asyncio.CancelledError:
            if id(request) not in self._complete:
                self.metrics.disconnects.inc(spec.id)
            raise
        except aiohttp.ClientError as err:
            alive = lease.check_alive()
            if not last and upstream is None and isinstance(err, aiohttp.ClientConnectionError):
                # Nothing came back, so nothing reached the client: a completion request has no
                # side effects, and trying once more is safe. This covers a keep-alive socket
                # the server closed just as it was reused, and a server that died between
                # requests (which the pool then restarts). The exit status can lag the death
                # by a moment, so look again before deciding.
                if alive:
                    await asyncio.sleep(RETRY_PAUSE)
                    lease.check_alive()
                self.metrics.upstream_errors.inc(spec.id, "retried")
                logger.info("retrying request for %r after %s", spec.id, err or type(err).__name__)
                return None
            kind = "connection" if alive else "crash"
            self.metrics.upstream_errors.inc(spec.id, kind)
            message = (
                f"llama-server for {spec.id!r} failed during the request: {err or type(err).__name__}"
                if alive
                else f"llama-server for {spec.id!r} crashed during the request; "
                "it restarts on the next one"
            )
            logger.warning("%s [key %s]", message, lease.key)
            return await self._fail(request, response, 502, message, "upstream_error")
        finally:
            if upstream is not None:
                # Closing (not releasing) an unfinished upstream response drops its connection,
                # which is what makes llama-server stop generating for a client that is gone.
                if response is not None or not upstream.content.is_eof():
                    upstream.close()
                else:
                    upstream.release()

    def _upstream_url(self, base: str, path: str) -> URL:
        # Parsing a URL costs more than the rest of the routing; servers and paths are few.
        key = base + path
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) > MAX_CACHED_URLS:
                self._urls.clear()
            url = self._urls[key] = URL(key)
        return url

    async def _fail(
        self,
        request: web.Request,
        response: web.StreamResponse | None,
        status: int,
        message: str,
        code: str,
    ) -> web.StreamResponse:
        if response is None:
            return _error(status, message, code=code, kind="server_error")
        # Headers are gone already: tell the client in-band, as llama-server itself does.
        with contextlib.suppress(ConnectionError):
            await response.write(_sse_error(message, code))
            await response.write_eof()
        return response

    # -- local endpoints -------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        loaded = {info.model for info in self.pool.snapshot() if info.state == "ready"}
        data = [
            {
                "id": spec.id,
                "object": "model",
                "created": self.created,
                "owned_by": "llama-proc",
                "aliases": list(spec.aliases),
                "loaded": spec.id in loaded,
            }
            for spec in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        if self._shutting_down or self.pool.closing:
            return web.json_response({"status": "shutting_down"}, status=503)
        snapshot = self.pool.snapshot()
        ready = sum(1 for s in snapshot if s.state == "ready")
        return web.json_response(
            {"status": "ok", "models": len(self.models), "servers_ready": ready}
        )

    async def list_servers(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "max_servers": self.pool.max_servers,
                "data": [info.to_json() for info in self.pool.snapshot()],
            }
        )

    async def delete_server(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        force = request.query.get("force", "").lower() in ("1", "true", "yes")
        try:
            found = await self.pool.remove(key, force=force)
        except PoolBusyError as err:
            return _error(409, str(err), code="server_busy")
        if not found:
            return _error(404, f"No server with key {key!r} (see GET /servers).", code="not_found")
        return web.json_response({"key": key, "stopped": True})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        metrics = self.metrics
        snapshot = self.pool.snapshot()
        metrics.servers.clear()
        for state in ("queued", "starting", "ready", "stopping"):
            metrics.servers.set(state, value=sum(1 for s in snapshot if s.state == state))
        metrics.server_active.clear()
        for info in snapshot:
            if info.state == "ready":
                metrics.server_active.set(info.key, info.model, value=info.active)
        for event, count in self.pool.stats.items():
            metrics.pool_events.set_total(event, value=count)
        upstream = await self._scrape_servers()
        text = metrics.registry.render() + upstream
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def _scrape_servers(self) -> str:
        assert self.session is not None  # noqa: S101 - set in startup
        session = self.session
        servers = self.pool.ready_servers()

        async def scrape(url: str, key: str | None) -> str | None:
            headers = {"Authorization": f"Bearer {key}"} if key else None
            try:
                async with asyncio.timeout(UPSTREAM_METRICS_TIMEOUT):
                    async with session.get(url + "/metrics", headers=headers) as resp:
                        if resp.status != 200:
                            return None
                        return await resp.text()
            except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
                return None

        texts = await asyncio.gather(*(scrape(url, key) for _, url, key in servers))
        parts = [
            ({"server": info.key, "model": info.model}, text)
            for (info, _, _), text in zip(servers, texts, strict=True)
            if text is not None
        ]
        self.metrics.scrape_errors.set(value=sum(1 for t in texts if t is None))
        return merge_upstream(parts)


def _shutting_down() -> web.Response:
    return _error(
        503, "The llama-proc proxy is shutting down.", code="shutting_down", kind="server_error"
    )


_POOL_KEY: Final = web.AppKey("pool", ServerPool)
_PROXY_KEY: Final = web.AppKey("proxy", _Proxy)
_ENDPOINTS: Final = frozenset({*FORWARDED, "/v1/models", "/health", "/metrics", "/servers"})


def create_app(models: ModelsConfig, pool: ServerPool, options: ProxyOptions) -> web.Application:
    """Build the proxy application.

    The pool is started with the app and closed (every server stopped) when the app is
    cleaned up, so running the app with any aiohttp runner manages the children.

    Args:
        models: the models clients may ask for.
        pool: the server pool (not started yet).
        options: limits, timeouts and API keys.
    """
    proxy = _Proxy(models, pool, options)

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        return await proxy.middleware(request, handler)

    app = web.Application(client_max_size=options.max_body_bytes, middlewares=[middleware])
    app[_POOL_KEY] = pool
    app[_PROXY_KEY] = proxy

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await proxy.startup()
        yield
        await proxy.cleanup()

    async def on_shutdown(_app: web.Application) -> None:
        await proxy.shutdown()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    for path in FORWARDED:
        app.router.add_post(path, proxy.forward)
    app.router.add_get("/v1/models", proxy.list_models)
    app.router.add_get("/health", proxy.health)
    app.router.add_get("/metrics", proxy.metrics_endpoint)
    app.router.add_get("/servers", proxy.list_servers)
    app.router.add_delete("/servers/{key}", proxy.delete_server)
    return app


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
    stop_event = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop_event.set)
            installed.append(sig)
    try:
        site = web.TCPSite(runner, host, port)
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


def _bound_address(runner: web.AppRunner, host: str, port: int) -> tuple[str, int]:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return str(address[0]), int(address[1])
    return host, port
