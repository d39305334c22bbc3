"""Replay one skewed request trace against real llama-servers under three scheduling policies.

The same trace (many model ids with Zipf-like popularity, in bursts) goes through a
:class:`~llama_proc.proxy.pool.ServerPool` three times, each time with fresh servers:

* ``ours``: a memory budget kept against measured use, victims by expected reload cost
  (load time x chance of being asked again soon), a minimum residency bounded by a wait;
* ``lru-count``: at most K servers, the least recently used idle one goes (a router's
  ``--models-max``);
* ``fifo``: at most K servers, the one loaded longest ago goes (swap on demand).

K is how many servers the memory budget holds on average, so the three have the same room.
The model ids are one GGUF under several names with different context sizes, so their memory
differs. Each request asks for two tokens; its wait is the time until the pool hands it a
server (the load included). Memory high-water mark: the servers' PSS summed, sampled every
50 ms. Prints loads per 1,000 requests, p50/p99 wait and the high-water mark side by side.

    LLAMA_PROC_TEST_SERVER_BIN=... LLAMA_PROC_TEST_MODEL=... python bench/schedule_trace.py
    python bench/schedule_trace.py --binary llama-server --model smol.gguf --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_proc.proxy.budget import estimate_server_memory
from llama_proc.proxy.measure import host_memory
from llama_proc.proxy.models_config import ModelSpec
from llama_proc.proxy.pool import ServerPool
from llama_proc.proxy.scheduler import by_expected_cost, by_fifo, by_lru
from llama_proc.proxy.servers import LlamaServerFactory

CONTEXTS = (256, 512, 1024, 2048)


def make_models(model: Path, count: int) -> list[ModelSpec]:
    """``count`` ids for one GGUF; context sizes cycle so memory differs between them."""
    return [
        ModelSpec(
            id=f"m{i:02d}",
            path=model,
            options={"ctx_size": CONTEXTS[i % len(CONTEXTS)], "threads": 1, "parallel": 1},
        )
        for i in range(count)
    ]


def make_trace(
    models: list[ModelSpec], requests: int, seed: int, zipf: float
) -> list[tuple[float, ModelSpec]]:
    """(arrival second, model): Zipf popularity, half the requests in bursts of 4-12."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** zipf for rank in range(len(models))]
    out: list[tuple[float, ModelSpec]] = []
    now = 0.0
    while len(out) < requests:
        spec = rng.choices(models, weights)[0]
        if rng.random() < 0.15:  # a burst: one model asked many times at once
            out.extend((now + rng.random() * 0.05, spec) for _ in range(rng.randint(4, 12)))
        else:
            out.append((now, spec))
        now += rng.expovariate(8.0)
    return sorted(out[:requests], key=lambda item: item[0])


async def _ask(session: Any, url: str, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"prompt": "Hi", "n_predict": 2}
    async with session.post(url + "/completion", json=body, headers=headers) as resp:
        await resp.read()


async def replay(
    name: str, pool: ServerPool, trace: list[tuple[float, ModelSpec]]
) -> dict[str, float]:
    import aiohttp

    waits: list[float] = []
    failures = 0
    peak = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            pids = [i.pid for i in pool.snapshot() if i.pid and i.state != "stopped"]
            peak = max(peak, sum(host_memory(p) or 0 for p in pids))
            await asyncio.sleep(0.05)

    async def one(at: float, spec: ModelSpec, began: float, session: Any) -> None:
        nonlocal failures
        await asyncio.sleep(max(0.0, began + at - time.monotonic()))
        asked = time.monotonic()
        try:
            async with pool.lease(spec) as lease:
                waits.append(time.monotonic() - asked)
                await _ask(session, lease.url, lease.api_key)
        except Exception as err:  # noqa: BLE001 - counted and reported, the replay goes on
            failures += 1
            print(f"  {name}: {spec.id}: {err}", file=sys.stderr)

    await pool.start()
    sampler = asyncio.create_task(sample())
    began = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(one(at, spec, began, session) for at, spec in trace))
    wall = time.monotonic() - began
    stop.set()
    await sampler
    await pool.close()
    waits.sort()
    loads = pool.stats["starts"]
    return {
        "loads": loads,
        "per_1000": 1000 * loads / len(trace),
        "p50": statistics.median(waits) if waits else float("nan"),
        "p99": waits[min(len(waits) - 1, int(0.99 * len(waits)))] if waits else float("nan"),
        "peak_mib": peak / 2**20,
        "failures": failures,
        "wall": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, default=os.environ.get("LLAMA_PROC_TEST_SERVER_BIN"))
    parser.add_argument("--model", type=Path, default=os.environ.get("LLAMA_PROC_TEST_MODEL"))
    parser.add_argument("--models", type=int, default=10, help="model ids (default: 10)")
    parser.add_argument("--requests", type=int, default=200, help="requests (default: 200)")
    parser.add_argument("--fit", type=float, default=3.0, help="servers the budget holds")
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--min-residency", type=float, default=2.0)
    parser.add_argument("--residency-wait", type=float, default=1.0)
    parser.add_argument("--policies", default="ours,lru-count,fifo")
    args = parser.parse_args()
    if args.binary is None or args.model is None:
        parser.error("give --binary and --model (or LLAMA_PROC_TEST_SERVER_BIN/_MODEL)")
    models = make_models(args.model, args.models)
    trace = make_trace(models, args.requests, args.seed, args.zipf)
    estimates = [estimate_server_memory(m) for m in models]
    budget = int(statistics.mean(estimates) * args.fit)
    room = max(1, round(args.fit))
    counts: dict[str, int] = {}
    for _, spec in trace:
        counts[spec.id] = counts.get(spec.id, 0) + 1
    print(
        f"{len(trace)} requests over {trace[-1][0]:.1f} s, {len(models)} ids "
        f"(requests per id: {', '.join(str(counts.get(m.id, 0)) for m in models)}); "
        f"budget {budget / 2**20:.0f} MiB (~{args.fit:g} servers by estimate), K = {room}"
    )
    factory = LlamaServerFactory(binary=args.binary, start_timeout=120)
    pools = {
        "ours": lambda: ServerPool(
            factory,
            max_servers=len(models),
            memory_budget=budget,
            victim_policy=by_expected_cost,
            min_residency=args.min_residency,
            residency_wait=args.residency_wait,
            probe_interval=0,
        ),
        "lru-count": lambda: ServerPool(
            factory, max_servers=room, victim_policy=by_lru, probe_interval=0
        ),
        "fifo": lambda: ServerPool(
            factory, max_servers=room, victim_policy=by_fifo, probe_interval=0
        ),
    }
    results = {}
    for name in args.policies.split(","):
        results[name] = asyncio.run(replay(name, pools[name](), trace))
    print(f"\n{'policy':<10} {'loads':>6} {'/1000 req':>10} {'p50 wait':>10} {'p99 wait':>10} "
          f"{'mem peak':>10} {'failed':>7} {'wall':>7}")  # fmt: skip
    for name, r in results.items():
        print(
            f"{name:<10} {r['loads']:>6.0f} {r['per_1000']:>10.0f} {r['p50'] * 1000:>8.0f}ms "
            f"{r['p99'] * 1000:>8.0f}ms {r['peak_mib']:>7.0f}MiB {r['failures']:>7.0f} "
            f"{r['wall']:>6.1f}s"
        )
    print(f"(budget {budget / 2**20:.0f} MiB; 'ours' keeps within it by measured PSS)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
