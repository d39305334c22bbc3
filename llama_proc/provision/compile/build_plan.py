"""What a source build will do, decided before anything runs.

:func:`check_request` checks the caller's inputs once (the variant is for this OS, the user's
CMake arguments are ``-D`` definitions); :func:`plan_build` then finds the tools and decides the
flags, targets, CUDA architectures, parallel jobs and build folder, reading the rest from
:class:`~llama_proc.config.Settings`. The resulting :class:`BuildPlan` is what
:func:`~llama_proc.provision.compile.build_run.run_build` executes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ConfigError, ProvisionError
from llama_proc.provision.cache.layout import BUILD_DIR
from llama_proc.provision.compile.cmake_flags import (
    build_key,
    compose_cmake_flags,
    defined_targets,
    flag_value,
    is_cuda_build,
    resolve_cuda_arch,
    resolve_targets,
    validate_cmake_args,
)
from llama_proc.provision.compile.toolchain import find_toolchain
from llama_proc.provision.host.host_info import host_os

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from llama_proc.provision.compile.toolchain import Toolchain
    from llama_proc.provision.fetch.source_tree import SourceTree
    from llama_proc.provision.host.host_info import HostInfo
    from llama_proc.provision.manifest_records import Manifest, Variant
    from llama_proc.provision.views import BuildView

__all__ = [
    "BUILD_DIR",
    "BuildPlan",
    "BuildRequest",
    "check_request",
    "plan_build",
]

LOG_NAME: Final = "build.log"
DEFAULT_CONFIG: Final = "Release"
NINJA_STATUS: Final = "[%f/%t] "


@dataclass(frozen=True, kw_only=True)
class BuildRequest:
    """What the caller asked to build, checked by :func:`check_request`.

    Only what is not a setting lives here; CUDA architectures, jobs and the source come from
    :class:`~llama_proc.config.Settings`.
    """

    variant: Variant
    os_name: str
    """The OS the build runs on and targets (cross-compiling is not supported)."""
    host: HostInfo | None = None
    """The detected host: its GPUs' compute capabilities pick the CUDA architectures."""
    cmake_args: tuple[str, ...] = ()
    """Extra ``-DNAME=VALUE`` definitions, passed last."""
    portable: bool = False
    """Use the variant's portable flags (binaries that run on other machines)."""


def check_request(
    variant: Variant,
    *,
    host: HostInfo | None = None,
    os_name: str | None = None,
    cmake_args: Sequence[str] = (),
    portable: bool = False,
) -> BuildRequest:
    """Check a build's inputs before anything is fetched or run.

    Args:
        variant: what to build.
        host: the caller's detected host (None = no GPU information; nothing is detected here).
        os_name: the OS to build on (default: ``host.os``, else this machine's).
        cmake_args: extra ``-DNAME=VALUE`` arguments.
        portable: use the variant's portable flags.

    Raises:
        ProvisionError: the variant is for another OS.
        ConfigError: an argument is not a ``-DNAME=VALUE`` definition.
    """
    os_name = os_name or (host.os if host is not None else host_os())
    if variant.os != os_name:
        msg = (
            f"variant {variant.id} is for {variant.os}; this host is {os_name} and "
            "cross-compiling is not supported"
        )
        raise ProvisionError(msg)
    return BuildRequest(
        variant=variant,
        os_name=os_name,
        host=host,
        cmake_args=tuple(validate_cmake_args(cmake_args)),
        portable=portable,
    )


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build will do, decided before anything runs."""

    source: SourceTree
    variant_id: str
    build_dir: Path
    key: str
    toolchain: Toolchain
    flags: tuple[str, ...]
    targets: tuple[str, ...]
    jobs: int
    config: str = DEFAULT_CONFIG
    cuda_arch: str | None = None
    portable: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for the build commands."""

    @property
    def log_path(self) -> Path:
        """``build.log`` in the build folder (appended to by every run, kept)."""
        return self.build_dir / LOG_NAME

    @property
    def generator(self) -> str | None:
        """The CMake generator (None = CMake's default)."""
        return self.toolchain.generator

    def configure_command(self) -> list[str]:
        """``cmake -S <tree> -B <build> [-G Ninja] -D...``."""
        cmd = [self.toolchain.cmake, "-S", str(self.source.path), "-B", str(self.build_dir)]
        if self.toolchain.generator:
            cmd += ["-G", self.toolchain.generator]
        return [*cmd, *self.flags]

    def build_command(self) -> list[str]:
        """``cmake --build <build> --config Release --parallel N --target <targets>``."""
        return [
            self.toolchain.cmake,
            "--build",
            str(self.build_dir),
            "--config",
            self.config,
            "--parallel",
            str(self.jobs),
            "--target",
            *self.targets,
        ]


