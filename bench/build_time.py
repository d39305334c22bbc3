"""Source build wall time: llama-proc's targets-only build vs a plain full `cmake --build`.

Measures, on the same machine in the same run, from the same llama.cpp tree and the same
configure flags (the cpu variant's, as llama-proc composes them):

1. llama-proc's build (configure + only the variant's targets) in a fresh build folder;
2. a no-change rebuild through llama-proc (configure skipped, Ninja finds nothing to do);
3. a plain `cmake -S . -B <dir> <same flags>` + `cmake --build <dir>` of all default targets.

ccache is disabled for every step (CCACHE_DISABLE=1) so cached objects do not flatter either
side. Prints one JSON object: seconds per step, Ninja step counts and the full/targets ratio.

    python bench/build_time.py                      # pinned index sdist, all CPUs
    python bench/build_time.py --source /src/llama.cpp --jobs 8
    python bench/build_time.py --smoke              # tiny stand-in tree, seconds (checks the bench)

A real run compiles llama.cpp twice (several minutes each on a few cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from llama_proc.config import Settings
from llama_proc.provision.compile.build_plan import BuildPlan, check_request, plan_build
from llama_proc.provision.compile.build_run import Run, run_build
from llama_proc.provision.fetch.source_tree import SourceTree
from llama_proc.provision.fetch.sources import obtain_source
from llama_proc.provision.host.platform import detect_host
from llama_proc.provision.host.selection import select_variant
from llama_proc.provision.manifest import load_manifest


def _smoke_tree(root: Path) -> SourceTree:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
    from build_fixtures import make_fake_llama_tree

    path = make_fake_llama_tree(root / "fake-llama")
    return SourceTree(path, f"smoke tree {path}", "b1", "", "local", f"local:{path}")


def _full_build(plan: BuildPlan, build_dir: Path, run: Run) -> tuple[float, int | None]:
    """A plain configure + `cmake --build` of every default target, same flags."""
    configure = plan.configure_command()
    configure[configure.index("-B") + 1] = str(build_dir)
    started = time.monotonic()
    run(configure)
    run(
        [plan.toolchain.cmake, "--build", str(build_dir), "--parallel", str(plan.jobs)],
        show_progress=True,
    )
    steps = run.last_progress[1] if run.last_progress else None
    return time.monotonic() - started, steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="index", help="llama.cpp source (default: index)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache-dir", type=Path, help="cache root (default: a temp folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny stand-in tree (seconds)")
    parser.add_argument("--skip-full", action="store_true", help="skip the full build")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="llama-proc-bench-"))
    cache = args.cache_dir or work / "cache"
    # The source download (if any) is not part of the timing; nothing is installed.
    settings = Settings.from_env(cache_dir=cache, jobs=args.jobs, progress=False)
    manifest = load_manifest()
    host = detect_host()
    variant = select_variant(manifest, host, "cpu").variant
    tree = _smoke_tree(work) if args.smoke else obtain_source(settings, manifest, args.source)
    plan = plan_build(check_request(variant, host=host), tree, settings, manifest=manifest)
    plan = dataclasses.replace(plan, env={**plan.env, "CCACHE_DISABLE": "1"})
    if plan.build_dir.exists():
        msg = f"{plan.build_dir} exists; use a fresh --cache-dir so the build starts cold"
        raise SystemExit(msg)

    run_settings = settings.replace(progress=None, lock_timeout=60)
    first = run_build(plan, run_settings)
    noop = run_build(plan, run_settings)
    result: dict[str, object] = {
        "host": f"{platform.machine()} {host.summary()}, {os.cpu_count()} CPUs",
        "source": tree.origin,
        "jobs": args.jobs,
        "generator": plan.generator or "default",
        "targets": list(plan.targets),
        "targets_only_s": round(first.seconds, 1),
        "targets_only_steps": first.steps,
        "noop_rebuild_s": round(noop.seconds, 2),
    }
    if not args.skip_full:
        full_run = Run(work / "full-build.log", env=plan.env, progress=None, desc="full build")
        full_s, full_steps = _full_build(plan, work / "full-build", full_run)
        result.update(
            full_build_s=round(full_s, 1),
            full_build_steps=full_steps,
            full_over_targets=round(full_s / first.seconds, 2) if first.seconds else None,
        )
    result["work_dir"] = str(work)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
