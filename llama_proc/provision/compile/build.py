"""Build llama-server from llama.cpp source with CMake, into a verified cache install.

:func:`build_variant` checks the request (:func:`~llama_proc.provision.compile.build_plan.check_request`),
gets a source tree (:func:`~llama_proc.provision.fetch.sources.obtain_source`), then lets
:func:`~llama_proc.provision.cache.installer.install_atomically` call :func:`build_into`, which runs the
plan (:func:`~llama_proc.provision.compile.build_plan.plan_build`,
:func:`~llama_proc.provision.compile.build_run.run_build`) in a persistent build folder
``cache_dir/build/<key>`` and copies the whole ``bin/`` folder (binaries, shared libraries,
symlink chains) into the install. A CUDA build uses the toolkit
:func:`~llama_proc.provision.compile.toolchain.choose_cuda_toolkit` picks (the system's, else NVIDIA's
wheels from the package index, laid out by :mod:`~llama_proc.provision.compile.cuda_wheels`) and copies
the CUDA runtime libraries the binaries link (libcudart, libcublas, libcublasLt) beside them, so
they load through ``$ORIGIN`` with no ``LD_LIBRARY_PATH``. The key hashes the source identity, the generator and the
configure flags, not the targets, so the rpc variant reuses the cpu variant's objects and a
rebuild of the same inputs is incremental. A second :func:`build_variant` of the same inputs
is a pure cache hit: the install is found before any tool is even looked for.

Where the rest lives: the tools in :mod:`~llama_proc.provision.compile.toolchain`, the ``-D`` flags,
CUDA architectures, targets and keys in :mod:`~llama_proc.provision.compile.cmake_flags`, the plan in
:mod:`~llama_proc.provision.compile.build_plan`, running it in :mod:`~llama_proc.provision.compile.build_run`
and the failure hints in :mod:`~llama_proc.provision.compile.build_diagnosis`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llama_proc.errors import BuildError
from llama_proc.provision.cache.installer import install_atomically
from llama_proc.provision.cache.layout import install_dir
from llama_proc.provision.cache.locking import remove_tree
from llama_proc.provision.compile.build_plan import check_request, plan_build
from llama_proc.provision.compile.build_run import run_build
from llama_proc.provision.compile.cmake_flags import flag_value, install_flavor
from llama_proc.provision.compile.cuda_runtime import (
    _toolkit_lib_dirs,
    bundle_cuda_runtime,
    cuda_toolchain,
    driver_stub_dir,
)
from llama_proc.provision.compile.toolchain import (
    compiler_info,
    version_text,
)
from llama_proc.provision.compute.ladder import (
    native_flags,
    prune_cpu_variants,
    with_compiler_flags,
)
from llama_proc.provision.compute.plan import ComputePlan, initial_off
from llama_proc.provision.elf import elf_needed
from llama_proc.provision.fetch.source_tree import tree_fingerprint
from llama_proc.provision.fetch.sources import obtain_source
from llama_proc.provision.host.platform import detect_host
from llama_proc.provision.manifest import load_manifest
from llama_proc.vocab import InstallSource

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

    from llama_proc.config import Settings
    from llama_proc.provision.cache.record import Install
    from llama_proc.provision.cache.verify import DeviceRequirement
    from llama_proc.provision.compile.build_plan import BuildPlan, BuildRequest
    from llama_proc.provision.compile.toolchain import Toolchain, ToolkitChoice
    from llama_proc.provision.compute.ladder import FeatureGroup
    from llama_proc.provision.host.host_info import HostInfo
    from llama_proc.provision.manifest_records import Manifest, Variant
    from llama_proc.provision.views import BuildView, FetchView

__all__ = [
    "build_into",
    "build_variant",
    "bundle_cuda_runtime",
    "copy_outputs",
    "cuda_toolchain",
    "elf_needed",
]

logger = logging.getLogger(__name__)


def copy_outputs(bin_dir: Path, staging: Path) -> list[str]:
    """Copy everything in ``bin_dir`` into ``staging`` (symlinks kept as symlinks).

    Returns:
        The copied top-level names.

    Raises:
        BuildError: the build produced no ``bin/`` folder.
    """
    if not bin_dir.is_dir():
        msg = f"the build produced no {bin_dir} folder"
        raise BuildError(["copy", str(bin_dir)], 1, [msg], "the build output layout is unexpected")
    staging.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for entry in sorted(bin_dir.iterdir()):
        dest = staging / entry.name
        if entry.is_symlink():
            # In-folder symlink chains (libggml.so -> libggml.so.0 -> ...) stay links, so the
            # $ORIGIN rpath resolves them exactly as in the build tree.
            dest.symlink_to(entry.readlink())
        elif entry.is_dir():
            shutil.copytree(entry, dest, symlinks=True)
        else:
            shutil.copy2(entry, dest)
        names.append(entry.name)
    return names


def build_into(
    staging: Path,
    plan: BuildPlan,
    *,
    settings: FetchView,
    cuda_toolkit: ToolkitChoice | None = None,
) -> dict[str, Any]:
    """Run ``plan`` and copy the results into ``staging``: the ``populate`` step of an install.

    Args:
        staging: folder to fill (created).
        plan: what to build (:func:`~llama_proc.provision.compile.build_plan.plan_build`).
        settings: ``progress`` and ``lock_timeout`` of the run.
        cuda_toolkit: the CUDA toolkit choice of a CUDA build (recorded in the metadata).

    Returns:
        The install metadata (variant, build, source, flags, compiler, timings...).

    Raises:
        BuildError: configure or build failed, or it produced no ``bin/`` folder.
        ToolNotFoundError: cmake disappeared.
        CacheLockTimeoutError: another process held the build folder too long.
    """
    source = plan.source
    logger.info(
        "building %s (%s) from %s in %s",
        plan.variant_id,
        ", ".join(plan.targets),
        source.origin,
        plan.build_dir,
    )
    result = run_build(plan, settings)
    copied = copy_outputs(result.bin_dir, staging)
    tools = plan.toolchain
    cuda_runtime: dict[str, Any] | None = None
    if tools.nvcc is not None:  # found only for a CUDA build
        lib_dirs = _toolkit_lib_dirs(tools)  # asks nvcc: once for both uses
        bundled = bundle_cuda_runtime(staging, lib_dirs)
        copied += bundled
        cuda_runtime = {
            "toolkit": cuda_toolkit.as_dict() if cuda_toolkit is not None else None,
            "toolkit_root": tools.cuda_root,
            "libraries": bundled,
            "driver_stub": driver_stub_dir(lib_dirs),
        }
    return {
        "variant_id": plan.variant_id,
        "build": source.build or "unknown",
        "source": InstallSource.BUILT,
        "source_origin": source.origin,
        "source_kind": source.kind,
        "source_path": str(source.path),
        "source_sha256": source.sha256,
        "source_commit": source.commit,
        "cmake_flags": list(plan.flags),
        "targets": list(plan.targets),
        "generator": plan.generator or "default",
        "cmake": {"path": tools.cmake, "version": version_text(tools.cmake_version)},
        "compiler": compiler_info(plan.build_dir, tools),
        "ccache": tools.ccache,
        "nvcc": version_text(tools.nvcc_version) if tools.nvcc else None,
        "cuda_architectures": plan.cuda_arch,
        "cuda_runtime": cuda_runtime,
        "portable": plan.portable,
        "jobs": plan.jobs,
        "build_dir": str(plan.build_dir),
        "build_log": str(plan.log_path),
        "build_seconds": round(result.seconds, 1),
        "build_steps": result.steps,
        "configured": result.configured,
        "files": copied,
    }


@dataclass(frozen=True)
class _CpuPlan:
    """The CPU feature groups of one build: the host's ladder and what is off from the start."""

    native: bool
    """Compiled for this CPU (``GGML_NATIVE``): groups are turned off by compiler flags; else
    the build has CPU-variant libraries, and groups are turned off by removing them."""
    ladder: tuple[FeatureGroup, ...]
    why: dict[str, str]
    """Groups off from the start -> why."""
    can_repair: bool

    @property
    def initial(self) -> tuple[FeatureGroup, ...]:
        """The groups off from the start, in ladder order."""
        return tuple(g for g in self.ladder if g.name in self.why)


