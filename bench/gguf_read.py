"""Time reading a GGUF header: llama-proc's reader against the ``gguf`` package's GGUFReader.

Both read the same file in the same process, alternately, N times each (page cache warm after
the first round); it prints the medians in milliseconds and their ratio. ``read_model_info``
is what ``llama-proc inspect`` and the proxy's memory budget call; ``GGUFReader(path)`` alone
is what the header read cost before (numpy views of every metadata value, the tokenizer too).
The file defaults to the smoke model (SmolLM2-135M Q4_1, 98 MB), fetched into the cache.

    python bench/gguf_read.py [-n 5] [MODEL.gguf]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="a .gguf (default: the smoke model)")
    parser.add_argument("-n", type=int, default=5, help="rounds (default 5)")
    args = parser.parse_args()

    from gguf import GGUFReader

    from llama_proc.config import Settings
    from llama_proc.models.gguf import read_gguf
    from llama_proc.models.gguf_info import read_model_info
    from llama_proc.provision import fetch_smoke_model

    model = args.model or fetch_smoke_model(Settings.from_env())
    timings: dict[str, list[float]] = {"read_gguf": [], "read_model_info": [], "GGUFReader": []}
    calls: dict[str, Callable[[], object]] = {
        "read_gguf": lambda: read_gguf(model),
        "read_model_info": lambda: read_model_info(model),
        "GGUFReader": lambda: GGUFReader(model, "r"),
    }
    for _ in range(args.n):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(t) * 1000 for name, t in timings.items()}
    size = model.stat().st_size / 1e6
    print(f"{model.name} ({size:.0f} MB), median of {args.n}:")
    for name, ms in medians.items():
        print(f"  {name:16s} {ms:9.1f} ms")
    ratio = medians["GGUFReader"] / medians["read_model_info"]
    print(f"  GGUFReader / read_model_info: {ratio:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
