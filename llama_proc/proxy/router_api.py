"""llama-server's router API, in its shapes, over the pool: list, load, unload, events.

``GET /models`` lists every model with ``status`` (``{"value": "unloaded" | "loading" |
"loaded" | "downloading", "failed": true, "exit_code": N, "progress": {...}}``);
``POST /models/load {"model": ...}`` starts the model's server (answered at once, as the router
does; follow ``GET /models/sse``) and leaves it warm until its idle TTL; ``POST /models/unload``
stops it; ``GET /models/sse`` streams ``model_status``, ``status_change``,
``download_progress`` and ``model_remove`` events as ``data: {"model", "event", "data"}``.
``GET /props``, ``/slots`` and ``/metrics`` with ``?model=`` are answered by that model's server;
``GET /props`` without one describes the router (``"role": "router"``), as llama-server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import web

from llama_proc._version import __version__
from llama_proc.errors import LlamaProcError
from llama_proc.proxy.events import ModelEvents, Statuses
from llama_proc.proxy.forward import pool_error
from llama_proc.proxy.relay import (
    PASS_HEADERS,
    SERVER_HEADER,
    BadBodyError,
    error_response,
    parse_body,
    shutting_down_error,
)
from llama_proc.proxy.servers import PoolBusyError

if TYPE_CHECKING:
    from llama_proc.proxy.models_config import ModelSpec
    from llama_proc.proxy.state import ProxyState

__all__ = [
    "ROUTED_GETS",
    "RouterApi",
]

logger = logging.getLogger(__name__)

ROUTED_GETS: Final = ("/props", "/slots")
"""GET routes answered by the server of the model named in ``?model=`` (and ``/metrics``)."""
SSE_KEEPALIVE: Final = 15.0
"""Seconds of quiet after which an event stream gets a comment line (keeps proxies open)."""
ROUTED_GET_TIMEOUT: Final = 30.0
"""Seconds a ``?model=`` GET may wait for the server's answer once it is up."""


