"""Download throughput: llama_proc's download_file against curl, same file, same server.

Serves a ~200 MB random file from the loopback test server (tests/helpers/http_server.py, which
uses sendfile for plain bodies) and alternates ``download_file`` (stream + sha256 + size and
free-space checks + .part + rename) with ``curl -s -o`` for several rounds, then prints MB/s
for each and the ratio.

    python bench/download_throughput.py [--size-mb 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "helpers")]

from http_server import FileServer

from llama_proc.config import Settings
from llama_proc.provision.fetch.download import download_file, file_sha256

MB = 1_000_000


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with path.open("wb") as fh:
        written = 0
        while written < size:
            piece = block[: min(len(block), size - written)]
            fh.write(piece)
            digest.update(piece)
            written += len(piece)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    curl = shutil.which("curl")
    with tempfile.TemporaryDirectory(prefix="llama-proc-bench-") as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "blob.bin"
        size = args.size_mb * MB
        sha = make_file(src, size)
        settings = Settings(cache_dir=tmp / "cache", progress=False)
        ours: list[float] = []
        theirs: list[float] = []
        with FileServer() as server:
            server.add("/blob.bin", src)
            url = server.url + "/blob.bin"
            for round_no in range(1, args.rounds + 1):
                dest = tmp / "ours.bin"
                t0 = time.perf_counter()
                download_file(url, dest, sha256=sha, size=size, settings=settings)
                ours.append(time.perf_counter() - t0)
                dest.unlink()
                if curl:
                    out = tmp / "curl.bin"
                    t0 = time.perf_counter()
                    subprocess.run([curl, "-s", "-o", str(out), url], check=True)
                    theirs.append(time.perf_counter() - t0)
                    if round_no == 1 and file_sha256(out) != sha:
                        print("curl got different bytes!", file=sys.stderr)
                        return 1
                    out.unlink()
                print(
                    f"round {round_no}: download_file {size / MB / ours[-1]:7.1f} MB/s"
                    + (f"   curl {size / MB / theirs[-1]:7.1f} MB/s" if theirs else "")
                )
    med_ours = size / MB / statistics.median(ours)
    print(f"\nfile {args.size_mb} MB, {args.rounds} rounds, median:")
    print(f"  download_file (stream + sha256 + size + rename):   {med_ours:7.1f} MB/s")
    if theirs:
        med_curl = size / MB / statistics.median(theirs)
        print(f"  curl -s -o (no hashing):                          {med_curl:7.1f} MB/s")
        print(f"  ratio download_file / curl: {med_ours / med_curl:.2f}")
    else:
        print("  curl not found; no comparison")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
