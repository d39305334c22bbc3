"""Proxy overhead: the same requests sent straight to llama-server and through ``llama-proc serve``.

Starts ``llama-proc serve`` as a subprocess with one model, lets it start its llama-server, then
talks to that very server both directly (its URL from ``GET /servers``) and through the proxy,
interleaving the two so drift and noise hit both equally:

* added latency: small non-streamed completions (1 token), p50/p99 of each path and of the
  paired differences;
* time to first token: streamed chat, time until the first content chunk;
* throughput at 1/8/32 concurrent clients: streamed chat (32 tokens each), requests/s and
  tokens/s for each path and their ratio;
* the floor: the same 1-token completions through a bare TCP relay (a process that copies
  bytes both ways and does nothing else, on uvloop when installed), interleaved with the other
  two paths: what any extra process on the path costs on this machine;
* the proxy's own time per request, read from its ``llama_proc_proxy_overhead_seconds``
  histogram (its time up to the first response byte, the waits for llama-server left out): at
  32 clients the end-to-end difference is llama-server's queue order, this is what the proxy
  itself added.

With ``--event-loops asyncio,uvloop`` (the default when uvloop is installed) the whole run is
repeated on a proxy serving on each loop, alternating the loops round by round
(``--loop-rounds``), so both are measured in the same run under the same drift.

    python bench/proxy_overhead.py --server-bin PATH --model PATH.gguf [--latency-n 300]

Both default to LLAMA_PROC_TEST_SERVER_BIN / LLAMA_PROC_TEST_MODEL.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from llama_proc.proxy.options import event_loop_factory

ROOT = Path(__file__).resolve().parents[1]

COMPLETION = {"prompt": "Hello", "max_tokens": 1, "temperature": 0, "cache_prompt": True}


def chat(tokens: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "Count from one to one hundred."}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_completion(session: aiohttp.ClientSession, url: str) -> float:
    began = time.perf_counter()
    async with session.post(url + "/v1/completions", json=COMPLETION) as r:
        await r.read()
        assert r.status == 200, r.status
    return time.perf_counter() - began


async def one_stream(session: aiohttp.ClientSession, url: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, content chunks received)."""
    began = time.perf_counter()
    first = 0.0
    count = 0
    # llama-server closes its side after an event stream (while advertising keep-alive), so a
    # streamed request must not reuse a pooled connection; both paths pay the same reconnect.
    headers = {"Connection": "close"}
    async with session.post(url + "/v1/chat/completions", json=chat(tokens), headers=headers) as r:
        assert r.status == 200, r.status
        buffer = b""
        async for piece in r.content.iter_any():
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if b'"content"' in event and b'"delta":{}' not in event:
                    if not count:
                        first = time.perf_counter() - began
                    count += 1
    return first, count


async def throughput(
    session: aiohttp.ClientSession, url: str, clients: int, total: int, tokens: int
) -> tuple[float, float, list[float]]:
    """(requests/s, tokens/s, each request's time to first token) over ``clients`` workers."""
    remaining = total
    produced = 0
    firsts: list[float] = []

    async def worker() -> None:
        nonlocal remaining, produced
        while remaining > 0:
            remaining -= 1
            first, count = await one_stream(session, url, tokens)
            produced += count
            firsts.append(first)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - began
    return total / wall, produced / wall, firsts


_OVERHEAD = re.compile(
    r'^llama_proc_proxy_overhead_seconds_(bucket|sum|count)\{model="bench"(?:,le="([^"]+)")?\} (\S+)$'
)


