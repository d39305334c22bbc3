"""The OpenAI-compatible proxy: an aiohttp app in front of a :class:`ServerPool`.

Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` (forwarded to
the server for the request's model and flags), ``GET /v1/models``, ``GET /health`` (no key
needed), ``GET /metrics`` (the proxy's own metrics plus every server's), ``GET /servers`` (the
servers, and under ``downloads`` each Hugging Face model download with its state and percent)
and ``DELETE /servers/{key}`` (management).

Responses are passed through as they arrive: an event stream is written chunk by chunk with no
buffering, and a client that goes away cancels the upstream request (the upstream connection
is closed, which llama-server treats as a cancel).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web
from yarl import URL

from llama_proc.errors import (
    ConfigError,
    InvalidArgumentError,
    LlamaProcError,
    ModelFileError,
    ServerExitedError,
)
from llama_proc.proxy.auth import _ADMIN_PREFIX, _PUBLIC_PATHS, Role
from llama_proc.proxy.body_policy import BodyChecker
from llama_proc.proxy.downloads import ModelDownloads
from llama_proc.proxy.flag_checker import FLAGS_HEADER, FlagChecker
from llama_proc.proxy.metrics import ProxyMetrics, merge_upstream
from llama_proc.proxy.pool import Lease, ServerPool
from llama_proc.proxy.relay import (
    _PASS_HEADERS,
    FORWARDED,
    MAX_CACHED_URLS,
    MODEL_HEADER,
    RESTARTED_HEADER,
    RETRY_PAUSE,
    SERVER_HEADER,
    THREAD_PARSE_BYTES,
    UPSTREAM_ATTEMPTS,
    UPSTREAM_CONNECT_TIMEOUT,
    UPSTREAM_KEEPALIVE,
    UPSTREAM_METRICS_TIMEOUT,
    _answer_too_large,
    _BadBodyError,
    _check_body,
    _error,
    _exit_cause,
    _parse_body,
    _read_capped,
    _request_summary,
    _shutting_down,
    _sse_error,
)
from llama_proc.proxy.servers import (
    ModelTooLargeError,
    PoolBusyError,
    PoolClosedError,
    PoolQueueFullError,
)
from llama_proc.proxy.tenant import tenant_reason
from llama_proc.proxy.upstream import UpstreamConnectionError, UpstreamConnections

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
    from llama_proc.proxy.options import ProxyOptions
    from llama_proc.proxy.upstream import UpstreamResponse

__all__ = [
    "create_app",
]

logger = logging.getLogger(__name__)


class _Proxy:
    """Request handlers sharing the pool, the upstream session and the metrics."""

    def __init__(
        self,
        models: ModelsConfig,
        pool: ServerPool,
        options: ProxyOptions,
        downloads: ModelDownloads | None = None,
    ) -> None:
        self.models = models
        self.pool = pool
        self.options = options
        self.downloads = downloads if downloads is not None else ModelDownloads()
        self.metrics = ProxyMetrics(pool)
        self.flags = FlagChecker(options.flag_caps)
        self.bodies = BodyChecker(options.body_caps)
        self.session: aiohttp.ClientSession | None = None
        self.created = int(time.time())
        self._per_key: dict[int, int] = {}
        """In-flight requests per inference key (by its index in ``_keys``)."""
        self._keys: tuple[tuple[bytes, Role], ...] = tuple(
            [(k.encode(), "inference") for k in options.api_keys]
            + [(k.encode(), "admin") for k in options.admin_keys]
        )
        # Client connections with a request in the handler (the rest are idle or still
        # sending headers, and may be closed to make room for a new connection).
        self.busy: dict[object, int] = {}
        self._only_model = next(iter(models)).id if len(models) == 1 else None
        self._shutting_down = False
        # Connections to each server's base URL: kept alive, and opened ahead for streams.
        self._upstreams: dict[str, UpstreamConnections] = {}
        self._background: set[asyncio.Task[None]] = set()
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
        # Request flags are checked against the binary's options (its --help, probed once and
        # cached) before the pool sees them.
        binary = await asyncio.to_thread(self.pool.binary_flags)
        self.flags = FlagChecker(self.options.flag_caps, binary)
        await self.pool.start()

    async def shutdown(self) -> None:
        self._shutting_down = True
        # Requests waiting for a model download end now, not after the drain timeout.
        await self.downloads.close()

    async def cleanup(self) -> None:
        await self.downloads.close()
        await self.pool.close()
        if self.session is not None:
            await self.session.close()
        upstreams, self._upstreams = list(self._upstreams.values()), {}
        for upstream in upstreams:
            await upstream.close()

    # -- middleware ------------------------------------------------------------------------

    def role(self, request: web.Request) -> Role | None:
        """The role of the key the request offers; None = no valid key.

        Without any key configured every client is an admin. A header that is not UTF-8
        offers no key (it cannot match one), rather than failing the request.
        """
        return self._match(request)[0]

    def _match(self, request: web.Request) -> tuple[Role | None, int | None]:
        """The role of the offered key and its index among the configured keys."""
        if not self._keys:
            return "admin", None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        offered = token.strip() if scheme.lower() == "bearer" else ""
        offered = offered or request.headers.get("X-Api-Key", "")
        try:
            given = offered.encode()
        except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
            return None, None
        found: Role | None = None
        index: int | None = None
        # Compare against every key so timing tells nothing about which (if any) matched.
        for at, (key, role) in enumerate(self._keys):
            if hmac.compare_digest(given, key) and found != "admin":
                found, index = role, at
        return found, index

    def authorized(self, request: web.Request) -> bool:
        """Whether the request offers a valid key of any role (or none is needed)."""
        return self.role(request) is not None

    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Authentication, roles, OpenAI-shaped HTTP errors and request metrics for every route."""
        began = time.perf_counter()
        endpoint = request.path if request.path in _ENDPOINTS else "other"
        metrics = self.metrics
        metrics.in_flight.inc()
        connection = request.protocol
        busy = self.busy
        busy[connection] = busy.get(connection, 0) + 1
        try:
            response = await self._guarded(request, handler)
        except asyncio.CancelledError:
            # A client that hangs up right after the last event of a complete stream got its
            # answer; anything else is nginx's 499 "client closed request".
            metrics.requests.inc(endpoint, "200" if id(request) in self._complete else "499")
            raise
        finally:
            metrics.in_flight.inc(amount=-1)
            self._complete.discard(id(request))
            left = busy.pop(connection, 1) - 1
            if left > 0:
                busy[connection] = left
        if response.status >= 400 and not request.content.is_eof():
            # An early answer (401, 413...) to a body nobody read: drop the connection rather
            # than reading and discarding what the client still sends.
            response.force_close()
        metrics.requests.inc(endpoint, str(response.status))
        metrics.duration.observe(time.perf_counter() - began, endpoint)
        return response

    async def _guarded(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        index: int | None = None
        if path in _PUBLIC_PATHS:
            role: Role | None = "inference"
        else:
            role, index = self._match(request)
        if role is None:
            return _error(
                401,
                "Incorrect API key provided: pass it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
        if role != "admin" and (path == _ADMIN_PREFIX or path.startswith(_ADMIN_PREFIX + "/")):
            return _error(
                403,
                f"{path} needs an admin key (serve --admin-key-file); this key may only use "
                "the API.",
                code="admin_key_required",
                kind="permission_error",
            )
        if role == "inference" and index is not None:
            # One key must not hold the whole proxy (every connection, for the body timeout).
            held = self._per_key.get(index, 0)
            if held >= self.options.per_key_limit:
                return _error(
                    429,
                    f"This key has {held} requests in flight, the most one key may have; retry "
                    "when one finishes.",
                    code="rate_limit_exceeded",
                    kind="requests",
                    headers={"Retry-After": "1"},
                )
            self._per_key[index] = held + 1
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return self._http_error(exc)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            logger.exception("internal error while handling %s %s", request.method, path)
            return _error(
                500,
                "Internal error in the llama-proc proxy; see its log.",
                code="internal_error",
                kind="server_error",
            )
        finally:
            if role == "inference" and index is not None:
                left = self._per_key.pop(index, 1) - 1
                if left > 0:
                    self._per_key[index] = left

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
        began = time.perf_counter()
        # Time spent waiting on others (the client's body, a download, the pool, failed
        # attempts): left out of the proxy's own time (the overhead metric).
        waited = 0.0
        options = self.options
        declared = request.content_length
        if declared is not None and declared > options.max_body_bytes:
            return self._http_error(web.HTTPRequestEntityTooLarge(options.max_body_bytes, declared))
        try:
            async with asyncio.timeout(options.body_timeout):
                body = await request.read()
            waited = time.perf_counter() - began
        except TimeoutError:
            return _error(
                408,
                f"The request body did not arrive within {options.body_timeout:g}s.",
                code="request_timeout",
            )
        try:
            if len(body) > THREAD_PARSE_BYTES:
                payload = await asyncio.to_thread(_parse_body, body)
            else:
                payload = _parse_body(body)
        except _BadBodyError as err:
            return _error(400, str(err), code="invalid_json")
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
                flags = self.flags.check_request(header, spec)
            except InvalidArgumentError as err:
                return _error(400, str(err), code="invalid_flags", param=FLAGS_HEADER)
        checked = _check_body(self.bodies, request.path, payload, spec, flags)
        if isinstance(checked, web.Response):
            return checked
        body = checked or body
        if self._shutting_down:
            return _shutting_down()
        if spec.ref is not None:
            # A Hugging Face model is fetched before the pool sees it: the download holds no
            # server slot and runs before the server's start clock.
            fetching = time.perf_counter()
            try:
                spec = await self.downloads.resolve(spec)
            except LlamaProcError as err:
                if self._shutting_down:
                    return _shutting_down()
                logger.warning("model %r could not be fetched: %s", spec.id, err)
                return _error(
                    503,
                    # The hub's answers about the reference (no such quantization: these
                    # exist) help the tenant; the host's paths and network do not.
                    f"model {spec.id!r} could not be fetched: "
                    f"{tenant_reason(err, shown=(ModelFileError,))}",
                    code="model_download_failed",
                    kind="server_error",
                )
            waited += time.perf_counter() - fetching
        stream = payload.get("stream")
        arrived = time.perf_counter()
        for attempt in range(1, UPSTREAM_ATTEMPTS + 1):
            queued = time.perf_counter()
            try:
                lease = await self.pool.acquire(spec, flags)
            except PoolClosedError:
                return _shutting_down()
            except PoolQueueFullError as err:
                return _error(
                    429,
                    str(err),
                    code="rate_limit_exceeded",
                    kind="requests",
                    headers={"Retry-After": str(math.ceil(err.retry_after))},
                )
            except ModelTooLargeError as err:
                return _error(400, str(err), code="model_too_large", param="model")
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
                    f"llama-server for model {spec.id!r} failed to start: {tenant_reason(err)}",
                    code="server_start_failed",
                    kind="server_error",
                )
            acquired = time.perf_counter()
            waited += acquired - queued
            try:
                response = await self._pass_through(
                    request,
                    lease,
                    spec,
                    body,
                    stream,
                    last=attempt == UPSTREAM_ATTEMPTS,
                    arrived=arrived,
                    own_since=began + waited,
                )
            finally:
                lease.release()
            if response is not None:
                return response
            waited += time.perf_counter() - acquired
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
        arrived: float,
        own_since: float,
    ) -> web.StreamResponse | None:
        """Forward one request; None = it failed before any response byte, try again.

        ``own_since`` is the request's start moved later by the time it waited on others: the
        proxy's own time up to the first byte is what is left after the wait for llama-server.
        """
        options = self.options
        loop = asyncio.get_running_loop()
        sent = time.perf_counter()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        accept = request.headers.get("Accept")
        if accept:
            headers["Accept"] = accept
        if lease.api_key:
            headers["Authorization"] = f"Bearer {lease.api_key}"
        response: web.StreamResponse | None = None
        upstream: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(options.first_byte_timeout) as deadline:
                # llama-server closes the connection after an event stream although it
                # advertises keep-alive: a stream is sent with Connection: close, and a
                # replacement socket is opened while it runs.
                upstream = await self._upstream(lease.url).request(
                    request.path, body, headers, stream=stream is True
                )
                upstream_headers = upstream.headers
                out_headers = {
                    h: upstream_headers[k] for h, k in _PASS_HEADERS if k in upstream_headers
                }
                out_headers[SERVER_HEADER] = lease.key
                if lease.restarted:
                    out_headers[RESTARTED_HEADER] = "crash"
                if not upstream_headers.get("content-type", "").startswith("text/event-stream"):
                    data = await _read_capped(upstream, options.max_response_bytes)
                    if data is None:
                        self.metrics.upstream_errors.inc(spec.id, "too_large")
                        return _answer_too_large(spec.id, options.max_response_bytes, lease.key)
                    answered = time.perf_counter()
                    self.metrics.first_byte.observe(answered - sent, spec.id)
                    reply = web.Response(body=data, status=upstream.status, headers=out_headers)
                    # The body is written as soon as this returns.
                    own = time.perf_counter() - own_since - (answered - sent)
                    self.metrics.overhead.observe(own, spec.id)
                    return reply
                out_headers["Cache-Control"] = "no-cache"
                out_headers["X-Accel-Buffering"] = "no"
                response = web.StreamResponse(status=upstream.status, headers=out_headers)
                await response.prepare(request)
                stall = options.stall_timeout
                first = 0.0
                while True:
                    chunk = await upstream.readany()
                    if not chunk:
                        self._complete.add(id(request))
                        break
                    if not first:
                        first = time.perf_counter()
                        self.metrics.first_byte.observe(first - sent, spec.id)
                        self.metrics.ttft.observe(first - arrived, spec.id)
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
                    if first > 0:
                        own = time.perf_counter() - own_since - (first - sent)
                        self.metrics.overhead.observe(own, spec.id)
                        first = -1.0
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
            if response is not None:
                # A server that goes silent mid-stream is wedged: the pool restarts it.
                lease.report_stall()
            return await self._fail(request, response, 504, message, "upstream_timeout")
        except asyncio.CancelledError:
            if id(request) not in self._complete:
                self.metrics.disconnects.inc(spec.id)
            raise
        except UpstreamConnectionError as err:
            alive = lease.check_alive()
            if not last and upstream is None and err.before_response:
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
            if alive:
                # The exit status can lag the broken connection by a moment.
                await asyncio.sleep(RETRY_PAUSE)
                alive = lease.check_alive()
            healed = None if alive else lease.healed()
            kind = "connection" if alive else "crash" if healed is None else healed.reason
            self.metrics.upstream_errors.inc(spec.id, kind)
            if healed is not None:
                # The pool stopped a live but unresponsive server: that broke the connection.
                message = (
                    f"llama-server for {spec.id!r} was wedged: it {healed.what}, so it was "
                    "stopped; it restarts on the next request"
                )
            elif alive:
                message = (
                    f"llama-server for {spec.id!r} failed during the request: "
                    f"{err or type(err).__name__}"
                )
            else:
                # The same words as the clients' ServerExitedError; no log lines to tenants.
                handle = lease.handle
                message = (
                    ServerExitedError(
                        f"llama-server for {spec.id!r}",
                        getattr(handle, "returncode", None),
                        _exit_cause(handle),
                    ).summary
                    + "; it restarts on the next request"
                )
            logger.warning(
                "%s [key %s]%s",
                message,
                lease.key,
                "" if alive else f"; the request it died on: {_request_summary(request, body)}",
            )
            return await self._fail(request, response, 502, message, "upstream_error")
        finally:
            if upstream is not None:
                # Closing (not releasing) an unfinished upstream response drops its connection,
                # which is what makes llama-server stop generating for a client that is gone.
                if response is not None or not upstream.at_eof:
                    upstream.close()
                else:
                    upstream.release()

    def _upstream(self, base: str) -> UpstreamConnections:
        upstream = self._upstreams.get(base)
        if upstream is None:
            if len(self._upstreams) >= MAX_CACHED_URLS:
                # Servers come and go (each restart has a new port); forget the old ones.
                for old in self._upstreams.values():
                    task = asyncio.get_running_loop().create_task(old.close())
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                self._upstreams.clear()
            url = URL(base)
            upstream = UpstreamConnections(url.host or "127.0.0.1", url.port or 80)
            self._upstreams[base] = upstream
        return upstream

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
                "downloads": [info.to_json() for info in self.downloads.snapshot()],
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
        upstream = await self._scrape_servers()
        text = self.metrics.render() + upstream
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


_POOL_KEY: Final = web.AppKey("pool", ServerPool)
_PROXY_KEY: Final = web.AppKey("proxy", _Proxy)
_ENDPOINTS: Final = frozenset({*FORWARDED, "/v1/models", "/health", "/metrics", "/servers"})


def create_app(
    models: ModelsConfig,
    pool: ServerPool,
    options: ProxyOptions,
    *,
    downloads: ModelDownloads | None = None,
) -> web.Application:
    """Build the proxy application.

    The pool is started with the app and closed (every server stopped) when the app is
    cleaned up, so running the app with any aiohttp runner manages the children.

    Args:
        models: the models clients may ask for.
        pool: the server pool (not started yet).
        options: limits, timeouts and API keys.
        downloads: fetches the models named by Hugging Face reference (default: with
            huggingface_hub's own settings from the environment).

    Raises:
        ConfigError: a model's options or ``extra_args`` exceed ``options.flag_caps``.
    """
    checker = FlagChecker(options.flag_caps)
    for spec in models:
        try:
            checker.check_model(spec)
        except InvalidArgumentError as err:
            msg = f"model {spec.id!r}: {err}"
            raise ConfigError(msg) from None
    proxy = _Proxy(models, pool, options, downloads)

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
