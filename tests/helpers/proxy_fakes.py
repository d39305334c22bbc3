"""In-process fakes for the proxy tests: a llama-server-like aiohttp app and a pool factory.

``FakeUpstream`` speaks the parts of llama-server's HTTP API the proxy forwards (chat and text
completions, streamed or not, embeddings, /metrics) and records what happened to each request
(finished, cancelled by a disconnect). ``FakeFactory`` starts them for the pool and counts starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from llama_proc.errors import ServerStartError
from llama_proc.proxy.app import create_app
from llama_proc.proxy.gate import run_proxy
from llama_proc.proxy.options import ProxyOptions

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
    from llama_proc.proxy.pool import ServerPool


@dataclass
class UpstreamBehaviour:
    tokens: int = 5
    token_delay: float = 0.0
    first_delay: float = 0.0
    stall_after: int | None = None  # stop sending (but keep the connection) after N tokens
    crash_after: int | None = None  # drop the connection after N tokens
    status: int = 200
    slots: int | None = None  # reported to the pool as the server's slot count


@dataclass
class UpstreamLog:
    started: int = 0
    finished: int = 0
    cancelled: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


class FakeUpstream:
    """A tiny llama-server stand-in bound to 127.0.0.1 on a free port."""

    def __init__(
        self,
        name: str = "fake",
        behaviour: UpstreamBehaviour | None = None,
        api_key: str | None = None,
    ) -> None:
        self.name = name
        self.behaviour = behaviour or UpstreamBehaviour()
        self.api_key = api_key
        self.log = UpstreamLog()
        self.app = web.Application(middlewares=[self._auth])
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.chat)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/slots", self.slots_route)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.running = False
        self.returncode: int | None = None
        self.stops = 0
        self.stopped_while_busy = False
        self.active = 0
        self.wedged = False
        self.probes = 0

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # Like llama-server: /health is public, the rest needs the key when one is set.
        if (
            self.api_key
            and request.path != "/health"
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            return web.json_response({"error": {"message": "Invalid API Key"}}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self.running = True

    async def stop(self) -> None:
        self.stops += 1
        if self.active:
            self.stopped_while_busy = True
        self.running = False
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # Pool handle protocol -------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self.running

    @property
    def pid(self) -> int | None:
        return None

    async def vanish(self) -> None:
        """Close the port while still looking alive (the exit status lags the death)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def slots(self) -> int | None:
        return self.behaviour.slots

    def wedge(self) -> None:
        """Keep /health at 200 but stop answering anything that needs the main loop."""
        self.wedged = True

    async def probe(self, timeout: float) -> bool:
        """The pool's health probe, over HTTP like the real handle's."""
        self.probes += 1
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + "/slots", timeout=aiohttp.ClientTimeout(total=timeout)) as resp,
        ):
            return resp.status == 200

    def crash(self) -> None:
        """Look dead to the pool (as if the process exited with SIGKILL)."""
        self.running = False
        self.returncode = -9

    # Routes -----------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def slots_route(self, request: web.Request) -> web.Response:
        while self.wedged:
            await asyncio.sleep(0.05)
        return web.json_response([{"id": i} for i in range(self.behaviour.slots or 1)])

    async def metrics(self, request: web.Request) -> web.Response:
        text = (
            "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
            "# TYPE llamacpp:prompt_tokens_total counter\n"
            f"llamacpp:prompt_tokens_total {self.log.finished * 3}\n"
            "# HELP llamacpp:requests_processing Number of requests processing.\n"
            "# TYPE llamacpp:requests_processing gauge\n"
            f"llamacpp:requests_processing {self.active}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i, _ in enumerate(items)
        ]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.log.bodies.append(body)
        self.log.headers.append(dict(request.headers))
        self.log.started += 1
        self.active += 1
        b = self.behaviour
        try:
            while self.wedged:
                await asyncio.sleep(0.05)
            if b.status != 200:
                return web.json_response(
                    {"error": {"code": b.status, "message": "fake error", "type": "server_error"}},
                    status=b.status,
                )
            await asyncio.sleep(b.first_delay)
            if not body.get("stream"):
                await asyncio.sleep(b.token_delay * b.tokens)
                self.log.finished += 1
                return web.json_response(_completion(body, self.name, b.tokens))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(b.tokens):
                if b.crash_after is not None and i == b.crash_after:
                    assert request.transport is not None
                    request.transport.abort()
                    self.crash()
                    return resp
                if b.stall_after is not None and i == b.stall_after:
                    await asyncio.sleep(3600)
                chunk = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": body.get("model", ""),
                    "choices": [
                        {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}
                    ],
                }
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await asyncio.sleep(b.token_delay)
            done = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            await resp.write(b"data: " + json.dumps(done).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.log.finished += 1
        except asyncio.CancelledError:
            self.log.cancelled += 1
            raise
        else:
            return resp
        finally:
            self.active -= 1


def _completion(body: dict[str, Any], name: str, tokens: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"hello from {name}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens},
    }


class FakeFactory:
    """A pool factory starting :class:`FakeUpstream` servers (or failing on purpose)."""

    def __init__(
        self,
        behaviour: UpstreamBehaviour | None = None,
        *,
        start_delay: float = 0.0,
        fail: int = 0,
        api_key: str | None = None,
    ) -> None:
        self.behaviour = behaviour or UpstreamBehaviour()
        self.api_key = api_key
        self.start_delay = start_delay
        self.fail = fail  # the next N starts fail
        self.starts: list[tuple[str, tuple[str, ...]]] = []
        self.servers: list[FakeUpstream] = []

    async def __call__(self, spec: ModelSpec, flags: tuple[str, ...]) -> FakeUpstream:
        self.starts.append((spec.id, flags))
        await asyncio.sleep(self.start_delay)
        if self.fail:
            self.fail -= 1
            msg = f"fake llama-server for {spec.id} exited before it was ready"
            raise ServerStartError(msg, returncode=1, log_tail=["E model is bad"])
        server = FakeUpstream(spec.id, self.behaviour, self.api_key)
        await server.start()
        self.servers.append(server)
        return server

    @property
    def live(self) -> list[FakeUpstream]:
        return [s for s in self.servers if s.running]


@contextlib.asynccontextmanager
async def serve_pool(
    models: ModelsConfig, pool: ServerPool, **options: Any
) -> AsyncIterator[aiohttp.ClientSession]:
    """Run the proxy app for ``pool`` on a free port; yield a session bound to it."""
    app = create_app(models, pool, ProxyOptions(**options))
    stop = asyncio.Event()
    bound: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_proxy(
            app,
            host="127.0.0.1",
            port=0,
            drain_timeout=5,
            ready=lambda h, p: bound.set_result((h, p)),
            stop=stop,
        )
    )
    host, port = await asyncio.wait_for(bound, 5)
    async with aiohttp.ClientSession(f"http://{host}:{port}") as session:
        try:
            yield session
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


def record_server_starts(monkeypatch: Any) -> list[dict[str, Any]]:
    """Make :class:`~llama_proc.proxy.servers.LlamaServerFactory` record each server's options.

    Every start then fails with ``RuntimeError("recorded")`` after its keyword arguments were
    appended to the returned list, so a test sees exactly what a real server would be given.
    """
    from llama_proc.proxy import servers

    started: list[dict[str, Any]] = []

    class Recorder:
        def __init__(self, model: object, **kwargs: Any) -> None:
            started.append(kwargs)

        async def start(self) -> None:
            msg = "recorded"
            raise RuntimeError(msg)

    monkeypatch.setattr(servers, "AsyncLlamaServer", Recorder)
    return started
