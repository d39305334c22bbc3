"""The proxy's /metrics: prometheus_client series per model, pool state, servers' own metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families
from proxy_fakes import FakeFactory, UpstreamBehaviour, serve_pool

from llama_proc.proxy.metrics import PoolMetrics, ProxyMetrics, render
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.pool import ServerPool

if TYPE_CHECKING:
    import aiohttp

A = ModelSpec(id="a", path=Path("/m/a.gguf"))
MODELS = ModelsConfig({"a": A})
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sample.labels.items())] = sample.value
    return out


async def plain_and_stream(session: aiohttp.ClientSession) -> None:
    """One plain and one streamed chat request, each read to the end."""
    for body in (CHAT, {**CHAT, "stream": True}):
        async with session.post("/v1/chat/completions", json=body) as r:
            assert r.status == 200
            await r.read()


def test_metrics_are_valid_prometheus_text_with_per_model_series() -> None:
    async def main() -> str:
        factory = FakeFactory()
        pool = ServerPool(factory, max_servers=1)
        async with serve_pool(MODELS, pool) as s:
            await plain_and_stream(s)
            factory.servers[0].crash()
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            async with s.get("/metrics") as r:
                assert r.status == 200
                return await r.text()

    text = asyncio.run(asyncio.wait_for(main(), 60))
    got = samples(text)  # the official parser reads all of it
    model = (("model", "a"),)
    assert got["llama_proc_model_requests_total", model] == 3
    assert got["llama_proc_model_loads_total", model] == 2
    assert got["llama_proc_model_load_seconds_count", model] == 2
    assert got["llama_proc_model_queue_wait_seconds_count", model] == 3
    assert got["llama_proc_model_time_to_first_token_seconds_count", model] == 1
    assert got["llama_proc_model_restarts_total", (("model", "a"), ("reason", "crash"))] == 1
    assert got["llama_proc_pool_events_total", (("event", "crashes"),)] == 1
    assert got["llama_proc_pool_max_servers", ()] == 1
    # Each server's own llamacpp:* series, labelled with its model.
    upstream = [k for k in got if k[0] == "llamacpp:prompt_tokens_total"]
    assert upstream
    assert all(dict(labels)["model"] == "a" for _, labels in upstream)
    lines = text.splitlines()
    assert 'llama_proc_proxy_requests_total{endpoint="/v1/chat/completions",code="200"} 3' in lines
    assert not any("_created" in line for line in lines)


def test_render_keeps_label_order_and_integers() -> None:
    pool_metrics = PoolMetrics()
    pool_metrics.evictions.inc("m", "lru")
    pool_metrics.load_seconds.observe(1.5, "m")

    class Pool:
        max_servers = 2
        stats: dict[str, int] = {"starts": 1}  # noqa: RUF012 - a stand-in
        metrics = pool_metrics

        def gauges(self) -> list[tuple[str, dict[str, str], float]]:
            return [("servers", {"state": "ready"}, 1)]

    metrics = ProxyMetrics(Pool())
    metrics.upstream_errors.inc("m", "stall")
    text = render(metrics.registry)
    lines = text.splitlines()
    assert 'llama_proc_model_evictions_total{model="m",reason="lru"} 1' in lines
    assert 'llama_proc_proxy_upstream_errors_total{model="m",kind="stall"} 1' in lines
    assert 'llama_proc_model_load_seconds_sum{model="m"} 1.5' in lines
    assert 'llama_proc_pool_servers{state="ready"} 1' in lines
    assert 'llama_proc_pool_events_total{event="starts"} 1' in lines
    assert "# TYPE llama_proc_pool_events_total counter" in lines
    assert metrics.upstream_errors.value("m", "stall") == 1
    assert pool_metrics.load_seconds.count("m") == 1


def test_servers_json_shows_queue_and_restarts() -> None:
    async def main() -> dict[str, Any]:
        factory = FakeFactory()
        pool = ServerPool(factory)
        async with pool.lease(A):
            pass
        factory.servers[0].crash()
        async with pool.lease(A):
            pass
        info = pool.snapshot()[0].to_json()
        await pool.close()
        return info

    info = asyncio.run(main())
    assert info["restarts"] == 1
    assert info["queued_requests"] == 0


def test_overhead_leaves_out_the_pool_and_the_server() -> None:
    """The proxy's own time excludes the load and llama-server's think time, and only that."""

    async def main() -> str:
        # Slow at everything the proxy waits for: a 0.4 s start, 0.3 s before the first byte,
        # then 0.05 s per token.
        factory = FakeFactory(
            UpstreamBehaviour(first_delay=0.3, token_delay=0.05, tokens=4), start_delay=0.4
        )
        pool = ServerPool(factory, max_servers=1)
        async with serve_pool(MODELS, pool) as s:
            await plain_and_stream(s)
            async with s.get("/metrics") as r:
                return await r.text()

    got = samples(asyncio.run(asyncio.wait_for(main(), 60)))
    model = (("model", "a"),)
    endpoint = (("endpoint", "/v1/chat/completions"),)
    assert got["llama_proc_proxy_overhead_seconds_count", model] == 2
    own = got["llama_proc_proxy_overhead_seconds_sum", model]
    total = got["llama_proc_proxy_request_duration_seconds_sum", endpoint]
    # 0.4 + 2 x 0.3 + 0.2 + 0.05 of waiting happened; none of it is the proxy's own time.
    assert total > 1.2
    assert 0 < own < 0.15, own
