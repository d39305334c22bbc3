"""The proxy's own routes: the model list, health, metrics and the servers (management)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from llama_proc.proxy.metrics import merge_upstream
from llama_proc.proxy.relay import UPSTREAM_METRICS_TIMEOUT, error_response
from llama_proc.proxy.servers import PoolBusyError

if TYPE_CHECKING:
    from llama_proc.proxy.state import ProxyState

__all__ = [
    "LocalRoutes",
]


class LocalRoutes:
    """Handlers answered by the proxy itself, from the pool's state."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    async def list_models(self, request: web.Request) -> web.Response:
        """The models clients may ask for, in OpenAI's list shape (``GET /v1/models``)."""
        loaded = {info.model for info in self.state.pool.snapshot() if info.state == "ready"}
        data = [
            {
                "id": spec.id,
                "object": "model",
                "created": self.state.created,
                "owned_by": "llama-proc",
                "aliases": list(spec.aliases),
                "loaded": spec.id in loaded,
            }
            for spec in self.state.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        """Whether the proxy takes requests (``GET /health``, no key needed)."""
        if self.state.shutting_down or self.state.pool.closing:
            return web.json_response({"status": "shutting_down"}, status=503)
        snapshot = self.state.pool.snapshot()
        ready = sum(1 for s in snapshot if s.state == "ready")
        return web.json_response(
            {"status": "ok", "models": len(self.state.models), "servers_ready": ready}
        )

    async def list_servers(self, request: web.Request) -> web.Response:
        """The pool's servers and the model downloads (``GET /servers``)."""
        return web.json_response(
            {
                "object": "list",
                "max_servers": self.state.pool.max_servers,
                "data": [info.to_json() for info in self.state.pool.snapshot()],
                "downloads": [info.to_json() for info in self.state.downloads.snapshot()],
            }
        )

    async def delete_server(self, request: web.Request) -> web.Response:
        """Stop one server (``DELETE /servers/{key}``, ``?force=1`` mid-request)."""
        key = request.match_info["key"]
        force = request.query.get("force", "").lower() in ("1", "true", "yes")
        try:
            found = await self.state.pool.remove(key, force=force)
        except PoolBusyError as err:
            return error_response(409, str(err), code="server_busy")
        if not found:
            return error_response(
                404, f"No server with key {key!r} (see GET /servers).", code="not_found"
            )
        return web.json_response({"key": key, "stopped": True})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        """The proxy's own metrics plus every ready server's (``GET /metrics``)."""
        upstream = await self._scrape_servers()
        text = self.state.metrics.render() + upstream
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def _scrape_servers(self) -> str:
        assert self.state.session is not None  # noqa: S101 - set in startup
        session = self.state.session
        servers = self.state.pool.ready_servers()

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
        self.state.metrics.scrape_errors.set(value=sum(1 for t in texts if t is None))
        return merge_upstream(parts)
