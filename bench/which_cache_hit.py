"""Time `llama-proc which` on a cache hit, as a process, against `python -c pass`.

It makes a throwaway cache holding an install of the variant this host would pick (a tiny
shim, installed through the real cache code), then runs both commands N times in alternation
and prints the medians in milliseconds and their ratio. Nothing is downloaded. Bytecode is
written to a throwaway PYTHONPYCACHEPREFIX (as an installed package would have it) even where
PYTHONDONTWRITEBYTECODE is set.

    python bench/which_cache_hit.py [-n 30]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHIM = (
    '#!/bin/sh\nif [ "$1" = "--version" ]; then echo "version: 1 (bench)" >&2; exit 0; fi\nexit 1\n'
)


def make_cache(cache: Path) -> Path:
    from llama_proc.config import Settings
    from llama_proc.provision.cache.installer import install_atomically
    from llama_proc.provision.cache.layout import install_dir
    from llama_proc.provision.resolve import plan

    # The shim cannot serve the compute check's model: it is installed unchecked, with the
    # record a checked install carries, so `which` takes the ordinary cache-hit path.
    settings = Settings(cache_dir=cache, compute_check=False)
    res = plan(settings)

    def populate(staging: Path) -> dict[str, str]:
        for name in ("llama-server", "ggml-rpc-server"):
            (staging / name).write_text(SHIM)
            (staging / name).chmod(0o755)
        checked = {"ok": True, "reason": "bench stand-in", "features_off": []}
        return {
            "variant_id": res.variant.id,
            "build": res.build,
            "source": "prebuilt",
            "compute_check": checked,
        }

    install = install_atomically(
        install_dir(settings, res.build, res.variant.id),
        populate,
        settings=settings,
        binaries=res.variant.binaries,
        os_name=res.variant.os,
    )
    return install.server_binary


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall and CPU (user + system) milliseconds of one run, and its stdout."""
    cpu = _child_cpu()
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    wall = (time.perf_counter() - start) * 1000
    return wall, (_child_cpu() - cpu) * 1000, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="runs of each command (default 30)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        binary = make_cache(cache)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_PROC_")}
        env["LLAMA_PROC_CACHE_DIR"] = str(cache)
        env["PYTHONPATH"] = str(REPO)
        # An installed package runs from compiled bytecode; keep it out of the source tree.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        which = [sys.executable, "-m", "llama_proc", "which"]
        baseline = [sys.executable, "-c", "pass"]
        out = timed(which, env)[2]  # warm the page cache, write bytecode, check the answer
        assert out.strip() == str(binary), out
        timed(baseline, env)
        runs: dict[str, list[tuple[float, float, str]]] = {"which": [], "base": []}
        for _ in range(args.n):
            runs["which"].append(timed(which, env))
            runs["base"].append(timed(baseline, env))
    for label, key in (("python -c pass", "base"), ("llama-proc which (hit)", "which")):
        wall = [r[0] for r in runs[key]]
        cpu = [r[1] for r in runs[key]]
        print(
            f"{label:<24} wall median {statistics.median(wall):6.1f} ms (min {min(wall):5.1f})"
            f"   cpu median {statistics.median(cpu):6.1f} ms   n={args.n}"
        )
    w = statistics.median(r[0] for r in runs["which"])
    b = statistics.median(r[0] for r in runs["base"])
    wc = statistics.median(r[1] for r in runs["which"])
    bc = statistics.median(r[1] for r in runs["base"])
    print(f"ratio which / python: wall {w / b:.2f}x, cpu {wc / bc:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
