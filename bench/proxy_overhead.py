"""Proxy overhead: the same requests sent straight to llama-server and through ``llama-proc serve``.

Starts ``llama-proc serve`` as a subprocess with one model, lets it start its llama-server, then
talks to that very server both directly (its URL from ``GET /servers``) and through the proxy,
interleaving the two so drift and noise hit both equally:

* added latency: small non-streamed completions (1 token), p50/p99 of each path and of the
  paired differences;
* time to first token: streamed chat, time until the first content chunk;
* throughput at 1/8/32 concurrent clients: streamed chat (32 tokens each), requests/s and
  tokens/s for each path and their ratio.

    python bench/proxy_overhead.py --server-bin PATH --model PATH.gguf [--latency-n 300]

Both default to LLAMA_PROC_TEST_SERVER_BIN / LLAMA_PROC_TEST_MODEL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

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


async def bench(proxy: str, args: argparse.Namespace) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm up: start the server through the proxy, then find its direct URL.
        await one_completion(session, proxy)
        async with session.get(proxy + "/servers") as r:
            direct = (await r.json())["data"][0]["url"]
        for _ in range(20):
            await one_completion(session, direct)
            await one_completion(session, proxy)
        results: dict[str, Any] = {"direct_url": direct, "proxy_url": proxy}

        lat_d: list[float] = []
        lat_p: list[float] = []
        diffs: list[float] = []
        for i in range(args.latency_n):
            if i % 2:
                p = await one_completion(session, proxy)
                d = await one_completion(session, direct)
            else:
                d = await one_completion(session, direct)
                p = await one_completion(session, proxy)
            lat_d.append(d)
            lat_p.append(p)
            diffs.append(p - d)
        results["latency_ms"] = {
            "direct_p50": pct(lat_d, 50) * 1e3,
            "proxy_p50": pct(lat_p, 50) * 1e3,
            "direct_p99": pct(lat_d, 99) * 1e3,
            "proxy_p99": pct(lat_p, 99) * 1e3,
            "added_p50": (pct(lat_p, 50) - pct(lat_d, 50)) * 1e3,
            "added_p99": (pct(lat_p, 99) - pct(lat_d, 99)) * 1e3,
            "paired_diff_median": statistics.median(diffs) * 1e3,
            "n": args.latency_n,
        }

        ttft_d: list[float] = []
        ttft_p: list[float] = []
        for i in range(args.ttft_n):
            order = (direct, proxy) if i % 2 == 0 else (proxy, direct)
            for url in order:
                first, _ = await one_stream(session, url, 4)
                (ttft_d if url == direct else ttft_p).append(first)
        results["ttft_ms"] = {
            "direct_p50": pct(ttft_d, 50) * 1e3,
            "proxy_p50": pct(ttft_p, 50) * 1e3,
            "direct_p99": pct(ttft_d, 99) * 1e3,
            "proxy_p99": pct(ttft_p, 99) * 1e3,
            "n": args.ttft_n,
        }

        results["throughput"] = {}
        for clients in args.concurrency:
            total = max(args.requests_per_level, clients * 2)
            runs: dict[str, list[tuple[float, float, list[float]]]] = {"direct": [], "proxy": []}
            for r_i in range(args.rounds):
                order = ("direct", "proxy") if r_i % 2 == 0 else ("proxy", "direct")
                for name in order:
                    url = direct if name == "direct" else proxy
                    runs[name].append(await throughput(session, url, clients, total, args.tokens))
            d_rps = sum(x[0] for x in runs["direct"]) / args.rounds
            p_rps = sum(x[0] for x in runs["proxy"]) / args.rounds
            d_tps = sum(x[1] for x in runs["direct"]) / args.rounds
            p_tps = sum(x[1] for x in runs["proxy"]) / args.rounds
            results["throughput"][clients] = {
                "requests": total,
                "direct_rps": d_rps,
                "proxy_rps": p_rps,
                "direct_tok_s": d_tps,
                "proxy_tok_s": p_tps,
                "ratio_tok_s": p_tps / d_tps,
                # Time to first token under this load, every request of every round.
                "direct_ttft_p50_ms": pct([t for x in runs["direct"] for t in x[2]], 50) * 1e3,
                "proxy_ttft_p50_ms": pct([t for x in runs["proxy"] for t in x[2]], 50) * 1e3,
            }
    return results


def start_proxy(args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen[str], str]:
    config = tmp / "models.toml"
    extra = ["-c", str(args.ctx), "-t", str(args.threads), "-np", str(args.parallel)]
    config.write_text(
        f"[models.bench]\npath = {json.dumps(str(args.model))}\nextra_args = {json.dumps(extra)}\n"
    )
    cmd = [
        sys.executable, "-m", "llama_proc", "serve", "--config", str(config), "--port", "0",
        "--server-bin", str(args.server_bin), "--max-servers", "1",
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
    print(f"added latency (1-token completion, n={lat['n']} each, interleaved):")
    print(
        f"  p50 direct {lat['direct_p50']:.3f} ms  proxy {lat['proxy_p50']:.3f} ms  "
        f"added {lat['added_p50']:+.3f} ms  (median paired diff {lat['paired_diff_median']:+.3f})"
    )
    print(
        f"  p99 direct {lat['direct_p99']:.3f} ms  proxy {lat['proxy_p99']:.3f} ms  "
        f"added {lat['added_p99']:+.3f} ms"
    )
    ttft = results["ttft_ms"]
    print(f"time to first token (streamed chat, n={ttft['n']} each):")
    print(
        f"  p50 direct {ttft['direct_p50']:.2f} ms  proxy {ttft['proxy_p50']:.2f} ms  "
        f"p99 direct {ttft['direct_p99']:.2f} ms  proxy {ttft['proxy_p99']:.2f} ms"
    )
    print("throughput (streamed chat):")
    print("  clients  requests  direct tok/s  proxy tok/s  ratio   direct req/s  proxy req/s")
    for clients, t in results["throughput"].items():
        print(
            f"  {clients:>7}  {t['requests']:>8}  {t['direct_tok_s']:>12.1f}  "
            f"{t['proxy_tok_s']:>11.1f}  {t['ratio_tok_s']:.3f}  {t['direct_rps']:>12.2f}  "
            f"{t['proxy_rps']:>11.2f}"
        )
    print("time to first token under load (p50 over every streamed request):")
    for clients, t in results["throughput"].items():
        added = t["proxy_ttft_p50_ms"] - t["direct_ttft_p50_ms"]
        print(
            f"  {clients:>3} clients  direct {t['direct_ttft_p50_ms']:.2f} ms  "
            f"proxy {t['proxy_ttft_p50_ms']:.2f} ms  added {added:+.2f} ms"
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
    parser.add_argument("--proxy-url", help="benchmark an already running proxy instead")
    args = parser.parse_args()
    if args.proxy_url:
        results = asyncio.run(bench(args.proxy_url.rstrip("/"), args))
        report(results)
        return 0
    if not args.server_bin or not args.model:
        parser.error("--server-bin and --model are required (or the LLAMA_PROC_TEST_* variables)")
    with tempfile.TemporaryDirectory(prefix="llama-proc-bench-") as tmp:
        proc, url = start_proxy(args, Path(tmp))
        try:
            results = asyncio.run(bench(url, args))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
