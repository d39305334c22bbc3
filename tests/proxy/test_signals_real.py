"""Signals for schedulers outside the process, read from /metrics with the real llama-server.

While one long request runs on a one-slot server and a second waits, the proxy's /metrics
shows the pod-level totals an endpoint picker reads (queued and running requests, KV cache
utilisation) and the per-server and per-model series (slots, KV cache tokens from ``/slots``,
load time, measured memory per device, evictions by reason).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families
from proxy_fakes import serve_pool

from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.pool import ServerPool
from llama_proc.proxy.servers import LlamaServerFactory

if TYPE_CHECKING:
    from pathlib import Path

START_TIMEOUT = 120
TEST_TIMEOUT = 300
OPTIONS = {"ctx_size": 512, "threads": 1, "parallel": 1}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def _complete(session: Any, model: str, tokens: int) -> int:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": True}
    async with session.post("/v1/completions", json=body) as r:
        await r.read()
        return int(r.status)


def test_metrics_show_queue_running_slots_kv_memory_and_evictions(
    llama_server_bin: Path, smol_model: Path
) -> None:
    models = ModelsConfig(
        {n: ModelSpec(id=n, path=smol_model, options=OPTIONS) for n in ("smol-a", "smol-b")}
    )

    async def main() -> tuple[dict[Any, float], dict[Any, float], str]:
        factory = LlamaServerFactory(binary=llama_server_bin, start_timeout=START_TIMEOUT)
        pool = ServerPool(factory, max_servers=1, probe_interval=0, memory_budget=1 << 36)
        async with serve_pool(models, pool) as s:
            assert await _complete(s, "smol-a", 4) == 200
            long = asyncio.create_task(_complete(s, "smol-a", 300))
            await asyncio.sleep(0.3)
            second = asyncio.create_task(_complete(s, "smol-a", 4))
            await asyncio.sleep(0.2)
            await pool.check_health()  # reads /slots
            await pool.measure_all()
            async with s.get("/metrics") as r:
                busy = _samples(await r.text())
            key = pool.snapshot()[0].key
            assert await long == 200
            assert await second == 200
            assert await _complete(s, "smol-b", 4) == 200  # evicts A (lru)
            async with s.get("/metrics") as r:
                after = _samples(await r.text())
            return busy, after, key

    busy, after, key = asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))
    server = (("model", "smol-a"), ("server", key))
    # Pod-level totals, no labels: what the endpoint picker's flags name.
    assert busy["llama_proc_queued_requests", ()] == 1
    assert busy["llama_proc_running_requests", ()] == 1
    assert busy["llama_proc_kv_cache_usage_ratio", ()] == 1.0  # its only slot is busy
    # Per server.
    assert busy["llama_proc_server_queued_requests", server] == 1
    assert busy["llama_proc_server_running_requests", server] == 1
    assert busy["llama_proc_server_slots_used", server] == 1
    assert busy["llama_proc_server_slots_total", server] == 1
    assert busy["llama_proc_server_kv_cache_tokens_total", server] == 512
    assert busy["llama_proc_server_load_seconds", server] > 0
    host = busy["llama_proc_server_memory_bytes", (("device", "host"), *server)]
    assert host > 50 * 2**20
    assert busy["llama_proc_server_memory_estimate_bytes", server] > 0
    # Per model.
    assert busy["llama_proc_model_running_requests", (("model", "smol-a"),)] == 1
    assert busy["llama_proc_model_queued_requests", (("model", "smol-a"),)] == 1
    assert after["llama_proc_model_evictions_total", (("model", "smol-a"), ("reason", "lru"))] == 1
    assert after["llama_proc_model_loads_total", (("model", "smol-b"),)] == 1
    assert after["llama_proc_running_requests", ()] == 0