class RouterApi:
    """Handlers for the router routes, sharing the proxy's state."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self.events = ModelEvents(self.statuses)
        self._loading: set[str] = set()
        self._failed: dict[str, int | None] = {}
        """Models whose last load failed, with the server's exit status when known."""
        self._tasks: set[asyncio.Task[None]] = set()

    # -- statuses ----------------------------------------------------------------------------

    def statuses(self) -> Statuses:
        """Every model's status object, as ``GET /models`` shows it."""
        servers: dict[str, set[str]] = {}
        errors: set[str] = set()
        for info in self.state.pool.snapshot():
            servers.setdefault(info.model, set()).add(info.state)
            if info.state == "stopped" and info.last_error:
                errors.add(info.model)
        downloads = {
            model: info
            for info in self.state.downloads.snapshot()
            if info.state == "downloading"
            for model in info.models
        }
        out: Statuses = {}
        for spec in self.state.models:
            states = servers.get(spec.id, set())
            status: dict[str, Any]
            if "ready" in states:
                status = {"value": "loaded"}
            elif spec.id in downloads:
                percent = downloads[spec.id].percent
                progress = {"value": round(percent / 100, 4) if percent else 0.0}
                status = {"value": "downloading", "progress": progress}
            elif states & {"starting", "queued"} or spec.id in self._loading:
                status = {"value": "loading"}
            else:
                status = {"value": "unloaded"}
                if spec.id in self._failed or spec.id in errors:
                    status["failed"] = True
                    code = self._failed.get(spec.id)
                    if code is not None:
                        status["exit_code"] = code
            out[spec.id] = status
        return out

    def _entry(self, spec: ModelSpec, status: dict[str, Any]) -> dict[str, Any]:
        inputs = ["text", "image"] if spec.mmproj or "mmproj" in spec.options else ["text"]
        return {
            "id": spec.id,
            "aliases": list(spec.aliases),
            "tags": [],
            "object": "model",
            "owned_by": "llama-proc",
            "created": self.state.created,
            "status": status,
            "architecture": {"input_modalities": inputs, "output_modalities": ["text"]},
            "source": spec.source or "config",
            "can_remove": False,
        }

    # -- handlers ----------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        """``GET /models``: every model and its status."""
        statuses = self.statuses()
        data = [self._entry(spec, statuses[spec.id]) for spec in self.state.models]
        return web.json_response({"data": data, "object": "list"})

    async def load(self, request: web.Request) -> web.Response:
        """``POST /models/load``: start the model's server; answered before it is ready."""
        spec = await self._model_of(request)
        if isinstance(spec, web.Response):
            return spec
        if self.state.shutting_down:
            return shutting_down_error()
        if self.statuses()[spec.id]["value"] != "unloaded":
            return error_response(400, "model is already running", code="model_running")
        self._loading.add(spec.id)
        self._failed.pop(spec.id, None)
        # Listeners see the load begin even when it fails before the next poll.
        self.events.poll_once()
        task = asyncio.get_running_loop().create_task(self._load(spec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response({"success": True})

    async def _load(self, spec: ModelSpec) -> None:
        try:
            if spec.ref is not None:
                spec = await self.state.downloads.resolve(spec)
            lease = await self.state.pool.acquire(spec)
            # Released at once: the server stays warm until its idle TTL, like a used one.
            lease.release()
        except LlamaProcError as err:
            logger.warning("loading model %r failed: %s", spec.id, err)
            cause: BaseException | None = err
            code = None
            while cause is not None and code is None:
                code = getattr(cause, "returncode", None)
                cause = cause.__cause__
            self._failed[spec.id] = code if isinstance(code, int) else None
        finally:
            self._loading.discard(spec.id)
            self.events.poll_once()

    async def unload(self, request: web.Request) -> web.Response:
        """``POST /models/unload``: stop the model's servers (every flag set)."""
        spec = await self._model_of(request)
        if isinstance(spec, web.Response):
            return spec
        keys = [
            info.key
            for info in self.state.pool.snapshot()
            if info.model == spec.id and info.state in ("starting", "ready")
        ]
        if not keys:
            return error_response(400, "model is not running", code="model_not_running")
        for key in keys:
            try:
                await self.state.pool.remove(key)
            except PoolBusyError as err:
                return error_response(409, str(err), code="server_busy")
        return web.json_response({"success": True})

    async def events_stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /models/sse``: status events as they happen, until the client goes."""
        sub = self.events.subscribe()
        if sub is None:
            return error_response(
                503,
                f"{self.events.max_subscribers} clients follow /models/sse already; retry later.",
                code="too_many_listeners",
                kind="server_error",
                headers={"Retry-After": "5"},
            )
        try:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            while True:
                try:
                    async with asyncio.timeout(SSE_KEEPALIVE):
                        event = await sub.queue.get()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event is None:
                    break
                await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response
        finally:
            self.events.unsubscribe(sub)

    async def routed_get(self, request: web.Request) -> web.StreamResponse:
        """A GET for one model's server (``?model=``), answered by that server."""
        if request.path == "/props" and "model" not in request.query:
            return web.json_response(self._router_props())
        name = request.query.get("model") or self.state.only_model
        if not name:
            return error_response(
                400, f"{request.path} needs ?model=<id>.", code="model_required", param="model"
            )
        spec = self.state.models.resolve(name)
        if spec is None:
            return _unknown(self.state, name)
        if self.state.shutting_down:
            return shutting_down_error()
        try:
            if spec.ref is not None:
                spec = await self.state.downloads.resolve(spec)
            lease = await self.state.pool.acquire(spec)
        except LlamaProcError as err:
            return pool_error(err, spec.id)
        assert self.state.session is not None  # noqa: S101 - set in startup
        headers = {"Authorization": f"Bearer {lease.api_key}"} if lease.api_key else None
        limit = self.state.options.max_response_bytes
        try:
            async with (
                asyncio.timeout(ROUTED_GET_TIMEOUT),
                self.state.session.get(
                    lease.url + request.path, params=request.query, headers=headers
                ) as upstream,
            ):
                data = await upstream.content.read(limit + 1)
                out = {h: upstream.headers[k] for h, k in PASS_HEADERS if k in upstream.headers}
                status = upstream.status
        except (aiohttp.ClientError, TimeoutError) as err:
            return error_response(
                502,
                f"llama-server for {spec.id!r} did not answer {request.path} "
                f"({type(err).__name__}).",
                code="upstream_error",
                kind="server_error",
            )
        finally:
            lease.release()
        if len(data) > limit:
            return error_response(
                502,
                f"llama-server's answer for {spec.id!r} is larger than {limit} bytes.",
                code="response_too_large",
                kind="server_error",
            )
        out[SERVER_HEADER] = lease.key
        return web.Response(body=data, status=status, headers=out)

    def _router_props(self) -> dict[str, Any]:
        """``GET /props`` without a model: what llama-server's router says of itself."""
        return {
            "role": "router",
            "max_instances": self.state.pool.max_servers,
            "models_autoload": True,
            "model_alias": "llama-proc",
            "model_path": "none",
            "default_generation_settings": {"params": None, "n_ctx": 0},
            "ui_settings": {},
            "build_info": f"llama-proc {__version__}",
            "cors_proxy_enabled": False,
        }

    async def _model_of(self, request: web.Request) -> ModelSpec | web.Response:
        try:
            async with asyncio.timeout(self.state.options.body_timeout):
                body = await request.read()
            payload = parse_body(body)
        except TimeoutError:
            return error_response(408, "The request body did not arrive in time.", code="timeout")
        except BadBodyError as err:
            return error_response(400, str(err), code="invalid_json")
        name = payload.get("model")
        if not isinstance(name, str) or not name:
            return error_response(
                400, "model is not found: set 'model' in the body.", code="model_required"
            )
        spec = self.state.models.resolve(name)
        return spec if spec is not None else _unknown(self.state, name)

    async def close(self) -> None:
        """End the event streams and the loads in progress."""
        await self.events.close()
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _unknown(state: ProxyState, name: str) -> web.Response:
    known = ", ".join(sorted(state.models.models)[:20])
    return error_response(
        404,
        f"The model {name[:200]!r} does not exist. Known models: {known}.",
        code="model_not_found",
        param="model",
    )
