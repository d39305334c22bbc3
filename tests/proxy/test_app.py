"""The aiohttp proxy against in-process fake llama-servers: routing, streaming, errors, auth."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import pytest
from proxy_fakes import FakeFactory, UpstreamBehaviour

from llama_proc.errors import ConfigError
from llama_proc.proxy.app import create_app
from llama_proc.proxy.gate import run_proxy
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.options import ProxyOptions, event_loop_factory
from llama_proc.proxy.pool import ServerPool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine

T = TypeVar("T")

MODELS = ModelsConfig(
    {
        "a": ModelSpec(id="a", path=Path("/m/a.gguf"), aliases=("alpha",)),
        "b": ModelSpec(id="b", path=Path("/m/b.gguf")),
    }
)


@dataclass
class Client:
    """An HTTP session to the proxy, plus the proxy's stop event and pool."""

    session: aiohttp.ClientSession
    stop: asyncio.Event
    pool: ServerPool

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


@contextlib.asynccontextmanager
async def proxy(
    factory: FakeFactory, *, models: ModelsConfig = MODELS, max_servers: int = 2, **options: Any
) -> AsyncIterator[Client]:
    pool = ServerPool(factory, max_servers=max_servers, queue_timeout=options.pop("queue", 5))
    app = create_app(models, pool, ProxyOptions(**options))
    stop = asyncio.Event()
    bound: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_proxy(
            app,
            host="127.0.0.1",
            port=0,
            drain_timeout=options.get("drain_timeout", 5),
            ready=lambda h, p: bound.set_result((h, p)),
            stop=stop,
        )
    )
    host, port = await asyncio.wait_for(bound, 5)
    async with aiohttp.ClientSession(f"http://{host}:{port}") as session:
        try:
            yield Client(session, stop, pool)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_is_forwarded_to_the_models_server() -> None:
    async def main() -> None:
        factory = FakeFactory()
        async with proxy(factory) as s:
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                body = await r.json()
                assert body["choices"][0]["message"]["content"] == "hello from a"
                key = r.headers["X-Llama-Proc-Server"]
            async with s.post("/v1/chat/completions", json={**CHAT, "model": "alpha"}) as r:
                assert r.headers["X-Llama-Proc-Server"] == key
            async with s.post(
                "/v1/completions", json={"model": "x", "prompt": "p"}, headers={"X-Model-Id": "b"}
            ) as r:
                assert (await r.json())["choices"][0]["message"]["content"] == "hello from b"
            async with s.post("/v1/embeddings", json={"model": "b", "input": ["x", "y"]}) as r:
                assert len((await r.json())["data"]) == 2
            assert [m for m, _ in factory.starts] == ["a", "b"]
            # Authorization for the proxy is not passed on to llama-server.
            assert all("Authorization" not in h for h in factory.servers[0].log.headers)
        assert factory.live == []

    run(main())


def test_stream_is_passed_through_chunk_by_chunk() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(tokens=5, token_delay=0.2))
        async with proxy(factory) as s:
            began = time.monotonic()
            arrivals = []
            payload = b""
            async with s.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/event-stream")
                async for chunk in r.content.iter_any():
                    arrivals.append(time.monotonic() - began)
                    payload += chunk
            events = [line for line in payload.decode().split("\n\n") if line]
            assert events[-1] == "data: [DONE]"
            assert len(events) == 7
            # The first token arrives long before the last one is generated (no buffering).
            assert arrivals[0] < 0.5
            assert arrivals[-1] > 0.9
            assert len(arrivals) >= 5

    run(main())


def test_client_disconnect_mid_stream_cancels_upstream() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(tokens=100, token_delay=0.05))
        async with proxy(factory) as s:
            r = await s.post("/v1/chat/completions", json={**CHAT, "stream": True})
            await r.content.readany()
            r.close()  # drop the connection mid-stream
            upstream = factory.servers[0]
            await eventually(lambda: upstream.log.cancelled == 1)
            assert upstream.log.finished == 0
            await eventually(lambda: s.pool.snapshot()[0].active == 0)
            async with s.get("/metrics") as m:
                text = await m.text()
            assert 'llama_proc_proxy_client_disconnects_total{model="a"} 1' in text

    run(main())


