"""Tokens/s through LlamaServer's client vs direct HTTP to the same server, same run.

One server, fixed-length generations (``ignore_eos``, ``max_tokens``), temperature 0. Four
modes, interleaved: direct ``requests`` POST, ``LlamaServer.chat``, a hand-parsed direct SSE
stream, and ``LlamaServer.chat_stream``. tokens/s = completion tokens / wall time of the call.

    python bench/client_throughput.py --binary /path/llama-server --model model.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests

from llama_proc.server import LlamaServer

if TYPE_CHECKING:
    from collections.abc import Callable

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=os.environ.get("LLAMA_PROC_TEST_SERVER_BIN"))
    parser.add_argument("--model", default=os.environ.get("LLAMA_PROC_TEST_MODEL"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if not args.binary or not args.model:
        parser.error("pass --binary and --model (or set LLAMA_PROC_TEST_SERVER_BIN/_MODEL)")

    params: dict[str, Any] = {
        "temperature": 0, "max_tokens": args.tokens, "ignore_eos": True,
    }  # fmt: skip
    with LlamaServer(args.model, binary=args.binary, ctx_size=1024, parallel=1) as server:
        url = f"{server.url}/v1/chat/completions"
        session = requests.Session()

        def direct() -> int:
            body = session.post(url, json={"messages": MESSAGES, **params}, timeout=600).json()
            return int(body["usage"]["completion_tokens"])

        def client() -> int:
            return int(server.chat(MESSAGES, **params)["usage"]["completion_tokens"])

        def direct_stream() -> int:
            body = {"messages": MESSAGES, **params, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            tokens = 0
            with session.post(url, json=body, stream=True, timeout=600) as response:
                for line in response.iter_lines(chunk_size=None):
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            return tokens

        def client_stream() -> int:
            tokens = 0
            for chunk in server.chat_stream(MESSAGES, **params):
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            return tokens

        modes: dict[str, Callable[[], int]] = {
            "direct": direct, "client": client,
            "direct_stream": direct_stream, "client_stream": client_stream,
        }  # fmt: skip
        rates: dict[str, list[float]] = {name: [] for name in modes}
        direct()  # warm-up: prompt cache and page cache
        order = list(modes)
        for i in range(args.runs):
            for name in order if i % 2 == 0 else reversed(order):
                started = time.perf_counter()
                tokens = modes[name]()
                rates[name].append(tokens / (time.perf_counter() - started))

    medians = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "tokens_per_request": args.tokens,
        "runs": args.runs,
        "tokens_per_s_median": {k: round(v, 1) for k, v in medians.items()},
        "client_vs_direct": round(medians["client"] / medians["direct"], 3),
        "client_stream_vs_direct_stream": round(
            medians["client_stream"] / medians["direct_stream"], 3
        ),
        "all": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
