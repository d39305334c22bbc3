"""ServerPool scheduling with fakes: no thrashing, fairness bound, queues, memory budget, healing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from proxy_fakes import FakeFactory, UpstreamBehaviour, serve_pool

from llama_proc.proxy.budget import estimate_server_memory
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.pool import ServerPool
from llama_proc.proxy.servers import LlamaServerFactory, ModelTooLargeError, PoolQueueFullError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

T = TypeVar("T")

A = ModelSpec(id="a", path=Path("/models/a.gguf"))
B = ModelSpec(id="b", path=Path("/models/b.gguf"))
C = ModelSpec(id="c", path=Path("/models/c.gguf"))
BIG = ModelSpec(id="big", path=Path("/models/big.gguf"))
SPECS = {"a": A, "b": B, "c": C}
SIZES = {"a": 60, "b": 60, "c": 30, "big": 200}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


def sizes(spec: ModelSpec, flags: tuple[str, ...]) -> int:
    return SIZES[spec.id]


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def workload(pool: ServerPool, names: str, hold: float = 0.05) -> list[str]:
    """Requests arriving together in this order; each holds its server for ``hold`` s."""
    served: list[str] = []

    async def one(name: str) -> None:
        async with pool.lease(SPECS[name]):
            served.append(name)
            await asyncio.sleep(hold)

    tasks = [asyncio.create_task(one(name)) for name in names]
    await asyncio.gather(*tasks)
    return served


@pytest.mark.parametrize("slots", [pytest.param(1, id="one-slot"), pytest.param(None, id="any")])
def test_abaacabc_loads_at_most_three_servers(slots: int | None) -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(slots=slots), start_delay=0.05)
        pool = ServerPool(factory, max_servers=1)
        served = await workload(pool, "ABAACABC".lower())
        assert sorted(served) == sorted("abaacabc")
        assert [m for m, _ in factory.starts] == ["a", "b", "c"]
        assert not any(s.stopped_while_busy for s in factory.servers)
        await pool.close()

    run(main())


def test_without_the_fair_share_the_same_workload_thrashes() -> None:
    # The attacking case: first come, first served (a share of 0) reloads for nearly every
    # request, which is what the scheduler exists to avoid.
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(slots=1), start_delay=0.05)
        pool = ServerPool(factory, max_servers=1, fair_share=0)
        await workload(pool, "abaacabc")
        assert len(factory.starts) > 3
        await pool.close()

    run(main())


def test_fairness_bound_a_waiting_model_is_not_starved() -> None:
    async def main() -> None:
        share = 4
        factory = FakeFactory(UpstreamBehaviour(slots=1))
        pool = ServerPool(factory, max_servers=1, fair_share=share)
        served: list[str] = []
        stop = asyncio.Event()

        async def hammer_a() -> None:
            while not stop.is_set():
                async with pool.lease(A):
                    served.append("a")
                    await asyncio.sleep(0.01)

        async with pool.lease(A):
            pass
        hammers = [asyncio.create_task(hammer_a()) for _ in range(3)]
        await eventually(lambda: len(served) > 5)
        before = len(served)
        async with pool.lease(B):
            served.append("b")
        stop.set()
        await asyncio.gather(*hammers)
        # Requests for A served while B waited: the bound, plus the ones already waiting or
        # running when B arrived (three clients, one slot).
        passed = served.index("b") - before
        assert passed <= share + 3, served
        await pool.close()

    run(main())


def test_the_queue_cap_is_the_models_whatever_its_flags() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(slots=1))
        pool = ServerPool(factory, max_servers=1, max_queue=2)
        held = await pool.acquire(A)
        waiting = [
            asyncio.create_task(pool.acquire(A, ("-c", str(1024 * (i + 1))))) for i in range(2)
        ]
        await asyncio.sleep(0.05)
        with pytest.raises(PoolQueueFullError, match="2 requests waiting"):
            await pool.acquire(A, ("-c", "4096"))
        assert pool.metrics.rejected.value("a", "queue_full") == 1
        held.release()
        for task in waiting:
            (await task).release()
        await pool.close()

    run(main())


def test_another_flag_set_makes_room_among_its_own_models_servers() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(slots=1))
        pool = ServerPool(factory, max_servers=2)
        async with pool.lease(B):
            pass
        async with pool.lease(A):
            pass  # B is now the least recently used server
        for ctx in ("1024", "2048", "4096"):
            async with pool.lease(A, ("-c", ctx)):
                pass
            served = {(i.model, i.flags) for i in pool.snapshot() if i.state == "ready"}
            assert ("b", ()) in served, served  # the other model is never evicted
            assert ("a", ("-c", ctx)) in served
        await pool.close()

    run(main())


def test_queue_is_bounded_per_model() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(slots=1))
        pool = ServerPool(factory, max_servers=2, max_queue=2)
        held = await pool.acquire(A)
        waiting = [asyncio.create_task(pool.acquire(A)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(PoolQueueFullError, match="2 requests waiting") as info:
            await pool.acquire(A)
        assert info.value.retry_after > 0
        # Another model has its own queue and concurrency.
        async with pool.lease(B):
            pass
        assert pool.metrics.rejected.value("a", "queue_full") == 1
        held.release()
        for task in waiting:
            (await task).release()
        await pool.close()

    run(main())


def test_concurrency_follows_the_servers_slots() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(slots=2))
        pool = ServerPool(factory)
        first = [await pool.acquire(A) for _ in range(2)]
        third = asyncio.create_task(pool.acquire(A))
        await asyncio.sleep(0.05)
        assert not third.done()
        assert pool.snapshot()[0].queued == 1
        first[0].release()
        (await third).release()
        first[1].release()
        await pool.close()

    run(main())


def test_memory_budget_evicts_an_idle_server_and_refuses_a_model_too_big() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory, max_servers=4, memory_budget=100, memory_estimate=sizes)
        async with pool.lease(A):
            pass
        async with pool.lease(C):  # 60 + 30 fits: both stay
            pass
        assert len(factory.live) == 2
        async with pool.lease(B):  # 60 + 30 + 60 does not: A (least recently used) goes
            pass
        assert sorted(s.name for s in factory.live) == ["b", "c"]
        assert pool.stats["evictions_memory"] == 1
        assert pool.metrics.evictions.value("a", "memory") == 1
        with pytest.raises(ModelTooLargeError, match="memory budget"):
            await pool.acquire(BIG)
        assert [m for m, _ in factory.starts] == ["a", "c", "b"]
        await pool.close()

    run(main())


def test_memory_admission_never_stops_a_loading_or_busy_server() -> None:
    async def main() -> None:
        factory = FakeFactory(start_delay=0.3)
        pool = ServerPool(factory, max_servers=4, memory_budget=100, memory_estimate=sizes)
        loading = asyncio.create_task(pool.acquire(A))
        await asyncio.sleep(0.05)
        b = asyncio.create_task(pool.acquire(B))
        lease_a = await loading  # A finished loading although B needed its memory
        assert factory.servers[0].running
        await asyncio.sleep(0.2)
        assert not b.done()  # A is busy: B waits
        assert factory.servers[0].running
        lease_a.release()
        (await b).release()
        assert not any(s.stopped_while_busy for s in factory.servers)
        await pool.close()

    run(main())


def test_provisional_estimate_reads_every_shard(tmp_path: Path) -> None:
    for i in (1, 2):
        (tmp_path / f"m-{i:05d}-of-00002.gguf").write_bytes(b"x" * 1000)
    (tmp_path / "one.gguf").write_bytes(b"x" * 1000)
    split = estimate_server_memory(ModelSpec(id="m", path=tmp_path / "m-00001-of-00002.gguf"))
    single = estimate_server_memory(ModelSpec(id="o", path=tmp_path / "one.gguf"))
    assert split - single == 1200
    assert estimate_server_memory(ModelSpec(id="x", path=tmp_path / "missing.gguf")) == 0


def test_wedged_server_is_restarted_and_counted() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory, probe_interval=0.05, probe_timeout=0.1, wedge_after=2)
        await pool.start()
        async with pool.lease(A):
            pass
        wedged = factory.servers[0]
        await asyncio.sleep(0.2)
        assert wedged.running  # healthy servers pass their probes
        wedged.wedge()
        await eventually(lambda: not wedged.running)
        assert pool.stats["wedges"] == 1
        assert pool.metrics.restarts.value("a", "wedge") == 1
        assert "stopped answering" in str(pool.snapshot()[0].last_error)
        async with pool.lease(A) as lease:
            assert lease.restarted
            assert lease.url == factory.servers[1].url
        await pool.close()

    run(main())


def test_crash_loop_restarts_back_off() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory)
        async with pool.lease(A):
            pass
        factory.servers[-1].crash()
        began = time.monotonic()
        async with pool.lease(A):  # first restart: at once
            pass
        assert time.monotonic() - began < 0.5
        factory.servers[-1].crash()
        began = time.monotonic()
        async with pool.lease(A):  # it keeps crashing: wait before starting it again
            pass
        assert time.monotonic() - began >= 0.9
        assert pool.metrics.restarts.value("a", "crash") == 2
        await pool.close()

    run(main())


# -- through the HTTP app ---------------------------------------------------------------------

MODELS = ModelsConfig({"a": A, "big": BIG})


def serving(pool: ServerPool, **options: Any) -> Any:
    return serve_pool(MODELS, pool, **options)


CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def test_full_queue_is_a_429_with_retry_after() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(slots=1, first_delay=0.5))
        pool = ServerPool(factory, max_queue=1)
        async with serving(pool) as s:
            running = asyncio.create_task(s.post("/v1/chat/completions", json=CHAT))
            await eventually(lambda: bool(factory.servers) and factory.servers[0].active == 1)
            queued = asyncio.create_task(s.post("/v1/chat/completions", json=CHAT))
            await eventually(lambda: pool.snapshot()[0].queued == 1)
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 429
                assert int(r.headers["Retry-After"]) >= 1
                error = (await r.json())["error"]
                assert error["code"] == "rate_limit_exceeded"
                assert "requests waiting" in error["message"]
            for task in (running, queued):
                resp = await task
                assert resp.status == 200
                resp.release()

    run(main())


def test_model_too_big_for_the_budget_is_a_4xx() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory, memory_budget=100, memory_estimate=sizes)
        async with (
            serving(pool) as s,
            s.post("/v1/chat/completions", json={**CHAT, "model": "big"}) as r,
        ):
            assert r.status == 400
            error = (await r.json())["error"]
            assert error["code"] == "model_too_large"
            assert "--memory-budget" in error["message"]
        assert factory.starts == []

    run(main())


def test_stall_mid_stream_restarts_the_server() -> None:
    async def main() -> None:
        factory = FakeFactory(UpstreamBehaviour(tokens=5, stall_after=2))
        pool = ServerPool(factory)
        async with serving(pool, stall_timeout=0.3) as s:
            async with s.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                text = (await r.read()).decode()
            assert "stalled" in text
            await eventually(lambda: not factory.servers[0].running)
            assert pool.stats["stalls"] == 1
            assert pool.metrics.restarts.value("a", "stall") == 1
            factory.behaviour.stall_after = None
            async with s.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                assert r.headers["X-Llama-Proc-Restarted"] == "crash"
            assert len(factory.starts) == 2

    run(main())


def test_real_llama_server_abaacabc_loads_three_times(
    llama_server_bin: Path, smol_model: Path
) -> None:
    # The same smoke GGUF under three names: three distinct servers for the pool.
    names = ("smol-a", "smol-b", "smol-c")
    options = {"ctx_size": 512, "threads": 1, "parallel": 1}
    models = ModelsConfig({n: ModelSpec(id=n, path=smol_model, options=options) for n in names})
    factory = LlamaServerFactory(binary=llama_server_bin, start_timeout=120)

    async def main() -> None:
        pool = ServerPool(factory, max_servers=1)
        async with serve_pool(models, pool) as s:

            async def one(name: str) -> int:
                body = {"model": name, "prompt": "Hi", "max_tokens": 4}
                async with s.post("/v1/completions", json=body) as r:
                    await r.read()
                    return r.status

            tasks = [asyncio.create_task(one(f"smol-{c}")) for c in "abaacabc"]
            assert await asyncio.gather(*tasks) == [200] * 8
            assert pool.stats["starts"] == 3
            assert pool.metrics.loads.value("smol-a") == 1

    asyncio.run(asyncio.wait_for(main(), 300))
