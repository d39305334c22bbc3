"""The proxy's memory budget from the model's GGUF header (weights + KV cache + overhead).

Fast tests check which options the estimate reads; the real tests run the real llama-server
with the real smoke model under two names: a budget that fits one server but not two makes
the second model evict the idle first, and a budget smaller than one model refuses it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from proxy_fakes import serve_pool
from tiny_gguf import write_model

from llama_proc.models.gguf_info import estimate_memory, read_model_info
from llama_proc.proxy.budget import AUTO_PARALLEL, MEMORY_OVERHEAD, estimate_server_memory
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.pool import ServerPool
from llama_proc.proxy.servers import LlamaServerFactory

START_TIMEOUT = 120
TEST_TIMEOUT = 300


def test_estimate_reads_the_header_and_the_servers_options(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf", layers=4, context=1024)
    info = read_model_info(model)

    def estimate(**options: Any) -> int:
        return estimate_server_memory(ModelSpec(id="m", path=model, options=options))

    assert estimate(ctx_size=512, parallel=2) == estimate_memory(info, 512, 2).total
    # Unset: llama-server's own defaults, the trained context and four slots.
    assert estimate() == estimate_memory(info, 1024, AUTO_PARALLEL).total
    # The KV cache grows with the context: a larger one costs more.
    assert estimate(ctx_size=4096) > estimate(ctx_size=512)
    assert estimate(cache_type_k="q8_0", cache_type_v="q8_0") < estimate()
    # Different K and V types: the larger one for both, an upper bound.
    assert estimate(cache_type_k="q8_0", cache_type_v="f32") == estimate(
        cache_type_k="f32", cache_type_v="f32"
    )
    # Nothing like the provisional file size x 1.2 + 256 MiB.
    assert estimate() < MEMORY_OVERHEAD


def test_extra_args_and_request_flags_override_the_options(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf", context=1024)
    info = read_model_info(model)
    spec = ModelSpec(
        id="m", path=model, options={"ctx_size": 512}, extra_args=("-c", "2048", "-np=3")
    )
    assert estimate_server_memory(spec) == estimate_memory(info, 2048, 3).total
    flags = ("--ctx-size", "8192", "--parallel", "1")
    assert estimate_server_memory(spec, flags) == estimate_memory(info, 8192, 1).total


def test_unreadable_header_falls_back_to_the_file_size(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf")
    data = bytearray(model.read_bytes())
    data[-8:] = b""  # the last tensor's data is cut short
    model.write_bytes(bytes(data))
    expected = int(len(data) * 1.2) + MEMORY_OVERHEAD
    assert estimate_server_memory(ModelSpec(id="m", path=model)) == expected


# ----------------------------------------------------------------------------- real server
def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _two_names(smol_model: Path) -> ModelsConfig:
    options = {"ctx_size": 512, "threads": 1, "parallel": 1}
    return ModelsConfig(
        {n: ModelSpec(id=n, path=smol_model, options=options) for n in ("smol-a", "smol-b")}
    )


async def _complete(session: Any, model: str) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "prompt": "Hi", "max_tokens": 4}
    async with session.post("/v1/completions", json=body) as r:
        return r.status, await r.json()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/<pid>/status")
def test_real_budget_for_one_server_evicts_the_idle_one(
    llama_server_bin: Path, smol_model: Path
) -> None:
    models = _two_names(smol_model)
    one = estimate_server_memory(models.models["smol-a"])
    budget = one * 3 // 2  # room for one server, not two
    factory = LlamaServerFactory(binary=llama_server_bin, start_timeout=START_TIMEOUT)

    async def main() -> None:
        pool = ServerPool(factory, max_servers=4, memory_budget=budget)
        async with serve_pool(models, pool) as s:
            status, _ = await _complete(s, "smol-a")
            assert status == 200
            (first,) = pool.snapshot()
            assert first.estimate == one
            rss = _rss(first.pid or 0)
            print(
                f"estimate {one / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB, "
                f"real RSS {rss / 2**20:.1f} MiB"
            )
            assert rss <= budget
            status, _ = await _complete(s, "smol-b")
            assert status == 200
            assert pool.stats["evictions_memory"] == 1
            assert pool.stats["starts"] == 2
            live = [i for i in pool.snapshot() if i.state == "ready"]
            assert [i.model for i in live] == ["smol-b"]
            with pytest.raises(ProcessLookupError):
                os.kill(first.pid or 0, 0)

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))


def test_real_budget_smaller_than_one_model_refuses_it(
    llama_server_bin: Path, smol_model: Path
) -> None:
    models = _two_names(smol_model)
    budget = estimate_server_memory(models.models["smol-a"]) // 2
    factory = LlamaServerFactory(binary=llama_server_bin, start_timeout=START_TIMEOUT)

    async def main() -> None:
        pool = ServerPool(factory, max_servers=4, memory_budget=budget)
        async with serve_pool(models, pool) as s:
            status, body = await _complete(s, "smol-a")
            assert status == 400
            assert body["error"]["code"] == "model_too_large"
            assert "--memory-budget" in body["error"]["message"]
            # The figures: what it needs and what the budget holds, per device (host here).
            need = estimate_server_memory(models.models["smol-a"]) / 2**20
            assert (
                f"host: needs {need:.1f} MiB of {budget / 2**20:.1f} MiB"
                in (body["error"]["message"])
            )
            assert pool.stats["starts"] == 0

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))
