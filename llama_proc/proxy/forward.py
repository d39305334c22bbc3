"""Forwarding a request to its model's server and passing the answer through.

Responses are passed through as they arrive: an event stream is written chunk by chunk with no
buffering, and a client that goes away cancels the upstream request (the upstream connection
is closed, which llama-server treats as a cancel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING

from aiohttp import web
from yarl import URL

from llama_proc.errors import (
    InvalidArgumentError,
    LlamaProcError,
    ModelFileError,
    ServerExitedError,
)
from llama_proc.proxy.flag_checker import FLAGS_HEADER
from llama_proc.proxy.relay import (
    MAX_CACHED_URLS,
    MODEL_HEADER,
    PASS_HEADERS,
    RESTARTED_HEADER,
    RETRY_PAUSE,
    SERVER_HEADER,
    THREAD_PARSE_BYTES,
    UPSTREAM_ATTEMPTS,
    BadBodyError,
    answer_too_large,
    check_body,
    error_response,
    exit_cause,
    http_error,
    parse_body,
    read_capped,
    request_summary,
    shutting_down_error,
    sse_error,
    stream_finished,
)
from llama_proc.proxy.servers import (
    ModelTooLargeError,
    PoolBusyError,
    PoolClosedError,
    PoolQueueFullError,
)
from llama_proc.proxy.stream_repair import MESSAGES_PATH, MessagesStreamRepair
from llama_proc.proxy.tenant import tenant_reason
from llama_proc.proxy.upstream import UpstreamConnectionError, UpstreamConnections

if TYPE_CHECKING:
    from llama_proc.proxy.models_config import ModelSpec
    from llama_proc.proxy.pool import Lease
    from llama_proc.proxy.state import ProxyState
    from llama_proc.proxy.upstream import UpstreamResponse

__all__ = [
    "Forwarder",
    "pool_error",
]

logger = logging.getLogger(__name__)


class Forwarder:
    """The handler for the forwarded routes: route by model, lease a server, relay."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Route a request to its model's server and pass the response through."""
        began = time.perf_counter()
        # Time spent waiting on others (the client's body, a download, the pool, failed
        # attempts): left out of the proxy's own time (the overhead metric).
        waited = 0.0
        options = self.state.options
        declared = request.content_length
        if declared is not None and declared > options.max_body_bytes:
            return http_error(
                web.HTTPRequestEntityTooLarge(options.max_body_bytes, declared),
                options.max_body_bytes,
            )
        try:
            async with asyncio.timeout(options.body_timeout):
                body = await request.read()
            waited = time.perf_counter() - began
        except TimeoutError:
            return error_response(
                408,
                f"The request body did not arrive within {options.body_timeout:g}s.",
                code="request_timeout",
            )
        try:
            if len(body) > THREAD_PARSE_BYTES:
                payload = await asyncio.to_thread(parse_body, body)
            else:
                payload = parse_body(body)
        except BadBodyError as err:
            return error_response(400, str(err), code="invalid_json")
        name = request.headers.get(MODEL_HEADER) or payload.get("model") or self.state.only_model
        if not name:
            return error_response(
                400,
                f"No model given: set 'model' in the body or the {MODEL_HEADER} header.",
                code="model_required",
                param="model",
            )
        spec = self.state.models.resolve(name) if isinstance(name, str) else None
        if spec is None:
            known = ", ".join(sorted(self.state.models.models)[:20])
            return error_response(
                404,
                f"The model {str(name)[:200]!r} does not exist. Known models: {known}.",
                code="model_not_found",
                param="model",
            )
        flags: tuple[str, ...] = ()
        header = request.headers.get(FLAGS_HEADER)
        if header:
            try:
                flags = self.state.flags.check_request(header, spec)
            except InvalidArgumentError as err:
                return error_response(400, str(err), code="invalid_flags", param=FLAGS_HEADER)
        checked = check_body(self.state.bodies, request.path, payload, spec, flags)
        if isinstance(checked, web.Response):
            return checked
        body = checked or body
        if self.state.shutting_down:
            return shutting_down_error()
        if spec.ref is not None:
            # A Hugging Face model is fetched before the pool sees it: the download holds no
            # server slot and runs before the server's start clock.
            fetching = time.perf_counter()
            try:
                spec = await self.state.downloads.resolve(spec)
            except LlamaProcError as err:
                if self.state.shutting_down:
                    return shutting_down_error()
                logger.warning("model %r could not be fetched: %s", spec.id, err)
                return error_response(
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
                lease = await self.state.pool.acquire(spec, flags)
            except LlamaProcError as err:
                return pool_error(err, spec.id)
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
        options = self.state.options
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
                    h: upstream_headers[k] for h, k in PASS_HEADERS if k in upstream_headers
                }
                out_headers[SERVER_HEADER] = lease.key
                if lease.restarted:
                    out_headers[RESTARTED_HEADER] = "crash"
                if not upstream_headers.get("content-type", "").startswith("text/event-stream"):
                    data = await read_capped(upstream, options.max_response_bytes)
                    if data is None:
                        self.state.metrics.upstream_errors.inc(spec.id, "too_large")
                        return answer_too_large(spec.id, options.max_response_bytes, lease.key)
                    answered = time.perf_counter()
                    self.state.metrics.first_byte.observe(answered - sent, spec.id)
                    reply = web.Response(body=data, status=upstream.status, headers=out_headers)
                    # The body is written as soon as this returns.
                    own = time.perf_counter() - own_since - (answered - sent)
                    self.state.metrics.overhead.observe(own, spec.id)
                    return reply
                out_headers["Cache-Control"] = "no-cache"
                out_headers["X-Accel-Buffering"] = "no"
                response = web.StreamResponse(status=upstream.status, headers=out_headers)
                await response.prepare(request)
                stall = options.stall_timeout
                first = 0.0
                repair = MessagesStreamRepair(spec.id) if request.path == MESSAGES_PATH else None
                while True:
                    chunk = await upstream.readany()
                    if repair is not None:
                        chunk = repair.feed(chunk) if chunk else repair.flush()
                        if not chunk and not upstream.at_eof:
                            continue  # the first event is still arriving
                    if not chunk:
                        self.state.complete.add(id(request))
                        break
                    if not first:
                        first = time.perf_counter()
                        self.state.metrics.first_byte.observe(first - sent, spec.id)
                        self.state.metrics.ttft.observe(first - arrived, spec.id)
                    if stream_finished(chunk):
                        # The client has its whole answer once this is written, and may hang
                        # up before the upstream's end-of-stream arrives.
                        self.state.complete.add(id(request))
                    try:
                        await response.write(chunk)
                    except ConnectionError:
                        # The client went away (seen here when handler cancellation is off).
                        self.state.metrics.disconnects.inc(spec.id)
                        return response
                    if first > 0:
                        own = time.perf_counter() - own_since - (first - sent)
                        self.state.metrics.overhead.observe(own, spec.id)
                        first = -1.0
                    deadline.reschedule(loop.time() + stall)
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response  # noqa: TRY300 - the except clauses need `response` in scope
        except TimeoutError:
            kind = "timeout" if response is None else "stall"
            self.state.metrics.upstream_errors.inc(spec.id, kind)
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
            if id(request) not in self.state.complete:
                self.state.metrics.disconnects.inc(spec.id)
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
                self.state.metrics.upstream_errors.inc(spec.id, "retried")
                logger.info("retrying request for %r after %s", spec.id, err or type(err).__name__)
                return None
            if alive:
                # The exit status can lag the broken connection by a moment.
                await asyncio.sleep(RETRY_PAUSE)
                alive = lease.check_alive()
            healed = None if alive else lease.healed()
            kind = "connection" if alive else "crash" if healed is None else healed.reason
            self.state.metrics.upstream_errors.inc(spec.id, kind)
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
                        exit_cause(handle),
                    ).summary
                    + "; it restarts on the next request"
                )
            logger.warning(
                "%s [key %s]%s",
                message,
                lease.key,
                "" if alive else f"; the request it died on: {request_summary(request, body)}",
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
        upstream = self.state.upstreams.get(base)
        if upstream is None:
            if len(self.state.upstreams) >= MAX_CACHED_URLS:
                # Servers come and go (each restart has a new port); forget the old ones.
                for old in self.state.upstreams.values():
                    task = asyncio.get_running_loop().create_task(old.close())
                    self.state.background.add(task)
                    task.add_done_callback(self.state.background.discard)
                self.state.upstreams.clear()
            url = URL(base)
            upstream = UpstreamConnections(url.host or "127.0.0.1", url.port or 80)
            self.state.upstreams[base] = upstream
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
            return error_response(status, message, code=code, kind="server_error")
        # Headers are gone already: tell the client in-band, as llama-server itself does.
        with contextlib.suppress(ConnectionError):
            await response.write(sse_error(message, code))
            await response.write_eof()
        return response


def pool_error(err: LlamaProcError, model: str) -> web.Response:
    """The answer for a request the pool could not give a server (full, closed, failed)."""
    if isinstance(err, PoolClosedError):
        return shutting_down_error()
    if isinstance(err, PoolQueueFullError):
        return error_response(
            429,
            str(err),
            code="rate_limit_exceeded",
            kind="requests",
            headers={"Retry-After": str(math.ceil(err.retry_after))},
        )
    if isinstance(err, ModelTooLargeError):
        return error_response(400, str(err), code="model_too_large", param="model")
    if isinstance(err, PoolBusyError):
        return error_response(
            503, str(err), code="server_busy", kind="server_error", headers={"Retry-After": "5"}
        )
    return error_response(
        503,
        f"llama-server for model {model!r} failed to start: {tenant_reason(err)}",
        code="server_start_failed",
        kind="server_error",
    )
