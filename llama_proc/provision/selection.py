"""Choose the manifest variant a host should run, and say why.

Pure functions over :class:`~llama_proc.provision.manifest.Manifest` and
:class:`~llama_proc.provision.platform.HostInfo`, so every decision is table-testable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from packaging.version import InvalidVersion, Version

from llama_proc.errors import NoMatchingVariantError

if TYPE_CHECKING:
    from llama_proc.provision.manifest import Manifest, Variant
    from llama_proc.provision.platform import HostInfo

__all__ = ["Selection", "prebuilt_blockers", "select_variant"]

_AUTO_ORDER: Final = ("cuda", "metal", "cpu")


@dataclass(frozen=True)
class Selection:
    """The chosen variant and the reasoning behind it."""

    variant: Variant
    why: tuple[str, ...]
    """One line per decision, for ``doctor`` and ``which -v``."""
    blockers: tuple[str, ...] = field(default=())
    """Why the prebuilt archive cannot be used here (empty = it can)."""

    @property
    def prebuilt_ok(self) -> bool:
        """Whether a prebuilt archive exists and fits this host."""
        return not self.blockers


def _older(have: str | None, need: str) -> bool:
    if have is None:
        return True
    try:
        return Version(have) < Version(need)
    except InvalidVersion:
        return True


def prebuilt_blockers(variant: Variant, host: HostInfo) -> list[str]:
    """Reasons the variant's prebuilt archive cannot run on ``host`` (empty = it can)."""
    if not variant.has_prebuilt:
        return [f"upstream publishes no prebuilt archive for {variant.id}"]
    req = variant.requires
    out: list[str] = []
    if req.glibc and host.os == "linux":
        if host.libc != "glibc":
            out.append(f"the prebuilt needs glibc; this host has {host.libc or 'an unknown libc'}")
        elif _older(host.libc_version, req.glibc):
            out.append(
                f"the prebuilt needs glibc >= {req.glibc}; this host has {host.libc_version}"
            )
    missing = [f for f in req.cpu_features if f not in host.cpu_features]
    if missing:
        out.append(f"the prebuilt needs CPU features {', '.join(missing)} that this CPU lacks")
    if req.macos and host.os == "macos" and _older(host.os_version, req.macos):
        out.append(f"the prebuilt needs macOS >= {req.macos}; this host has {host.os_version}")
    out.extend(runtime_blockers(variant, host))
    return out


def runtime_blockers(variant: Variant, host: HostInfo) -> list[str]:
    """Reasons the variant's backend cannot work on ``host`` however it is obtained."""
    req = variant.requires
    out: list[str] = []
    if variant.backend == "cuda":
        if host.nvidia_driver is None:
            out.append("no NVIDIA driver found (libcuda / nvidia-smi)")
        elif req.nvidia_driver and _older(host.nvidia_driver, req.nvidia_driver):
            out.append(
                f"NVIDIA driver {host.nvidia_driver} is older than the {req.nvidia_driver} "
                "this build needs; update the driver"
            )
        elif req.cuda and host.cuda_version and _older(host.cuda_version, req.cuda):
            out.append(f"the driver supports CUDA {host.cuda_version}; the build needs {req.cuda}")
    if req.vulkan and not host.vulkan:
        out.append("no Vulkan loader (libvulkan) found")
    if req.apple_silicon and not host.apple_silicon:
        out.append("Metal builds need native Apple silicon")
    return out


def select_variant(manifest: Manifest, host: HostInfo, requested: str = "auto") -> Selection:
    """Pick the variant for ``host``.

    ``auto`` prefers CUDA when an NVIDIA driver is present, Metal on Apple silicon, else CPU;
    Vulkan and RPC are only chosen when asked for.

    Args:
        manifest: the parsed manifest.
        host: the detected host.
        requested: ``auto`` or a backend name (cpu, cuda, metal, vulkan, rpc).

    Raises:
        NoMatchingVariantError: nothing in the manifest fits.
    """
    arch = host.arch
    notes: list[str] = []
    if host.os == "macos" and host.rosetta:
        # llama-server is a process of its own: an x86_64 Python under Rosetta can still run the
        # native arm64 build (and Metal) instead of a translated x86_64 one.
        arch = "arm64"
        notes.append("this Python runs under Rosetta; choosing native arm64 builds for the server")
    candidates = manifest.for_platform(host.os, arch)
    if not candidates:
        msg = (
            f"llama-proc has no variants for {host.os}-{arch}; build llama-server yourself "
            "and point LLAMA_PROC_SERVER_BIN at it"
        )
        raise NoMatchingVariantError(msg)
    by_backend = {v.backend: v for v in candidates}
    why: list[str] = [f"host: {host.summary()}", *notes]
    if requested != "auto":
        variant = by_backend.get(requested)
        if variant is None:
            have = ", ".join(sorted(by_backend))
            msg = f"no {requested} variant for {host.os}-{arch}; available: {have}"
            raise NoMatchingVariantError(msg)
        why.append(f"{variant.id}: requested explicitly")
        problems = runtime_blockers(variant, host)
        why.extend(f"warning: {p}" for p in problems)
        return Selection(variant, tuple(why), tuple(prebuilt_blockers(variant, host)))
    for backend in _AUTO_ORDER:
        variant = by_backend.get(backend)
        if variant is None:
            continue
        problems = runtime_blockers(variant, host)
        if problems:
            why.append(f"skip {variant.id}: {'; '.join(problems)}")
            continue
        why.append(f"{variant.id}: best backend this host can run")
        return Selection(variant, tuple(why), tuple(prebuilt_blockers(variant, host)))
    msg = f"no variant for {host.os}-{arch} can run here: " + "; ".join(why[1:])
    raise NoMatchingVariantError(msg)
