"""What the compute check costs: the whole check, the reference alone, and the model alone.

Runs the check N times against an installed llama-server (default: the one `llama-proc which`
resolves) and prints medians: the whole check (write the model, start the server, two requests,
compare), the pure-Python reference forward pass on its own, and writing the model. The check
runs once per install (and once for an install made before it existed), never on a cache hit.

    python bench/compute_check.py [--binary PATH] [-n 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    from llama_proc.provision.compute.check import PROMPT_TOKENS, run_compute_check
    from llama_proc.provision.compute.reference import Reference
    from llama_proc.provision.compute.tiny_model import make_tiny_model, write_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, default=None)
    parser.add_argument("-n", type=int, default=7)
    args = parser.parse_args()
    binary = args.binary or Path(
        subprocess.run(
            [sys.executable, "-m", "llama_proc", "which"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    checks, refs, writes = [], [], []
    reasons = set()
    for _ in range(args.n):
        start = time.perf_counter()
        report = run_compute_check(binary)
        checks.append(time.perf_counter() - start)
        reasons.add(report.reason.split(" in ")[0])
        start = time.perf_counter()
        model = make_tiny_model()
        with tempfile.TemporaryDirectory() as tmp:
            write_gguf(model, Path(tmp) / "m.gguf")
        writes.append(time.perf_counter() - start)
        tokens = list(range(4, 4 + PROMPT_TOKENS + 4))
        start = time.perf_counter()
        Reference(model).logits(tokens, range(PROMPT_TOKENS - 1, PROMPT_TOKENS + 3))
        refs.append(time.perf_counter() - start)
    print(f"binary: {binary}")
    print(f"verdicts: {sorted(reasons)}")
    for label, values in (
        ("whole check", checks),
        ("reference forward (44 positions)", refs),
        ("make + write the model", writes),
    ):
        print(
            f"{label:<34} median {statistics.median(values) * 1000:7.1f} ms "
            f"(min {min(values) * 1000:7.1f}, max {max(values) * 1000:7.1f}), n={args.n}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