async def overhead(session: aiohttp.ClientSession, proxy: str) -> dict[str, float]:
    """The proxy's overhead histogram now: {"sum": s, "count": n, "le=<bound>": cumulative}."""
    async with session.get(proxy + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _OVERHEAD.match(line)
        if match:
            kind, bound, value = match.groups()
            out[f"le={bound}" if kind == "bucket" else kind] = float(value)
    return out


def overhead_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean and p50 (from the buckets, linear within one) of the observations in between."""
    count = after.get("count", 0) - before.get("count", 0)
    if count <= 0:
        return {"n": 0}
    mean = (after["sum"] - before.get("sum", 0)) / count
    bounds = sorted(
        (float(k[3:]), after[k] - before.get(k, 0)) for k in after if k.startswith("le=")
    )
    half, lower, below = count / 2, 0.0, 0.0
    p50 = math.nan
    for bound, cumulative in bounds:
        if cumulative >= half:
            inside = cumulative - below
            p50 = (
                bound
                if math.isinf(bound) or not inside
                else (lower + (bound - lower) * (half - below) / inside)
            )
            break
        lower, below = bound, cumulative
    return {"n": count, "mean_ms": mean * 1e3, "p50_ms": p50 * 1e3}


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection: bytes received are written to the other side."""

    def __init__(self, peer: _Pipe | None = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)  # the other side is still connecting

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def relay(target: str) -> None:
    """Serve a bare TCP relay to ``target`` (host:port); print the port, run until killed."""
    host, port = target.rsplit(":", 1)
    loop = asyncio.get_running_loop()

    def accepted() -> _Pipe:
        # Bytes from the client wait in ``client.pending`` until the upstream is connected.
        client = _Pipe()
        upstream = _Pipe(client)
        client.peer = upstream

        async def connect() -> None:
            await loop.create_connection(lambda: upstream, host, int(port))
            assert upstream.transport is not None
            for data in client.pending:
                upstream.transport.write(data)
            client.pending.clear()

        loop.create_task(connect())  # noqa: RUF006 - lives as long as the process
        return client

    server = await loop.create_server(accepted, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def start_relay(direct: str) -> tuple[subprocess.Popen[str], str]:
    """A bare relay process in front of ``direct``; (process, its URL)."""
    target = direct.split("//", 1)[1]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--relay-to", target], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, f"http://127.0.0.1:{int(proc.stdout.readline())}"


async def bench(proxy: str, args: argparse.Namespace) -> dict[str, Any]:
    """One proxy's raw samples: latencies, TTFTs, throughput runs and its own time per level."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm up: start the server through the proxy, then find its direct URL.
        await one_completion(session, proxy)
        async with session.get(proxy + "/servers") as r:
            direct = (await r.json())["data"][0]["url"]
        relay_proc, relayed = start_relay(direct)
        try:
            paths = {"direct": direct, "relay": relayed, "proxy": proxy}
            for _ in range(20):
                for url in paths.values():
                    await one_completion(session, url)
            lat: dict[str, list[float]] = {name: [] for name in paths}
            own_before = await overhead(session, proxy)
            # Every order of the three paths in turn, so none always follows another.
            orders = list(itertools.permutations(paths))
            for i in range(args.latency_n):
                for one in orders[i % len(orders)]:
                    lat[one].append(await one_completion(session, paths[one]))
        finally:
            relay_proc.kill()
            relay_proc.wait()
        results: dict[str, Any] = {
            "latency": (
                lat["direct"],
                lat["proxy"],
                [p - d for p, d in zip(lat["proxy"], lat["direct"], strict=True)],
            ),
            "relay": (
                lat["relay"],
                [r - d for r, d in zip(lat["relay"], lat["direct"], strict=True)],
            ),
            "latency_own": overhead_between(own_before, await overhead(session, proxy)),
        }

        ttft_d: list[float] = []
        ttft_p: list[float] = []
        for i in range(args.ttft_n):
            order = (direct, proxy) if i % 2 == 0 else (proxy, direct)
            for url in order:
                first, _ = await one_stream(session, url, 4)
                (ttft_d if url == direct else ttft_p).append(first)
        results["ttft"] = (ttft_d, ttft_p)

        results["throughput"] = {}
        for clients in args.concurrency:
            total = max(args.requests_per_level, clients * 2)
            runs: dict[str, list[tuple[float, float, list[float]]]] = {"direct": [], "proxy": []}
            own: list[dict[str, float]] = []
            for r_i in range(args.rounds):
                order = ("direct", "proxy") if r_i % 2 == 0 else ("proxy", "direct")
                for name in order:
                    url = direct if name == "direct" else proxy
                    before = await overhead(session, proxy) if name == "proxy" else {}
                    runs[name].append(await throughput(session, url, clients, total, args.tokens))
                    if name == "proxy":
                        own.append(overhead_between(before, await overhead(session, proxy)))
            results["throughput"][clients] = (total, runs, own)
    return results


def _own(parts: list[dict[str, float]]) -> dict[str, float]:
    """Pool per-round overhead summaries (n-weighted mean; the median of the p50s)."""
    parts = [p for p in parts if p.get("n")]
    if not parts:
        return {"n": 0, "mean_ms": math.nan, "p50_ms": math.nan}
    n = sum(p["n"] for p in parts)
    return {
        "n": n,
        "mean_ms": sum(p["mean_ms"] * p["n"] for p in parts) / n,
        "p50_ms": statistics.median(p["p50_ms"] for p in parts),
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One event loop's figures over every round it ran."""
    lat_d = [x for r in rounds for x in r["latency"][0]]
    lat_p = [x for r in rounds for x in r["latency"][1]]
    diffs = [x for r in rounds for x in r["latency"][2]]
    out: dict[str, Any] = {
        "latency_ms": {
            "direct_p50": pct(lat_d, 50) * 1e3,
            "proxy_p50": pct(lat_p, 50) * 1e3,
            "direct_p99": pct(lat_d, 99) * 1e3,
            "proxy_p99": pct(lat_p, 99) * 1e3,
            "added_p50": (pct(lat_p, 50) - pct(lat_d, 50)) * 1e3,
            "added_p99": (pct(lat_p, 99) - pct(lat_d, 99)) * 1e3,
            "paired_diff_median": statistics.median(diffs) * 1e3,
            "n": len(diffs),
            "own": _own([r["latency_own"] for r in rounds]),
        }
    }
    relayed = [x for r in rounds for x in r["relay"][0]]
    out["latency_ms"]["relay_p50"] = pct(relayed, 50) * 1e3
    out["latency_ms"]["relay_added_p50"] = (pct(relayed, 50) - pct(lat_d, 50)) * 1e3
    out["latency_ms"]["relay_paired_diff_median"] = (
        statistics.median(x for r in rounds for x in r["relay"][1]) * 1e3
    )
    ttft_d = [x for r in rounds for x in r["ttft"][0]]
    ttft_p = [x for r in rounds for x in r["ttft"][1]]
    out["ttft_ms"] = {
        "direct_p50": pct(ttft_d, 50) * 1e3,
        "proxy_p50": pct(ttft_p, 50) * 1e3,
        "direct_p99": pct(ttft_d, 99) * 1e3,
        "proxy_p99": pct(ttft_p, 99) * 1e3,
        "n": len(ttft_d),
    }
    out["throughput"] = {}
    for clients in rounds[0]["throughput"]:
        runs: dict[str, list[tuple[float, float, list[float]]]] = {"direct": [], "proxy": []}
        own: list[dict[str, float]] = []
        for r in rounds:
            total, got, got_own = r["throughput"][clients]
            runs["direct"] += got["direct"]
            runs["proxy"] += got["proxy"]
            own += got_own
        count = len(runs["direct"])
        d_tps = sum(x[1] for x in runs["direct"]) / count
        p_tps = sum(x[1] for x in runs["proxy"]) / count
        out["throughput"][clients] = {
            "requests": total,
            "direct_rps": sum(x[0] for x in runs["direct"]) / count,
            "proxy_rps": sum(x[0] for x in runs["proxy"]) / count,
            "direct_tok_s": d_tps,
            "proxy_tok_s": p_tps,
            "ratio_tok_s": p_tps / d_tps,
            # Time to first token under this load, every request of every round.
            "direct_ttft_p50_ms": pct([t for x in runs["direct"] for t in x[2]], 50) * 1e3,
            "proxy_ttft_p50_ms": pct([t for x in runs["proxy"] for t in x[2]], 50) * 1e3,
            "own": _own(own),
        }
    return out


def start_proxy(
    args: argparse.Namespace, tmp: Path, loop: str
) -> tuple[subprocess.Popen[str], str]:
    config = tmp / "models.toml"
    extra = ["-c", str(args.ctx), "-t", str(args.threads), "-np", str(args.parallel)]
    config.write_text(
        f"[models.bench]\npath = {json.dumps(str(args.model))}\nextra_args = {json.dumps(extra)}\n"
    )
    cmd = [
        sys.executable, "-m", "llama_proc", "serve", "--config", str(config), "--port", "0",
        "--server-bin", str(args.server_bin), "--max-servers", "1", "--event-loop", loop,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        proc.kill()
        msg = f"proxy did not start: {line!r}"
        raise SystemExit(msg)
    return proc, match.group(1)


def report(results: dict[str, Any]) -> None:
    lat = results["latency_ms"]
    own = lat["own"]
    print(f"  added latency (1-token completion, n={lat['n']} each, interleaved):")
    print(
        f"    p50 direct {lat['direct_p50']:.3f} ms  proxy {lat['proxy_p50']:.3f} ms  "
        f"added {lat['added_p50']:+.3f} ms  (median paired diff {lat['paired_diff_median']:+.3f})"
    )
    print(
        f"    p99 direct {lat['direct_p99']:.3f} ms  proxy {lat['proxy_p99']:.3f} ms  "
        f"added {lat['added_p99']:+.3f} ms"
    )
    print(
        f"    floor (a bare TCP relay): p50 {lat['relay_p50']:.3f} ms  added "
        f"{lat['relay_added_p50']:+.3f} ms  (median paired diff "
        f"{lat['relay_paired_diff_median']:+.3f}); the proxy over the relay: "
        f"{lat['proxy_p50'] - lat['relay_p50']:+.3f} ms"
    )
    print(f"    proxy's own time: p50 {own['p50_ms']:.3f} ms  mean {own['mean_ms']:.3f} ms")
    ttft = results["ttft_ms"]
    print(f"  time to first token (streamed chat, n={ttft['n']} each):")
    print(
        f"    p50 direct {ttft['direct_p50']:.2f} ms  proxy {ttft['proxy_p50']:.2f} ms  "
        f"p99 direct {ttft['direct_p99']:.2f} ms  proxy {ttft['proxy_p99']:.2f} ms"
    )
    print("  throughput (streamed chat):")
    print("    clients  requests  direct tok/s  proxy tok/s  ratio   direct req/s  proxy req/s")
    for clients, t in results["throughput"].items():
        print(
            f"    {clients:>7}  {t['requests']:>8}  {t['direct_tok_s']:>12.1f}  "
            f"{t['proxy_tok_s']:>11.1f}  {t['ratio_tok_s']:.3f}  {t['direct_rps']:>12.2f}  "
            f"{t['proxy_rps']:>11.2f}"
        )
    print("  time to first token under load (p50 over every streamed request), and the proxy's")
    print("  own time per request from its overhead histogram:")
    for clients, t in results["throughput"].items():
        added = t["proxy_ttft_p50_ms"] - t["direct_ttft_p50_ms"]
        print(
            f"    {clients:>3} clients  direct {t['direct_ttft_p50_ms']:.2f} ms  "
            f"proxy {t['proxy_ttft_p50_ms']:.2f} ms  added {added:+.2f} ms  "
            f"proxy's own p50 {t['own']['p50_ms']:.3f} ms mean {t['own']['mean_ms']:.3f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server-bin", type=Path, default=os.environ.get("LLAMA_PROC_TEST_SERVER_BIN")
    )
    parser.add_argument("--model", type=Path, default=os.environ.get("LLAMA_PROC_TEST_MODEL"))
    parser.add_argument("--latency-n", type=int, default=300)
    parser.add_argument("--ttft-n", type=int, default=40)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 32])  # fmt: skip
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=4096)
    # Leave cores for the proxy and the load generator: llama.cpp's worker threads spin, and
    # an oversubscribed CPU turns every measurement into scheduler noise.
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--event-loops",
        type=lambda s: s.split(","),
        default=None,
        help="loops to serve on, compared in one run (default: asyncio,uvloop when uvloop is "
        "installed, else asyncio)",
    )
    parser.add_argument(
        "--loop-rounds", type=int, default=2, help="proxies started per loop, alternating loops"
    )
    parser.add_argument("--proxy-url", help="benchmark an already running proxy instead")
    parser.add_argument("--relay-to", help=argparse.SUPPRESS)  # the relay process's own mode
    args = parser.parse_args()
    if args.relay_to:
        _, factory = event_loop_factory()
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(relay(args.relay_to))
        return 0
    if args.proxy_url:
        report(summarize([asyncio.run(bench(args.proxy_url.rstrip("/"), args))]))
        return 0
    if not args.server_bin or not args.model:
        parser.error("--server-bin and --model are required (or the LLAMA_PROC_TEST_* variables)")
    loops: list[str] = args.event_loops or (
        ["asyncio", "uvloop"] if importlib.util.find_spec("uvloop") else ["asyncio"]
    )
    raw: dict[str, list[dict[str, Any]]] = {loop: [] for loop in loops}
    with tempfile.TemporaryDirectory(prefix="llama-proc-bench-") as tmp:
        for r_i in range(args.loop_rounds):
            for loop in loops if r_i % 2 == 0 else loops[::-1]:
                proc, url = start_proxy(args, Path(tmp), loop)
                try:
                    raw[loop].append(asyncio.run(bench(url, args)))
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
    results = {loop: summarize(rounds) for loop, rounds in raw.items()}
    for loop, figures in results.items():
        print(f"{loop} event loop ({args.loop_rounds} proxies):")
        report(figures)
    if len(loops) > 1:
        base = results[loops[0]]
        for loop in loops[1:]:
            other = results[loop]
            print(
                f"{loop} vs {loops[0]}: added p50 {other['latency_ms']['added_p50']:+.3f} vs "
                f"{base['latency_ms']['added_p50']:+.3f} ms, proxy's own p50 "
                f"{other['latency_ms']['own']['p50_ms']:.3f} vs "
                f"{base['latency_ms']['own']['p50_ms']:.3f} ms"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
