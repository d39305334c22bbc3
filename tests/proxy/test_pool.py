"""ServerPool with an in-process fake llama-server: keys, on-demand start, eviction, TTL, crashes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from proxy_fakes import FakeFactory

from llama_proc.errors import InvalidArgumentError, ServerStartError
from llama_proc.proxy.flag_checker import normalize_flags
from llama_proc.proxy.models_config import ModelSpec
from llama_proc.proxy.pool import ServerPool, server_key
from llama_proc.proxy.servers import PoolBusyError, PoolClosedError

if TYPE_CHECKING:
    from collections.abc import Coroutine

T = TypeVar("T")

A = ModelSpec(id="a", path=Path("/models/a.gguf"))
B = ModelSpec(id="b", path=Path("/models/b.gguf"))
C = ModelSpec(id="c", path=Path("/models/c.gguf"))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_server_key_is_stable_and_flag_sensitive() -> None:
    assert server_key("a", ()) == server_key("a", ())
    assert server_key("a", ()) != server_key("b", ())
    assert server_key("a", ("-c", "512")) != server_key("a", ())
    # Pinned value: the key must not change between processes or releases.
    assert server_key("a", ("-c", "512")) == "42c160df4002f56c"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(["-t", "2", "-c", "512"], ("-c", "512", "-t", "2"), id="sorted"),
        pytest.param(["--ctx-size=512"], ("-c", "512"), id="equals-split"),
        pytest.param(["--ctx-size", "8", "--threads", "2"], ("-c", "8", "-t", "2"), id="alias"),
        pytest.param(["--no-jinja", "-fa", "on"], ("-fa", "on", "--no-jinja"), id="negation"),
        pytest.param(["--temp", "-0.5", "-c", "1"], ("-c", "1", "--temp", "-0.5"), id="negative"),
        pytest.param([], (), id="empty"),
    ],
)
def test_normalize_flags(given: list[str], expected: Any) -> None:
    assert normalize_flags(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(["-c", "1", "--ctx-size", "2"], id="alias-twice"),
        pytest.param(["--jinja", "--no-jinja"], id="negation"),
        pytest.param(["-nocb", "--cont-batching"], id="short-negation"),
        pytest.param(["--temp", "1", "--temp", "2"], id="repeat"),
    ],
)
def test_normalize_flags_refuses_repeats(given: list[str]) -> None:
    with pytest.raises(InvalidArgumentError, match="same option"):
        normalize_flags(given)


def test_concurrent_first_requests_start_one_server() -> None:
    async def main() -> None:
        factory = FakeFactory(start_delay=0.2)
        pool = ServerPool(factory, max_servers=2)
        await pool.start()
        leases = await asyncio.gather(*(pool.acquire(A) for _ in range(20)))
        assert len(factory.starts) == 1
        assert len({lease.url for lease in leases}) == 1
        assert pool.snapshot()[0].active == 20
        for lease in leases:
            lease.release()
        assert pool.snapshot()[0].active == 0
        await pool.close()
        assert factory.live == []

    run(main())


def test_flags_pick_distinct_servers() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory, max_servers=3)
        async with pool.lease(A) as l1, pool.lease(A, ("-c", "512")) as l2:
            assert l1.url != l2.url
            assert l1.key != l2.key
        async with pool.lease(A, ("-c", "512")) as l3:
            assert l3.url == l2.url
        assert factory.starts == [("a", ()), ("a", ("-c", "512"))]
        await pool.close()

    run(main())


def test_lru_eviction_of_idle_server() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory, max_servers=2)
        for spec in (A, B, A, C):  # B is least recently used when C needs a slot
            async with pool.lease(spec):
                pass
        states = {i.model: i.state for i in pool.snapshot()}
        assert states == {"a": "ready", "b": "stopped", "c": "ready"}
        assert pool.stats["evictions_lru"] == 1
        assert [s.name for s in factory.live] == ["a", "c"]
        await pool.close()

    run(main())


def test_eviction_never_stops_a_busy_server() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory, max_servers=1)
        lease_a = await pool.acquire(A)
        server_a = factory.servers[0]
        server_a.active = 1  # the fake records a stop during a request as stopped_while_busy
        waiting_b = asyncio.create_task(pool.acquire(B))
        await asyncio.sleep(0.2)
        assert not waiting_b.done()
        assert server_a.running
        info_a = next(i for i in pool.snapshot() if i.model == "a")
        assert info_a.draining
        # A draining server takes no new requests: they queue behind B.
        waiting_a2 = asyncio.create_task(pool.acquire(A))
        await asyncio.sleep(0.1)
        assert not waiting_a2.done()
        server_a.active = 0
        lease_a.release()
        lease_b = await waiting_b
        assert not server_a.running
        assert not server_a.stopped_while_busy
        assert not waiting_a2.done()
        lease_b.release()
        lease_a2 = await waiting_a2
        lease_a2.release()
        assert [s for s, _ in factory.starts] == ["a", "b", "a"]
        await pool.close()

    run(main())


def test_queue_timeout_raises_busy_and_undrains() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory, max_servers=1, queue_timeout=0.3)
        lease_a = await pool.acquire(A)
        with pytest.raises(PoolBusyError, match="no server slot for 'b'"):
            await pool.acquire(B)
        info = pool.snapshot()[0]
        assert info.model == "a"
        assert not info.draining  # nobody waits any more: A keeps serving
        lease_a.release()
        async with pool.lease(A):
            pass
        assert len(factory.starts) == 1
        await pool.close()

    run(main())


def test_idle_ttl_unloads_and_next_request_restarts() -> None:
    async def main() -> None:
        clock = Clock()
        factory = FakeFactory()
        pool = ServerPool(factory, idle_ttl=60, clock=clock)
        async with pool.lease(A):
            pass
        clock.now += 59
        pool.reap()
        assert factory.live
        clock.now += 2
        pool.reap()
        await asyncio.sleep(0.05)
        assert factory.live == []
        assert pool.stats["evictions_idle"] == 1
        async with pool.lease(A):
            pass
        assert len(factory.starts) == 2
        await pool.close()

    run(main())


def test_idle_ttl_per_model_and_reaper_task() -> None:
    async def main() -> None:
        factory = FakeFactory()
        quick = ModelSpec(id="quick", path=Path("/q.gguf"), idle_ttl=0.2)
        pool = ServerPool(factory, max_servers=2, idle_ttl=0)
        await pool.start()
        async with pool.lease(quick):
            pass
        async with pool.lease(A):
            pass
        await asyncio.sleep(1.0)
        assert [s.name for s in factory.live] == ["a"]
        await pool.close()

    run(main())


def test_crashed_server_is_reported_and_restarted() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory)
        async with pool.lease(A) as lease:
            assert not lease.restarted
        factory.servers[0].crash()
        async with pool.lease(A) as lease:
            assert lease.restarted
            assert lease.url == factory.servers[1].url
        info = pool.snapshot()[0]
        assert info.crashes == 1
        assert info.starts == 2
        assert "exited unexpectedly (exit code -9)" in str(info.last_error)
        assert pool.stats["crashes"] == 1
        await pool.close()

    run(main())


def test_start_failure_reaches_every_waiter_then_retries() -> None:
    async def main() -> None:
        factory = FakeFactory(start_delay=0.1, fail=1)
        pool = ServerPool(factory)
        results = await asyncio.gather(*(pool.acquire(A) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, ServerStartError) for r in results)
        assert len(factory.starts) == 1
        info = pool.snapshot()[0]
        assert info.state == "stopped"
        assert str(info.last_error).startswith("failed to start")
        async with pool.lease(A):
            pass
        assert len(factory.starts) == 2
        await pool.close()

    run(main())


def test_close_stops_everything_and_refuses_new_requests() -> None:
    async def main() -> None:
        factory = FakeFactory(start_delay=0.3)
        pool = ServerPool(factory, max_servers=2)
        async with pool.lease(A):
            pass
        starting = asyncio.create_task(pool.acquire(B))
        await asyncio.sleep(0.1)
        await pool.close()
        with pytest.raises(PoolClosedError):
            await starting
        assert factory.live == []
        with pytest.raises(PoolClosedError):
            await pool.acquire(A)

    run(main())


def test_remove_refuses_busy_server_unless_forced() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory)
        lease = await pool.acquire(A)
        with pytest.raises(PoolBusyError, match="1 request"):
            await pool.remove(lease.key)
        assert await pool.remove("nope") is False
        assert await pool.remove(lease.key, force=True) is True
        assert factory.live == []
        lease.release()
        assert pool.snapshot() == []
        await pool.close()

    run(main())


def test_eviction_under_load_two_models_one_slot() -> None:
    async def main() -> None:
        factory = FakeFactory(start_delay=0.01)
        pool = ServerPool(factory, max_servers=1)
        order: list[str] = []

        async def client(spec: ModelSpec, n: int) -> None:
            for _ in range(n):
                async with pool.lease(spec) as lease:
                    assert len(factory.live) == 1
                    order.append(spec.id)
                    server = next(s for s in factory.servers if s.url == lease.url)
                    server.active += 1
                    await asyncio.sleep(0.005)
                    server.active -= 1

        await asyncio.gather(*(client(A if i % 2 else B, 10) for i in range(8)))
        assert len(order) == 80
        assert not any(s.stopped_while_busy for s in factory.servers)
        assert pool.stats["evictions_lru"] >= 1
        await pool.close()

    run(main())