def test_client_disconnect_while_waiting_for_non_streamed_answer() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(first_delay=5))
        async with proxy(factory) as s:
            with pytest.raises(asyncio.TimeoutError):
                async with asyncio.timeout(0.5):
                    await s.post("/v1/chat/completions", json=CHAT)
            upstream = factory.servers[0]
            await eventually(lambda: upstream.log.cancelled == 1)

    run(main())


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        pytest.param({"model": "nope", "messages": []}, {}, 404, "model_not_found", id="unknown"),
        pytest.param({"messages": []}, {}, 400, "model_required", id="no-model"),
        pytest.param([1, 2], {}, 400, "invalid_json", id="not-object"),
        pytest.param(b"{nope", {}, 400, "invalid_json", id="bad-json"),
        pytest.param(CHAT, {"X-Llama-Flags": "'unterminated"}, 400, "invalid_flags", id="quote"),
        pytest.param(CHAT, {"X-Llama-Flags": "x" * 5000}, 400, "invalid_flags", id="too-long"),
    ],
)
def test_errors_have_openai_shape(
    body: Any, headers: dict[str, str], status: int, code: str
) -> None:
    async def main() -> None:
        factory = FakeFactory()
        async with proxy(factory) as s:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with s.post(
                "/v1/chat/completions",
                data=data,
                headers={"Content-Type": "application/json", **headers},
            ) as r:
                assert r.status == status
                err = (await r.json())["error"]
                assert err["code"] == code
                assert set(err) == {"message", "type", "param", "code"}
                assert err["message"]
            assert factory.starts == []

    run(main())


def test_single_model_is_the_default() -> None:
    async def main() -> None:
        factory = FakeFactory()
        only = ModelsConfig({"a": ModelSpec(id="a", path=Path("/m/a.gguf"))})
        async with (
            proxy(factory, models=only) as s,
            s.post("/v1/chat/completions", json={"messages": []}) as r,
        ):
            assert r.status == 200

    run(main())


def test_body_size_limit() -> None:
    async def main() -> None:
        factory = FakeFactory()
        async with proxy(factory, max_body_bytes=2048) as s:
            big = {**CHAT, "pad": "x" * 4096}
            async with s.post("/v1/chat/completions", json=big) as r:
                assert r.status == 413
                assert (await r.json())["error"]["code"] == "request_too_large"
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200

    run(main())


def test_start_failure_is_a_clear_503_and_next_request_retries() -> None:
    async def main() -> None:
        factory = FakeFactory(fail=1)
        async with proxy(factory) as s:
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 503
                err = (await r.json())["error"]
                assert err["code"] == "server_start_failed"
                assert "exited before it was ready" in err["message"]
                assert "'a'" in err["message"]
            async with s.get("/servers") as r:
                info = (await r.json())["data"][0]
                assert info["last_error"].startswith("failed to start")
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200

    run(main())


def test_first_byte_timeout_and_stall_timeout() -> None:
    async def main() -> None:
        slow = FakeFactory(UpstreamBehaviour(first_delay=3))
        async with (
            proxy(slow, first_byte_timeout=0.3) as s,
            s.post("/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 504
            assert (await r.json())["error"]["code"] == "upstream_timeout"
        stalls = FakeFactory(UpstreamBehaviour(tokens=10, stall_after=2))
        async with proxy(stalls, stall_timeout=0.3) as s:
            began = time.monotonic()
            async with s.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status == 200
                text = (await r.read()).decode()
            assert time.monotonic() - began < 2
            last = json.loads(text.strip().split("\n\n")[-1].removeprefix("data: "))
            assert last["error"]["code"] == "upstream_timeout"
            assert "stalled" in last["error"]["message"]
            await eventually(lambda: stalls.servers[0].log.cancelled == 1)

    run(main())


def test_crash_mid_stream_is_reported_in_band_and_server_restarts() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(tokens=10, crash_after=3))
        async with proxy(factory) as s:
            async with s.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                text = (await r.read()).decode()
            last = json.loads(text.strip().split("\n\n")[-1].removeprefix("data: "))
            assert last["error"]["code"] == "upstream_error"
            assert "crashed" in last["error"]["message"]
            factory.behaviour.crash_after = None
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                assert r.headers["X-Llama-Proc-Restarted"] == "crash"
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert "X-Llama-Proc-Restarted" not in r.headers
            async with s.get("/servers") as r:
                info = (await r.json())["data"][0]
            assert info["crashes"] == 1
            assert info["starts"] == 2

    run(main())


def test_server_gone_between_requests_is_retried_on_a_new_one() -> None:
    async def main() -> None:
        factory = FakeFactory()
        async with proxy(factory) as s:
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            first = factory.servers[0]
            await first.vanish()
            asyncio.get_running_loop().call_later(0.03, first.crash)
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                assert r.headers["X-Llama-Proc-Restarted"] == "crash"
            assert len(factory.servers) == 2
            assert factory.servers[1].log.finished == 1
            async with s.get("/metrics") as r:
                text = await r.text()
            assert 'llama_proc_proxy_upstream_errors_total{model="a",kind="retried"} 1' in text

    run(main())


def test_upstream_error_status_passes_through() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(status=400))
        async with proxy(factory) as s, s.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "fake error"

    run(main())


