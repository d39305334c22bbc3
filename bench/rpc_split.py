"""What an RPC split costs: one model on one llama-server vs the same model over RPC workers.

Starts N real rpc-server workers on loopback through :class:`llama_proc.runtime.rpc.RpcWorker`,
then alternates two llama-servers (never both up at once, so they do not compete for cores):
one with the whole model local, one with ``--rpc`` and ``-ngl 99`` so every layer sits on the
workers. For each it records load time and, over a few rounds, prompt and generation tokens/s
from llama-server's own timings. Loopback has no network latency, so this is the protocol's
floor; a real LAN adds a round trip per worker boundary per token.

    python bench/rpc_split.py --rpc-dir DIR --model PATH.gguf [--workers 2] [--rounds 3]

``--rpc-dir`` is a folder holding llama-server and ggml-rpc-server (default
LLAMA_PROC_TEST_RPC_DIR); the model defaults to LLAMA_PROC_TEST_MODEL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_proc._proc import free_port
from llama_proc.runtime.rpc import RpcWorker

QUESTION = "Write three sentences about the sea."


def wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = f"llama-server exited with {proc.returncode}"
            raise SystemExit(msg)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    msg = "llama-server not ready in time"
    raise SystemExit(msg)


def ask(port: int, max_tokens: int) -> dict[str, float]:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "cache_prompt": False,
        }
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        timings = json.load(resp)["timings"]
    return {"prompt": timings["prompt_per_second"], "gen": timings["predicted_per_second"]}


def run_server(
    server: Path, model: Path, extra: list[str], rounds: int, tokens: int
) -> dict[str, float]:
    port = free_port()
    argv = [str(server), "-m", str(model), "-c", "1024", "--host", "127.0.0.1",
            "--port", str(port), *extra]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, port)
        load = time.monotonic() - start
        ask(port, 4)  # warm-up
        results = [ask(port, tokens) for _ in range(rounds)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "load_s": load,
        "prompt_tps": statistics.median(r["prompt"] for r in results),
        "gen_tps": statistics.median(r["gen"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc-dir", type=Path, default=os.environ.get("LLAMA_PROC_TEST_RPC_DIR"))
    parser.add_argument("--model", type=Path, default=os.environ.get("LLAMA_PROC_TEST_MODEL"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker and server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if args.rpc_dir is None or args.model is None:
        parser.error("--rpc-dir and --model are required (or the LLAMA_PROC_TEST_* variables)")
    server = args.rpc_dir / "llama-server"
    worker_bin = next(
        p for p in (args.rpc_dir / "ggml-rpc-server", args.rpc_dir / "rpc-server") if p.exists()
    )
    threads = ["-t", str(args.threads)]
    workers = [RpcWorker(worker_bin, threads=args.threads) for _ in range(args.workers)]
    try:
        for worker in workers:
            worker.start()
        started = time.monotonic()
        for worker in workers:
            worker.wait_ready(60)
        ready = time.monotonic() - started
        endpoints = ",".join(w.endpoint for w in workers)
        local = run_server(server, args.model, [*threads, "-ngl", "0"], args.rounds, args.tokens)
        split = run_server(
            server, args.model, [*threads, "--rpc", endpoints, "-ngl", "99"],
            args.rounds, args.tokens,
        )  # fmt: skip
    finally:
        for worker in workers:
            worker.stop()
    print(f"{args.workers} worker(s) ready in {ready:.2f}s (parallel start)")
    print(f"{'':8} {'load s':>8} {'prompt t/s':>11} {'gen t/s':>9}")
    for name, r in (("local", local), ("rpc", split)):
        print(f"{name:8} {r['load_s']:8.2f} {r['prompt_tps']:11.1f} {r['gen_tps']:9.1f}")
    print(f"generation over RPC: {split['gen_tps'] / local['gen_tps']:.2f}x local")


if __name__ == "__main__":
    main()