def _cpu_plan(
    request: BuildRequest,
    host: HostInfo,
    manifest: Manifest,
    build: str | None,
    settings: BuildView,
) -> _CpuPlan:
    flags = (
        request.variant.portable_cmake_flags if request.portable else request.variant.cmake_flags
    )
    dynamic = flag_value(flags, "GGML_BACKEND_DL") == "ON"
    native = not dynamic and flag_value(flags, "GGML_NATIVE") != "OFF"
    ladder, why = initial_off(
        host.arch,
        host.cpu_features,
        manifest.known_bad_groups(build or "unknown"),
        settings.cpu_off,
    )
    if native:
        # MSVC has no -mno-* flags, and native Arm builds pick their features in ggml's CMake:
        # there, only groups with GCC/Clang flags can be turned off.
        usable = request.os_name != "windows"
        ladder = tuple(g for g in ladder if usable and g.compiler_flags)
        why = {name: text for name, text in why.items() if any(g.name == name for g in ladder)}
    return _CpuPlan(native=native, ladder=ladder, why=why, can_repair=bool(ladder))


def build_variant(
    variant: Variant,
    settings: Settings,
    *,
    host: HostInfo | None = None,
    manifest: Manifest | None = None,
    source_build: str | None = None,
    cmake_args: Sequence[str] = (),
    portable: bool = False,
    force: bool = False,
    toolchain: Toolchain | None = None,
    explain: list[str] | None = None,
    require_device: DeviceRequirement | None = None,
) -> Install:
    """Build ``variant`` from source into the cache (or return the cached build).

    Args:
        variant: the manifest variant (flags, targets, binaries).
        settings: cache root, ``build_source`` (the llama.cpp source: folder, archive path/URL
            with ``#sha256=<hex>``, ``"release"`` or ``"index"``; None = the pinned source),
            ``jobs``, ``cuda_arch``, offline, progress, lock timeout.
        host: the caller's detected host (its GPUs pick the CUDA architectures); detected
            here, once, only for a native CUDA build when None.
        manifest: the manifest (default: the shipped one).
        source_build: the build tag (``b1234``) of a source whose build cannot be found out.
        cmake_args: extra ``-DNAME=VALUE`` arguments.
        portable: build with the variant's portable flags (runs on other machines).
        force: rebuild and reinstall even if the install exists (the build stays incremental).
        toolchain: the tools to use (default: found on this host).
        explain: gets one line per decision (source used, cache hit or build time).
        require_device: the GPU the new build must list before it is installed
            (:func:`~llama_proc.provision.cache.verify.device_requirement`; None = no check).

    Returns:
        The complete install; ``metadata["source_origin"]`` says which source was used.

    Raises:
        ToolNotFoundError: cmake, a compiler or a GPU toolkit is missing.
        BuildError: configure or build failed (log tail, likely cause, log path).
        ConfigError: bad CMake arguments or CUDA architectures.
        ProvisionError: the source cannot be obtained or verified, or the install failed.
        CacheLockTimeoutError: another process held a lock too long.
    """
    manifest = manifest or load_manifest()
    if host is None and variant.backend == "cuda" and not portable:
        host = detect_host()
    request = check_request(variant, host=host, cmake_args=cmake_args, portable=portable)
    tree = obtain_source(settings, manifest, build=source_build)
    cpu = _cpu_plan(request, host or detect_host(gpu_details=False), manifest, tree.build, settings)
    flavor = install_flavor(
        tree,
        variant,
        portable=portable,
        cuda_arch=settings.cuda_arch if variant.backend == "cuda" else None,
        cmake_args=request.cmake_args,
        fingerprint=tree_fingerprint(tree.path) if tree.kind == "local" else "",
    )
    target = install_dir(settings, tree.build or "unknown", variant.id, flavor)

    built: list[dict[str, Any]] = []

    def build_with(staging: Path, groups: tuple[FeatureGroup, ...]) -> dict[str, Any]:
        """Build with ``groups`` off: compiler flags (native) or fewer CPU variants (portable)."""
        tools, choice = toolchain, None
        if tools is None and variant.backend == "cuda":
            tools, choice = cuda_toolchain(request, manifest, settings)
        flags = native_flags(groups) if cpu.native else []
        wanted = dataclasses.replace(
            request, cmake_args=tuple(with_compiler_flags(request.cmake_args, flags))
        )
        plan = plan_build(wanted, tree, settings, manifest=manifest, toolchain=tools)
        remove_tree(staging)
        metadata = build_into(staging, plan, settings=settings, cuda_toolkit=choice)
        if not cpu.native:
            metadata["cpu_variants_removed"] = prune_cpu_variants(staging, groups)
        metadata["cpu_off"] = [g.name for g in groups]
        built.append(metadata)
        return metadata

    def populate(staging: Path) -> dict[str, Any]:
        return build_with(staging, cpu.initial)

    populate_fn: Callable[[Path], Mapping[str, Any]] = populate
    install = install_atomically(
        target,
        populate_fn,
        settings=settings,
        binaries=variant.binaries,
        os_name=request.os_name,
        force=force,
        require_device=require_device,
        compute=ComputePlan(
            ladder=cpu.ladder, off=cpu.why, repair=build_with if cpu.can_repair else None
        ),
    )
    origin = install.metadata.get("source_origin", tree.origin)
    lines = [f"source: {origin} (build {tree.build or 'unknown'})"]
    if built:
        meta = built[-1]
        steps = sum(m["build_steps"] or 0 for m in built)
        work = f"{steps} build steps" if steps else "already up to date"
        lines.append(
            f"built {', '.join(meta['targets'])} in {meta['build_seconds']} s ({work}; "
            f"{meta['generator']}, {meta['compiler']['id']} {meta['compiler']['version']}); "
            f"log: {meta['build_log']}"
        )
    else:
        lines.append(f"cache hit: {install.path} (already built; --force rebuilds)")
    for line in lines:
        logger.info("%s: %s", variant.id, line)
    if explain is not None:
        explain.extend(lines)
    logger.info("llama-server %s ready at %s", variant.id, install.server_binary)
    return install