def test_api_keys() -> None:
    async def main() -> None:
        factory = FakeFactory()
        async with proxy(factory, api_keys=("k1", "k2")) as s:
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "invalid_api_key"
            bad = {"Authorization": "Bearer k3"}
            async with s.post("/v1/chat/completions", json=CHAT, headers=bad) as r:
                assert r.status == 401
            for headers in ({"Authorization": "Bearer k2"}, {"X-Api-Key": "k1"}):
                async with s.post("/v1/chat/completions", json=CHAT, headers=headers) as r:
                    assert r.status == 200
            for path in ("/v1/models", "/metrics", "/servers"):
                async with s.get(path) as r:
                    assert r.status == 401, path
            async with s.get("/health") as r:
                assert r.status == 200
            assert len(factory.starts) == 1

    run(main())


def test_upstream_key_is_sent_to_servers_and_metrics() -> None:
    async def main() -> None:
        factory = FakeFactory(api_key="inner-secret")
        async with proxy(factory, api_keys=("outer",)) as s:
            auth = {"Authorization": "Bearer outer"}
            async with s.post("/v1/chat/completions", json=CHAT, headers=auth) as r:
                assert r.status == 200
            upstream = factory.servers[0]
            assert upstream.log.headers[0]["Authorization"] == "Bearer inner-secret"
            # Going around the proxy to the server's own port needs the inner key.
            async with (
                aiohttp.ClientSession() as direct,
                direct.post(upstream.url + "/v1/chat/completions", json=CHAT) as r,
            ):
                assert r.status == 401
            async with s.get("/metrics", headers=auth) as r:
                text = await r.text()
            assert "llama_proc_upstream_scrape_errors 0" in text.splitlines()
            assert "llamacpp:prompt_tokens_total{" in text

    run(main())


def test_models_health_servers_delete() -> None:
    async def main() -> None:
        factory = FakeFactory()
        async with proxy(factory) as s:
            async with s.get("/v1/models") as r:
                models = await r.json()
            assert models["object"] == "list"
            assert [m["id"] for m in models["data"]] == ["a", "b"]
            assert models["data"][0]["aliases"] == ["alpha"]
            assert not models["data"][0]["loaded"]
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                key = r.headers["X-Llama-Proc-Server"]
            async with s.get("/health") as r:
                assert await r.json() == {"status": "ok", "models": 2, "servers_ready": 1}
            async with s.get("/servers") as r:
                servers = await r.json()
            assert servers["max_servers"] == 2
            [info] = servers["data"]
            assert info["key"] == key
            assert info["state"] == "ready"
            assert info["requests"] == 1
            async with s.delete(f"/servers/{key}") as r:
                assert r.status == 200
            assert factory.live == []
            async with s.delete(f"/servers/{key}") as r:
                assert r.status == 404
            async with s.get("/nowhere") as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "not_found"

    run(main())


def test_metrics_merge_proxy_and_servers() -> None:
    async def main() -> None:
        factory = FakeFactory()
        async with proxy(factory) as s:
            for model in ("a", "b"):
                async with s.post("/v1/chat/completions", json={**CHAT, "model": model}) as r:
                    assert r.status == 200
                    key = r.headers["X-Llama-Proc-Server"]
            async with s.get("/metrics") as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
        lines = text.splitlines()
        assert (
            'llama_proc_proxy_requests_total{endpoint="/v1/chat/completions",code="200"} 2' in lines
        )
        assert 'llama_proc_pool_servers{state="ready"} 2' in lines
        assert 'llama_proc_pool_events_total{event="starts"} 2' in lines
        assert f'llamacpp:prompt_tokens_total{{server="{key}",model="b"}} 3' in lines
        assert lines.count("# TYPE llamacpp:prompt_tokens_total counter") == 1
        assert sum(1 for line in lines if line.startswith("llamacpp:prompt_tokens_total{")) == 2

    run(main())


def test_graceful_shutdown_drains_then_stops_servers() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(tokens=10, token_delay=0.1))
        async with proxy(factory) as s:
            r = await s.post("/v1/chat/completions", json={**CHAT, "stream": True})
            first = await r.content.readany()
            assert first.startswith(b"data: ")
            s.stop.set()  # like SIGTERM: stop accepting, drain, stop children
            rest = await r.read()
            assert rest.rstrip().endswith(b"data: [DONE]")
            upstream = factory.servers[0]
            assert upstream.log.finished == 1
            await eventually(lambda: not factory.live)
            with pytest.raises(aiohttp.ClientConnectionError):
                async with s.post("/v1/chat/completions", json=CHAT):
                    pass

    run(main())


def test_event_loop_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert event_loop_factory("asyncio") == ("asyncio", None)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert event_loop_factory("auto") == ("asyncio", None)
    with pytest.raises(ConfigError, match=r"llama-proc\[fast\]"):
        event_loop_factory("uvloop")
    with pytest.raises(ConfigError, match="choose one of auto, asyncio, uvloop"):
        event_loop_factory("trio")
