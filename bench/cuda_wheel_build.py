"""CUDA llama-server built with the toolkit from the package index (no system toolkit, no GPU).

Steps, each timed:

1. lay out NVIDIA's pinned CUDA wheels as a toolkit root (a cache hit after the first run;
   ``--relayout`` lays it out again from the cached wheels);
2. configure the CUDA variant of the pinned llama.cpp source with that toolkit, for the given
   architectures (``CUDAToolkit_ROOT`` + ``CMAKE_CUDA_COMPILER``: a system toolkit is ignored);
3. with ``--object``, compile one llama.cpp CUDA source (e.g. ``mmq.cu``) alone, once per
   architecture list in ``--arch`` (``--arch 86 --arch "86;90"``: what one more costs);
4. with ``--full``, build llama-server (a long build on few cores).

Prints one JSON object. ccache is disabled (CCACHE_DISABLE=1) so cached objects flatter nothing.

    python bench/cuda_wheel_build.py --arch 86 --object mmq.cu --arch "86;90"
    python bench/cuda_wheel_build.py --arch 86 --full --jobs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from llama_proc.config import Settings
from llama_proc.provision.compile.build_plan import BuildPlan, check_request, plan_build
from llama_proc.provision.compile.build_run import run_build
from llama_proc.provision.compile.cuda_wheels import ensure_cuda_toolkit
from llama_proc.provision.compile.toolchain import find_toolchain
from llama_proc.provision.fetch.sources import obtain_source
from llama_proc.provision.host.host_info import normalize_arch
from llama_proc.provision.manifest import load_manifest


def _plan(settings: Settings, arch: str, root: Path) -> BuildPlan:
    manifest = load_manifest()
    machine = normalize_arch(platform.machine(), "linux")
    variant = manifest.get(f"linux-{machine}-cuda13")
    tree = obtain_source(settings, manifest)
    tools = find_toolchain("cuda", "linux", cuda_root=root)
    request = check_request(variant, os_name="linux")
    return plan_build(
        request, tree, settings.replace(cuda_arch=arch), manifest=manifest, toolchain=tools
    )


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        msg = f"{cmd[:3]} failed with exit status {done.returncode}"
        raise SystemExit(msg)
    return round(time.monotonic() - start, 1)


def _object_target(plan: BuildPlan, source: str, env: dict[str, str]) -> str:
    ninja = plan.toolchain.ninja or "ninja"
    listing = subprocess.run(
        [ninja, "-C", str(plan.build_dir), "-t", "targets", "all"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for line in listing.splitlines():
        name = line.split(":", 1)[0]
        if name.endswith(f"ggml-cuda.dir/{source}.o"):
            return name
    msg = f"no object for {source} in {plan.build_dir}"
    raise SystemExit(msg)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; prints JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="CUDA architectures (repeatable)")
    parser.add_argument("--object", help="one ggml-cuda source to compile per --arch, e.g. mmq.cu")
    parser.add_argument("--full", action="store_true", help="build llama-server (first --arch)")
    parser.add_argument("--relayout", action="store_true", help="lay the toolkit out again")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    arches: list[str] = args.arch or ["86"]
    settings = Settings.from_env(progress=False, jobs=args.jobs)
    manifest = load_manifest()
    machine = normalize_arch(platform.machine(), "linux")
    spec = next(t for t in manifest.cuda_toolkits if t.os == "linux" and t.arch == machine)
    env = {**os.environ, "CCACHE_DISABLE": "1"}
    report: dict[str, object] = {"cuda": spec.cuda, "cpus": os.cpu_count(), "jobs": args.jobs}

    start = time.monotonic()
    root = ensure_cuda_toolkit(spec, settings, force=args.relayout)
    report["toolkit_seconds"] = round(time.monotonic() - start, 1)
    report["toolkit_root"] = str(root)

    configured: dict[str, BuildPlan] = {}
    for arch in arches:
        plan = _plan(settings, arch, root)
        plan = dataclasses.replace(plan, env={**plan.env, "CCACHE_DISABLE": "1"})
        configured[arch] = plan
        report[f"configure_seconds[{arch}]"] = _run(plan.configure_command(), env)
    if args.object:
        for arch, plan in configured.items():
            target = _object_target(plan, args.object, env)
            Path(plan.build_dir, target).unlink(missing_ok=True)
            ninja = plan.toolchain.ninja or "ninja"
            seconds = _run([ninja, "-C", str(plan.build_dir), target], env)
            report[f"compile_seconds[{args.object}][{arch}]"] = seconds
    if args.full:
        plan = configured[arches[0]]
        result = run_build(plan, settings)
        report["build_seconds"] = round(result.seconds, 1)
        report["build_steps"] = result.steps
        report["bin_dir"] = str(result.bin_dir)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
