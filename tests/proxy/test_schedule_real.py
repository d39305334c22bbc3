"""No thrash, with the real llama-server and the real smoke model under several names.

A server with a request running or waiting is never evicted; a server loaded less than the
minimum residency ago stays while the waiter is within its bound and goes once it is past it;
a pinned (``keep_loaded``) model is neither evicted nor unloaded for idleness, and a
``preload`` model is up before any request.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from proxy_fakes import serve_pool

from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.pool import ServerPool
from llama_proc.proxy.servers import LlamaServerFactory

if TYPE_CHECKING:
    from pathlib import Path

START_TIMEOUT = 120
TEST_TIMEOUT = 300
OPTIONS = {"ctx_size": 512, "threads": 1, "parallel": 1}


def _models(smol_model: Path, **extra: dict[str, Any]) -> ModelsConfig:
    return ModelsConfig(
        {
            n: ModelSpec(id=n, path=smol_model, options=OPTIONS, **extra.get(n, {}))
            for n in ("smol-a", "smol-b", "smol-c")
        }
    )


async def _complete(session: Any, model: str, tokens: int = 4) -> tuple[int, float]:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": tokens}
    body["ignore_eos"] = True
    async with session.post("/v1/completions", json=body) as r:
        await r.read()
        return int(r.status), time.monotonic()


def _pid(pool: ServerPool, model: str) -> int | None:
    return next((i.pid for i in pool.snapshot() if i.model == model and i.state == "ready"), None)


def _factory(binary: Path) -> LlamaServerFactory:
    return LlamaServerFactory(binary=binary, start_timeout=START_TIMEOUT)


def test_busy_and_queued_server_is_never_evicted(llama_server_bin: Path, smol_model: Path) -> None:
    async def main() -> None:
        pool = ServerPool(_factory(llama_server_bin), max_servers=1)
        async with serve_pool(_models(smol_model), pool) as s:
            assert (await _complete(s, "smol-a"))[0] == 200
            pid_a = _pid(pool, "smol-a")
            # One long request runs on A (one slot), B asks, then a second A request waits.
            long_a = asyncio.create_task(_complete(s, "smol-a", 200))
            await asyncio.sleep(0.3)
            b = asyncio.create_task(_complete(s, "smol-b"))
            await asyncio.sleep(0.2)
            assert not any(i.draining for i in pool.snapshot())
            queued_a = asyncio.create_task(_complete(s, "smol-a", 50))
            await asyncio.sleep(0.3)
            assert not long_a.done()
            assert _pid(pool, "smol-a") == pid_a
            assert not any(i.draining for i in pool.snapshot())
            (sa, ta), (sq, tq), (sb, tb) = await asyncio.gather(long_a, queued_a, b)
            assert (sa, sq, sb) == (200, 200, 200)
            # Both of A's requests were served by the first A, before B evicted it.
            assert ta <= tb
            assert tq <= tb
            assert pool.stats["starts"] == 2
            assert pool.stats["evictions_lru"] == 1

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))


def test_min_residency_holds_until_the_waiters_bound(
    llama_server_bin: Path, smol_model: Path
) -> None:
    async def main() -> None:
        models = _models(smol_model)
        # Within the bound: B is refused after its queue timeout and A stays.
        pool = ServerPool(
            _factory(llama_server_bin),
            max_servers=1,
            min_residency=60,
            residency_wait=60,
            queue_timeout=2,
        )
        async with serve_pool(models, pool) as s:
            assert (await _complete(s, "smol-a"))[0] == 200
            pid_a = _pid(pool, "smol-a")
            status, _ = await _complete(s, "smol-b")
            assert status == 503
            assert _pid(pool, "smol-a") == pid_a
            assert pool.stats["starts"] == 1
        # Past the bound: B waits 1.5 s, then A goes.
        pool = ServerPool(
            _factory(llama_server_bin), max_servers=1, min_residency=60, residency_wait=1.5
        )
        async with serve_pool(models, pool) as s:
            assert (await _complete(s, "smol-a"))[0] == 200
            began = time.monotonic()
            status, done = await _complete(s, "smol-b")
            assert status == 200
            assert done - began >= 1.5
            assert _pid(pool, "smol-a") is None
            assert pool.stats["evictions_lru"] == 1

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))


def test_pinned_model_stays_and_preload_loads_at_start(
    llama_server_bin: Path, smol_model: Path
) -> None:
    async def main() -> None:
        models = _models(smol_model, **{"smol-a": {"keep_loaded": True, "preload": True}})
        pinned = models.models["smol-a"]
        pool = ServerPool(_factory(llama_server_bin), max_servers=2, idle_ttl=0.5, preload=[pinned])
        async with serve_pool(models, pool) as s:
            for _ in range(100):
                if _pid(pool, "smol-a"):
                    break
                await asyncio.sleep(0.1)
            pid_a = _pid(pool, "smol-a")
            assert pid_a, "the preload model is up before any request"
            # A is the least recently used when C needs room: B goes instead.
            for model in ("smol-b", "smol-c", "smol-b", "smol-c"):
                assert (await _complete(s, model))[0] == 200
            assert _pid(pool, "smol-a") == pid_a
            assert pool.stats["evictions_lru"] == 3
            # Idle past its TTL: the others are unloaded, the pinned one is not.
            await asyncio.sleep(2.0)
            assert _pid(pool, "smol-a") == pid_a
            assert _pid(pool, "smol-c") is None
            assert next(i for i in pool.snapshot() if i.model == "smol-a").to_json()["pinned"]

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))