def _cuda_arch(
    request: BuildRequest, settings: BuildView, manifest: Manifest, tools: Toolchain
) -> str | None:
    """``CMAKE_CUDA_ARCHITECTURES`` for the build (None: not CUDA, or llama.cpp's default)."""
    variant = request.variant
    variant_flags = variant.portable_cmake_flags if request.portable else variant.cmake_flags
    if not is_cuda_build(variant, [*manifest.cmake_flags, *variant_flags]):
        return None
    host = None if request.portable else request.host
    arch = resolve_cuda_arch(
        settings.cuda_arch,
        compute_capabilities=host.compute_capabilities if host is not None else (),
        nvcc_version=tools.nvcc_version,
        cmake_version=tools.cmake_version,
        portable=request.portable,
    )
    if arch == "native" and host is not None and host.nvidia_driver is None:
        # CMake would only find out after a minute of configuring.
        msg = (
            "no NVIDIA GPU is visible on this host, so there is no 'native' CUDA "
            "architecture to build for: pass --cuda-arch with the target GPUs' compute "
            "capability (e.g. 86;90, LLAMA_PROC_CUDA_ARCH) or --portable"
        )
        raise ConfigError(msg)
    return arch


def plan_build(
    request: BuildRequest,
    source: SourceTree,
    settings: BuildView,
    *,
    manifest: Manifest,
    toolchain: Toolchain | None = None,
) -> BuildPlan:
    """Decide the tools, flags, targets and build folder of a build.

    Args:
        request: the checked inputs (:func:`check_request`).
        source: the llama.cpp tree.
        settings: cache root, ``jobs`` (default: the CPU count) and ``cuda_arch`` (default:
            the host's GPUs).
        manifest: ``[build] cmake_flags``.
        toolchain: the tools to use (default: :func:`~llama_proc.provision.compile.toolchain.find_toolchain`).

    Raises:
        ToolNotFoundError: a needed tool is missing.
        ConfigError: bad CUDA architectures, or ``native`` with no GPU visible.
        ProvisionError: the variant's targets are not in the tree.
    """
    variant = request.variant
    tools = toolchain or find_toolchain(variant.backend, request.os_name)
    arch = _cuda_arch(request, settings, manifest, tools)
    flags = compose_cmake_flags(
        variant,
        manifest.cmake_flags,
        os_name=request.os_name,
        portable=request.portable,
        build_number=source.build_number,
        commit=source.commit,
        cuda_arch=arch,
        cuda_compiler=tools.nvcc,
        cuda_toolkit_root=tools.cuda_root,
        launcher=tools.ccache,
        make_program=tools.ninja,
        cmake_args=request.cmake_args,
    )
    targets = resolve_targets(variant.targets, defined_targets(source.path))
    key = build_key(source.identity or f"local:{source.path}", tools.generator, flags)
    return BuildPlan(
        source=source,
        variant_id=variant.id,
        build_dir=settings.cache_dir / BUILD_DIR / key,
        key=key,
        toolchain=tools,
        flags=tuple(flags),
        targets=tuple(targets),
        jobs=settings.jobs or os.cpu_count() or 1,
        config=flag_value(flags, "CMAKE_BUILD_TYPE") or DEFAULT_CONFIG,
        cuda_arch=arch,
        portable=request.portable,
        env={"NINJA_STATUS": NINJA_STATUS},
    )
