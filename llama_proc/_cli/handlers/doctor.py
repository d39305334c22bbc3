"""``llama-proc doctor``: the host, its tools, the chosen variant and the cache, in one report."""

from __future__ import annotations

import platform as pyplatform
import shutil
import sys
import sysconfig
from typing import TYPE_CHECKING, Final

import llama_proc.provision.host.platform as host_platform
import llama_proc.provision.host.selection as host_selection
from llama_proc._cli.common import settings_from_args
from llama_proc._cli.handlers import smoke
from llama_proc._cli.handlers.cache import kind_lines
from llama_proc._cli.handlers.output import (
    chain_lines,
    compute_line,
    print_steps,
    reasons,
    size_mb,
)
from llama_proc._version import __version__
from llama_proc.errors import LlamaProcError
from llama_proc.provision.cache.inventory import list_installs
from llama_proc.provision.cache.record import compute_summary
from llama_proc.provision.cache.store import Cache
from llama_proc.provision.compile import toolchain
from llama_proc.provision.compute.plan import initial_off
from llama_proc.provision.explain import StepName
from llama_proc.provision.host.platform import LLAMA_CPU_FEATURES, HostInfo
from llama_proc.provision.manifest import Manifest, load_manifest
from llama_proc.provision.resolve import resolve_server

if TYPE_CHECKING:
    import argparse

    from llama_proc.config import Settings

BUILD_TOOLS: Final = ("cmake", "ninja", "cc", "c++", "cl", "nvcc", "ccache", "git")


def _host_lines(host: HostInfo) -> list[str]:
    cpu = [f for f in LLAMA_CPU_FEATURES if f in host.cpu_features]
    lines = [
        f"host: {host.summary()}",
        f"  os: {host.os} {host.os_version or '?'}" + (" (WSL)" if host.wsl else ""),
        f"  arch: {host.arch}" + (" (Rosetta 2 translation)" if host.rosetta else ""),
    ]
    if host.os == "linux":
        lines.append(f"  libc: {host.libc or 'unknown'} {host.libc_version or ''}".rstrip())
    lines.append(f"  cpu: {host.cpu_count} cores; features: {' '.join(cpu) or 'none detected'}")
    if host.nvidia_driver or host.cuda_version:
        lines.append(
            f"  nvidia: driver {host.nvidia_driver or '?'}, CUDA {host.cuda_version or '?'}"
        )
        caps = list(host.compute_capabilities) + ["?"] * len(host.gpus)
        lines.extend(
            f"    gpu: {name} (compute capability {cc})"
            for name, cc in zip(host.gpus, caps, strict=False)
        )
    else:
        lines.append("  nvidia: no driver found")
    lines.append(f"  vulkan loader: {'yes' if host.vulkan else 'no'}")
    if host.os == "macos":
        lines.append(f"  apple silicon: {'yes' if host.apple_silicon else 'no'}")
    lines.extend(f"  note: {note}" for note in host.notes)
    return lines


def _tool_lines() -> list[str]:
    scripts = sysconfig.get_path("scripts")
    found: list[str] = []
    for tool in BUILD_TOOLS:
        path = shutil.which(tool) or shutil.which(tool, path=scripts)
        if path:
            found.append(f"{tool}={path}")
    return ["build tools: " + (", ".join(found) if found else "none found on PATH")]


def _cuda_toolkit_line(host: HostInfo, manifest: Manifest) -> str:
    """Which CUDA toolkit a CUDA source build here would use, and why."""
    choice = toolchain.choose_cuda_toolkit(
        host, manifest.cuda_toolkits, os_name=host.os, arch=host.arch
    ).as_dict()
    version = f" {choice['version']}" if choice["version"] else ""
    return f"CUDA toolkit for source builds: {choice['source']}{version} ({choice['reason']})"


def _cache_lines(settings: Settings) -> list[str]:
    installs = list_installs(settings)
    total = sum(
        i.metadata.get("size", 0) for i in installs if isinstance(i.metadata.get("size"), int)
    )
    lines = [f"cache: {settings.cache_dir} ({len(installs)} installs, {size_mb(total)})"]
    lines.extend(
        f"  {i.id} ({i.source}, {i.version or '?'}); compute: {compute_summary(i.compute)}"
        for i in installs
    )
    left = Cache.of(settings).leftovers()
    if left.staging or left.parts:
        lines.append(
            f"  leftovers: {len(left.staging)} interrupted install(s), {len(left.parts)} partial "
            "download(s); `llama-proc cache prune` removes them"
        )
    lines.append(f"  lock files: {len(left.locks)}")
    lines.extend("  " + line for line in kind_lines(settings.cache_dir)[1:])
    return lines


def _cpu_off_line(host: HostInfo, manifest: Manifest, settings: Settings) -> str:
    """Which CPU feature groups new installs here leave off from the start, and why."""
    build = settings.build or manifest.build
    ladder, off = initial_off(
        host.arch, host.cpu_features, manifest.known_bad_groups(build), settings.cpu_off
    )
    head = f"cpu feature groups: {', '.join(g.name for g in ladder) or 'none'} on this host"
    if not off:
        return f"{head}; none off for new installs (the compute check confirms each install)"
    why = "; ".join(f"{name}: {text}" for name, text in off.items())
    return f"{head}; off for new installs: {why}"


def doctor(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    print(f"llama-proc {__version__} (Python {pyplatform.python_version()}, {sys.executable})")
    host = host_platform.detect_host(gpu_details=True)
    for line in _host_lines(host):
        print(line)
    try:
        manifest = load_manifest()
    except LlamaProcError as err:
        print(f"manifest: error: {err}")
        return 1
    print(
        f"manifest: {manifest.path} (pinned build {manifest.build}, "
        f"{len(manifest.for_platform(host.os, host.arch))} variants for {host.platform})"
    )
    print(_cpu_off_line(host, manifest, settings))
    print(
        f"settings: variant={settings.variant} build={settings.build or manifest.build} "
        f"prefer={settings.prefer} no_build={settings.no_build} "
        f"no_prebuilt={settings.no_prebuilt} offline={settings.offline} "
        f"mirror={settings.mirror or '-'} server_bin={settings.server_binary or '-'}"
    )
    try:
        selection = host_selection.select_variant(manifest, host, settings.variant)
    except LlamaProcError as err:
        print(f"selection:\n  error: {err}")
    else:
        print("selection:")
        for line in chain_lines(selection, settings.variant):
            print(f"  {line}")
        if selection.prebuilt_reasons:
            why = reasons(selection.prebuilt_reasons)
            print(f"  prebuilt: blocked ({why}); a source build is needed")
        else:
            print("  prebuilt: fits this host")
    print("resolution (no download, no build):")
    explain: list[str] = []
    try:
        install = resolve_server(
            settings, explain=explain, provision=False, host=host, manifest=manifest
        )
    except LlamaProcError as err:
        result = f"=> not ready: {err}"
    else:
        explain.append(compute_line(install))
        result = f"=> {install.server_binary}"
    print_steps(explain, skip=(StepName.SELECT,), out=sys.stdout)  # the selection is printed above
    print(f"  {result}")
    for line in _cache_lines(settings):
        print(line)
    for line in _tool_lines():
        print(line)
    print(_cuda_toolkit_line(host, manifest))
    if getattr(args, "smoke", False):
        return int(smoke.run_smoke(args))
    return 0
