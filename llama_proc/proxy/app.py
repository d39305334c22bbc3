"""The OpenAI-compatible proxy: an aiohttp app in front of a :class:`ServerPool`.

Routes: the forwarded ones (:data:`~llama_proc.proxy.relay.FORWARDED`: OpenAI chat,
completions, embeddings and responses, Anthropic messages, rerank, infill, tokenize,
detokenize, apply-template), sent to the server for the request's model and flags;
``GET /v1/models``, ``GET /health`` (no key needed), ``GET /metrics`` (the proxy's own metrics
plus every server's), ``GET /servers`` (the servers, and under ``downloads`` each Hugging Face
model download with its state and percent) and ``DELETE /servers/{key}`` (management); and
llama-server's router API (:mod:`.router_api`): ``GET /models``, ``POST /models/load``,
``POST /models/unload``, ``GET /models/sse`` and ``?model=`` on ``/props``, ``/slots``,
``/metrics``.

The handlers live by concern: :mod:`.middleware` (keys, roles, errors, metrics),
:mod:`.forward` (the forwarded routes), :mod:`.routes` (the proxy's own routes), all sharing
one :class:`~llama_proc.proxy.state.ProxyState`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from aiohttp import web

from llama_proc.errors import ConfigError, InvalidArgumentError
from llama_proc.proxy.flag_checker import FlagChecker
from llama_proc.proxy.forward import Forwarder
from llama_proc.proxy.middleware import Gatekeeper
from llama_proc.proxy.pool import ServerPool
from llama_proc.proxy.relay import FORWARDED
from llama_proc.proxy.router_api import ROUTED_GETS, RouterApi
from llama_proc.proxy.routes import LocalRoutes
from llama_proc.proxy.state import ProxyState

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from llama_proc.proxy.downloads import ModelDownloads
    from llama_proc.proxy.models_config import ModelsConfig
    from llama_proc.proxy.options import ProxyOptions

__all__ = [
    "POOL_KEY",
    "PROXY_KEY",
    "create_app",
]

POOL_KEY: Final = web.AppKey("pool", ServerPool)
PROXY_KEY: Final = web.AppKey("proxy", ProxyState)


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
    state = ProxyState(models, pool, options, downloads)
    gatekeeper = Gatekeeper(state)
    forwarder = Forwarder(state)
    local = LocalRoutes(state)
    router = RouterApi(state)

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        return await gatekeeper.middleware(request, handler)

    app = web.Application(client_max_size=options.max_body_bytes, middlewares=[middleware])
    app[POOL_KEY] = pool
    app[PROXY_KEY] = state

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await state.startup()
        yield
        await state.cleanup()

    async def on_shutdown(_app: web.Application) -> None:
        await router.close()
        await state.shutdown()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    for path in FORWARDED:
        app.router.add_post(path, forwarder.forward)
    app.router.add_get("/v1/models", local.list_models)
    app.router.add_get("/health", local.health)

    async def metrics(request: web.Request) -> web.StreamResponse:
        if "model" in request.query:
            return await router.routed_get(request)
        return await local.metrics_endpoint(request)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/models", router.list_models)
    app.router.add_post("/models/load", router.load)
    app.router.add_post("/models/unload", router.unload)
    app.router.add_get("/models/sse", router.events_stream)
    for path in ROUTED_GETS:
        app.router.add_get(path, router.routed_get)
    app.router.add_get("/servers", local.list_servers)
    app.router.add_delete("/servers/{key}", local.delete_server)
    return app
