"""Start-to-ready: LlamaServer.start() vs launching llama-server by hand, same run.

The hand-rolled baseline is what a careful script does: Popen the same binary with the same
model and flags (log to a file), then poll /health in a tight loop (every 1 ms, raw socket)
until 200. Runs alternate between the two so machine load affects both alike. Reports medians,
the ratio and the milliseconds LlamaServer adds.

Model loading dominates and varies a lot on a busy machine, so each run also records
llama-server's own clock at its "listening on" line (its log timestamps count from its start):
wall time minus that is what the launcher itself costs (spawn, polling, detection latency),
independent of how long the load took.

Each run also starts both in a fresh interpreter (``first_start``): the first start in a
process is the one that pays for one-time work (reading which flags the binary accepts,
starting helper threads), which a warm loop hides. Only ``start()`` is timed, not imports.
``--tree`` imports llama_proc from another source tree (an older checkout) for a before/after
comparison in the same run.

    python bench/runtime_start.py --binary /path/llama-server --model model.gguf --runs 7
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _use_tree(argv: list[str]) -> None:
    """Import llama_proc from ``--tree`` (default: this checkout), even over an editable install."""
    tree = Path(__file__).resolve().parents[1]
    if "--tree" in argv:
        tree = Path(argv[argv.index("--tree") + 1]).resolve()
        # An editable install's import hook would win over sys.path: drop it.
        sys.meta_path[:] = [
            f for f in sys.meta_path if not type(f).__module__.startswith("_editable")
        ]
    sys.path.insert(0, str(tree))


_use_tree(sys.argv)

from llama_proc.runtime.health import probe_health
from llama_proc.server import LlamaServer, reserve_port

TIGHT_POLL = 0.001


def internal_ready(lines: list[str]) -> float:
    """llama-server's own elapsed time (m.ss.mmm.uuu) at its "listening on" line."""
    for line in lines:
        if "listening on" in line:
            match = re.match(r"(\d+)\.(\d+)\.(\d+)\.(\d+) ", line)
            if match:
                m, sec, ms, us = map(int, match.groups())
                return m * 60 + sec + ms / 1e3 + us / 1e6
    msg = "no listening line"
    raise RuntimeError(msg)


def by_hand(binary: str, model: str, ctx: int) -> tuple[float, float]:
    port = reserve_port()
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while probe_health("127.0.0.1", port) != 200:
                if proc.poll() is not None:
                    msg = "llama-server exited"
                    raise RuntimeError(msg)
                time.sleep(TIGHT_POLL)
            elapsed = time.perf_counter() - started
            time.sleep(0.05)  # let the log line reach the file
        finally:
            proc.terminate()
            proc.wait()
        log.seek(0)
        lines = log.read().decode("utf-8", "replace").splitlines()
    return elapsed, internal_ready(lines)


def with_llama_proc(binary: str, model: str, ctx: int) -> tuple[float, float]:
    server = LlamaServer(model, binary=binary, ctx_size=ctx)
    started = time.perf_counter()
    server.start(timeout=300)
    elapsed = time.perf_counter() - started
    lines = server.logs()
    server.stop()
    return elapsed, internal_ready(lines)


def first_start(args: argparse.Namespace, name: str) -> tuple[float, float]:
    """One start of ``name`` ("hand" or "llama_proc") in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--one", name, "--binary", args.binary,
           "--model", args.model, "--ctx", str(args.ctx)]  # fmt: skip
    if args.tree:
        cmd += ["--tree", args.tree]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=args.env).stdout
    wall, internal = json.loads(out.splitlines()[-1])
    return wall, internal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=os.environ.get("LLAMA_PROC_TEST_SERVER_BIN"))
    parser.add_argument("--model", default=os.environ.get("LLAMA_PROC_TEST_MODEL"))
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--tree", help="import llama_proc from this source tree")
    parser.add_argument("--one", choices=["hand", "llama_proc"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.binary or not args.model:
        parser.error("pass --binary and --model (or set LLAMA_PROC_TEST_SERVER_BIN/_MODEL)")
    if args.one:
        fn = by_hand if args.one == "hand" else with_llama_proc
        print(json.dumps(fn(args.binary, args.model, args.ctx)))
        return 0

    # The fresh interpreters share one throw-away cache: the first pays for probing the
    # binary, the later ones find what it remembered, as repeated runs of a program would.
    cache = tempfile.TemporaryDirectory(prefix="llama-proc-bench-")
    args.env = {**os.environ, "LLAMA_PROC_CACHE_DIR": cache.name}
    t = time.perf_counter()
    subprocess.run([args.binary, "--help"], capture_output=True, check=False)
    help_ms = (time.perf_counter() - t) * 1000
    by_hand(args.binary, args.model, args.ctx)  # warm the page cache for both sides

    hand: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    first_hand: list[tuple[float, float]] = []
    first_ours: list[tuple[float, float]] = []
    for i in range(args.runs):
        pair = [("hand", by_hand), ("llama_proc", with_llama_proc)]
        if i % 2:
            pair.reverse()
        for name, fn in pair:
            (hand if name == "hand" else ours).append(fn(args.binary, args.model, args.ctx))
            (first_hand if name == "hand" else first_ours).append(first_start(args, name))

    def med(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 1)

    hand_ms = med([w for w, _ in hand])
    ours_ms = med([w for w, _ in ours])
    hand_over = med([w - i for w, i in hand])
    ours_over = med([w - i for w, i in ours])
    result = {
        "runs": args.runs,
        "by_hand_ms_median": hand_ms,
        "llama_proc_ms_median": ours_ms,
        "ratio": round(ours_ms / hand_ms, 3),
        "added_ms": round(ours_ms - hand_ms, 1),
        "launcher_overhead_ms_median": {"by_hand": hand_over, "llama_proc": ours_over},
        "launcher_added_ms": round(ours_over - hand_over, 1),
        "by_hand_ms": [round(w * 1000, 1) for w, _ in hand],
        "llama_proc_ms": [round(w * 1000, 1) for w, _ in ours],
        "server_internal_ready_ms": {
            "by_hand": [round(i * 1000, 1) for _, i in hand],
            "llama_proc": [round(i * 1000, 1) for _, i in ours],
        },
        "first_start": {
            "by_hand_ms_median": med([w for w, _ in first_hand]),
            "llama_proc_ms_median": med([w for w, _ in first_ours]),
            "launcher_overhead_ms_median": {
                "by_hand": med([w - i for w, i in first_hand]),
                "llama_proc": med([w - i for w, i in first_ours]),
            },
            "launcher_added_ms": round(
                med([w - i for w, i in first_ours]) - med([w - i for w, i in first_hand]), 1
            ),
        },
        "help_probe_ms": round(help_ms, 1),
        "tree": args.tree or "this checkout",
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
