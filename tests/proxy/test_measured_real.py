"""The pool keeps its memory budget against what servers really hold, not the estimate.

Real llama-server, real smoke model under several names: once a server is ready the pool reads
its PSS from ``/proc`` and that figure replaces the GGUF estimate in the budget and in
``/servers``; over a trace of requests across three names with room for two, the servers'
PSS read independently from ``/proc`` never adds up to more than the budget.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from proxy_fakes import serve_pool

from llama_proc.proxy.budget import estimate_server_memory
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.pool import ServerPool
from llama_proc.proxy.servers import LlamaServerFactory

START_TIMEOUT = 120
TEST_TIMEOUT = 300
NAMES = ("smol-a", "smol-b", "smol-c")

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").is_file(), reason="reads /proc/<pid>/smaps_rollup"
)


def _pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="ascii").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _models(smol_model: Path) -> ModelsConfig:
    options = {"ctx_size": 512, "threads": 1, "parallel": 1}
    return ModelsConfig({n: ModelSpec(id=n, path=smol_model, options=options) for n in NAMES})


async def _complete(session: Any, model: str) -> int:
    body = {"model": model, "prompt": "Hi", "max_tokens": 4}
    async with session.post("/v1/completions", json=body) as r:
        await r.read()
        return int(r.status)


def test_measured_memory_replaces_the_estimate(llama_server_bin: Path, smol_model: Path) -> None:
    models = _models(smol_model)
    estimate = estimate_server_memory(models.models["smol-a"])
    factory = LlamaServerFactory(binary=llama_server_bin, start_timeout=START_TIMEOUT)

    async def main() -> None:
        pool = ServerPool(factory, max_servers=4, memory_budget=estimate * 10)
        async with serve_pool(models, pool) as s:
            assert await _complete(s, "smol-a") == 200
            await pool.measure_all()
            (info,) = pool.snapshot()
            pss = _pss(info.pid or 0)
            print(f"estimate {estimate / 2**20:.1f} MiB, measured {info.measured / 2**20:.1f} MiB")
            assert info.estimate == estimate
            # What the budget counts is the measured figure, within 5 % of /proc read here.
            assert info.measured > 0
            assert abs(info.measured - pss) <= pss // 20
            assert info.memory == info.measured
            shown = info.to_json()
            assert shown["memory_estimate"] == estimate
            assert shown["memory_measured"] == info.measured
            async with s.get("/servers") as r:
                listed = (await r.json())["data"][0]
            assert listed["memory_measured"] == info.measured

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))


def test_measured_use_never_exceeds_the_budget_in_a_trace(
    llama_server_bin: Path, smol_model: Path
) -> None:
    models = _models(smol_model)
    factory = LlamaServerFactory(binary=llama_server_bin, start_timeout=START_TIMEOUT)
    trace = ["smol-a", "smol-b", "smol-a", "smol-c", "smol-c", "smol-b", "smol-a", "smol-c"]

    async def main() -> None:
        # The budget: two servers as measured, with 10 % to spare, so a third must evict.
        probe = ServerPool(factory, max_servers=4)
        async with serve_pool(models, probe) as s:
            assert await _complete(s, "smol-a") == 200
            await probe.measure_all()
            one = probe.snapshot()[0].measured
        budget = one * 22 // 10
        pool = ServerPool(factory, max_servers=4, memory_budget=budget)
        async with serve_pool(models, pool) as s:
            peak = 0
            for model in trace:
                assert await _complete(s, model) == 200
                live = [i for i in pool.snapshot() if i.state == "ready" and i.pid]
                used = sum(_pss(i.pid or 0) for i in live)
                peak = max(peak, used)
                assert used <= budget, (model, used, budget)
            print(
                f"one server {one / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB, peak "
                f"{peak / 2**20:.1f} MiB, loads {pool.stats['starts']}"
            )
            assert pool.stats["evictions_memory"] >= 1

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))
