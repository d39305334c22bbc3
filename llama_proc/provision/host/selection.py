"""Choose the manifest variant a host should run, and say why.

Pure functions over :class:`~llama_proc.provision.manifest.Manifest` and
:class:`~llama_proc.provision.host.platform.HostInfo`, so every decision is table-testable.

``auto`` walks a chain of backends, best first: CUDA (the newest toolkit the driver can run
first, so CUDA 13 before CUDA 12), ROCm, Metal, Vulkan, then the CPU. Each step it passes over
is kept as a :class:`Candidate` whose :class:`Blocker` entries say why (a kind for code, a
sentence for people); ``doctor`` and ``which -v`` print them from
:attr:`Selection.candidates`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from packaging.version import InvalidVersion, Version

from llama_proc.backends import auto_chain
from llama_proc.errors import NoMatchingVariantError
from llama_proc.vocab import AUTO

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from llama_proc.provision.host.host_info import HostInfo
    from llama_proc.provision.manifest_records import Manifest, Variant

__all__ = [
    "AUTO_CHAIN",
    "Blocker",
    "BlockerKind",
    "Candidate",
    "Selection",
    "prebuilt_blockers",
    "prebuilt_problems",
    "runtime_blockers",
    "runtime_problems",
    "select_variant",
]

AUTO_CHAIN: Final = auto_chain()
"""Backends ``auto`` tries, best first (``rpc`` is only chosen when asked for)."""


class BlockerKind(StrEnum):
    """Why a variant (or its prebuilt archive) cannot be used on a host."""

    NO_PREBUILT = "no_prebuilt"
    NOT_GLIBC = "not_glibc"
    GLIBC_TOO_OLD = "glibc_too_old"
    CPU_FEATURES = "cpu_features"
    MACOS_TOO_OLD = "macos_too_old"
    NO_NVIDIA_DRIVER = "no_nvidia_driver"
    DRIVER_TOO_OLD = "driver_too_old"
    """The NVIDIA driver is older than the floor of the build's CUDA major version."""
    CUDA_TOO_OLD = "cuda_too_old"
    """The driver's CUDA version is older than the toolkit the build was made with."""
    NO_AMD_GPU = "no_amd_gpu"
    GFX_UNKNOWN = "gfx_unknown"
    GFX_UNSUPPORTED = "gfx_unsupported"
    NO_HIP_RUNTIME = "no_hip_runtime"
    NO_VULKAN_LOADER = "no_vulkan_loader"
    NO_VULKAN_DRIVER = "no_vulkan_driver"
    """A Vulkan loader but no GPU driver (ICD) for it; ``auto`` only."""
    NOT_APPLE_SILICON = "not_apple_silicon"


@dataclass(frozen=True)
class Blocker:
    """One reason, as a kind for code and a sentence for people."""

    kind: BlockerKind
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Candidate:
    """A variant selection considered, and what kept it from being chosen."""

    variant: Variant
    blockers: tuple[Blocker, ...] = ()
    """Empty for the chosen candidate (``auto``) or one with nothing against it."""

    @property
    def usable(self) -> bool:
        """Whether nothing speaks against running this variant here."""
        return not self.blockers


@dataclass(frozen=True)
class Selection:
    """The chosen variant and the reasoning behind it."""

    variant: Variant
    why: tuple[str, ...]
    """One line per decision, for ``doctor`` and ``which -v``."""
    blockers: tuple[str, ...] = field(default=())
    """Why the prebuilt archive cannot be used here (empty = it can)."""
    candidates: tuple[Candidate, ...] = field(default=())
    """The variants considered, in order, ending with the chosen one; each skipped one says
    why in its ``blockers`` (``auto``: the chain; a requested backend: its variants)."""
    prebuilt_reasons: tuple[Blocker, ...] = field(default=())
    """:attr:`blockers` with their kinds."""

    @property
    def prebuilt_ok(self) -> bool:
        """Whether a prebuilt archive exists and fits this host."""
        return not self.blockers

    @property
    def skipped(self) -> tuple[Candidate, ...]:
        """The candidates passed over before the chosen one."""
        return tuple(c for c in self.candidates if c.variant is not self.variant)


def _older(have: str | None, need: str) -> bool:
    if have is None:
        return True
    try:
        return Version(have) < Version(need)
    except InvalidVersion:
        return True


def _version(text: str | None) -> Version:
    try:
        return Version(text) if text else Version("0")
    except InvalidVersion:
        return Version("0")


def prebuilt_problems(variant: Variant, host: HostInfo) -> list[Blocker]:
    """Reasons the variant's prebuilt archive cannot run on ``host`` (empty = it can)."""
    if not variant.has_prebuilt:
        text = f"upstream publishes no prebuilt archive for {variant.id}"
        return [Blocker(BlockerKind.NO_PREBUILT, text)]
    req = variant.requires
    out: list[Blocker] = []
    if req.glibc and host.os == "linux":
        if host.libc != "glibc":
            text = f"the prebuilt needs glibc; this host has {host.libc or 'an unknown libc'}"
            out.append(Blocker(BlockerKind.NOT_GLIBC, text))
        elif _older(host.libc_version, req.glibc):
            text = f"the prebuilt needs glibc >= {req.glibc}; this host has {host.libc_version}"
            out.append(Blocker(BlockerKind.GLIBC_TOO_OLD, text))
    missing = [f for f in req.cpu_features if f not in host.cpu_features]
    if missing:
        text = f"the prebuilt needs CPU features {', '.join(missing)} that this CPU lacks"
        out.append(Blocker(BlockerKind.CPU_FEATURES, text))
    if req.macos and host.os == "macos" and _older(host.os_version, req.macos):
        text = f"the prebuilt needs macOS >= {req.macos}; this host has {host.os_version}"
        out.append(Blocker(BlockerKind.MACOS_TOO_OLD, text))
    out.extend(runtime_problems(variant, host))
    return out


def prebuilt_blockers(variant: Variant, host: HostInfo) -> list[str]:
    """:func:`prebuilt_problems` as sentences."""
    return [b.text for b in prebuilt_problems(variant, host)]


def _cuda_problems(variant: Variant, host: HostInfo) -> list[Blocker]:
    req = variant.requires
    if host.nvidia_driver is None and host.cuda_version is None:
        text = "no NVIDIA driver found (libcuda / nvidia-smi)"
        return [Blocker(BlockerKind.NO_NVIDIA_DRIVER, text)]
    if host.nvidia_driver and req.nvidia_driver and _older(host.nvidia_driver, req.nvidia_driver):
        text = (
            f"NVIDIA driver {host.nvidia_driver} is older than the {req.nvidia_driver} "
            "this build needs; update the driver"
        )
        return [Blocker(BlockerKind.DRIVER_TOO_OLD, text)]
    # PTX built by a newer toolkit than the driver's cannot be JIT-compiled: never pick a
    # build newer than the CUDA version the driver reports.
    if req.cuda and host.cuda_version and _older(host.cuda_version, req.cuda):
        text = f"the driver supports CUDA {host.cuda_version}; the build needs {req.cuda}"
        return [Blocker(BlockerKind.CUDA_TOO_OLD, text)]
    return []


def _amd_problems(variant: Variant, host: HostInfo) -> list[Blocker]:
    req = variant.requires
    out: list[Blocker] = []
    if not host.amd_driver and not host.amd_gpus:
        text = "no AMD GPU found (no ROCm kernel driver / HIP runtime)"
        return [Blocker(BlockerKind.NO_AMD_GPU, text)]
    if host.amd_gpus and req.gfx_targets and not set(host.amd_gpus) & set(req.gfx_targets):
        text = (
            f"AMD GPU {', '.join(host.amd_gpus)} is not supported by this build (it has code "
            f"for {', '.join(req.gfx_targets)})"
        )
        out.append(Blocker(BlockerKind.GFX_UNSUPPORTED, text))
    if req.hip_runtime and host.os == "linux" and not host.hip_runtime:
        text = "the HIP runtime (libamdhip64) is not on the loader path; install ROCm"
        out.append(Blocker(BlockerKind.NO_HIP_RUNTIME, text))
    return out


def runtime_problems(variant: Variant, host: HostInfo) -> list[Blocker]:
    """Reasons the variant's backend cannot work on ``host`` however it is obtained."""
    req = variant.requires
    out: list[Blocker] = []
    if variant.backend == "cuda":
        out.extend(_cuda_problems(variant, host))
    if variant.backend == "rocm" or req.gfx_targets:
        out.extend(_amd_problems(variant, host))
    if req.vulkan and not host.vulkan:
        out.append(Blocker(BlockerKind.NO_VULKAN_LOADER, "no Vulkan loader (libvulkan) found"))
    if req.apple_silicon and not host.apple_silicon:
        out.append(Blocker(BlockerKind.NOT_APPLE_SILICON, "Metal builds need native Apple silicon"))
    return out


def runtime_blockers(variant: Variant, host: HostInfo) -> list[str]:
    """:func:`runtime_problems` as sentences."""
    return [b.text for b in runtime_problems(variant, host)]


def _doubts(variant: Variant, host: HostInfo) -> list[Blocker]:
    """What makes ``auto`` pass a backend over although a request for it would go ahead."""
    out: list[Blocker] = []
    linux_vulkan = variant.backend == "vulkan" and host.os == "linux" and host.vulkan
    if linux_vulkan and not host.vulkan_gpu_icds:
        only = f" (only {', '.join(host.vulkan_icds)})" if host.vulkan_icds else ""
        text = f"a Vulkan loader but no GPU Vulkan driver (ICD) is installed{only}"
        out.append(Blocker(BlockerKind.NO_VULKAN_DRIVER, text))
    if variant.backend == "rocm" and host.amd_driver and not host.amd_gpus:
        text = "an AMD GPU driver is present but its gfx target is unknown (install rocminfo)"
        out.append(Blocker(BlockerKind.GFX_UNKNOWN, text))
    return out


def _ordered(variants: Iterable[Variant]) -> list[Variant]:
    """Chain order: by backend, and newest CUDA toolkit first within a backend."""
    rank = {b: i for i, b in enumerate(AUTO_CHAIN)}
    return sorted(
        variants,
        key=lambda v: (rank.get(v.backend, len(rank)), -_rank_version(v.requires.cuda)),
    )


def _rank_version(text: str | None) -> float:
    v = _version(text)
    return v.major * 1000 + v.minor


def _skip_line(skipped: Sequence[Candidate]) -> str:
    # Neighbours skipped for the same reasons share one entry ("no NVIDIA driver" for both
    # CUDA builds), so the line stays readable.
    groups: list[tuple[list[str], str]] = []
    for cand in skipped:
        reason = "; ".join(b.text for b in cand.blockers)
        if groups and groups[-1][1] == reason:
            groups[-1][0].append(cand.variant.id)
        else:
            groups.append(([cand.variant.id], reason))
    return "skip " + " | ".join(f"{', '.join(ids)}: {reason}" for ids, reason in groups)


def select_variant(manifest: Manifest, host: HostInfo, requested: str = AUTO) -> Selection:
    """Pick the variant for ``host``.

    ``auto`` takes the first variant of the chain (:data:`AUTO_CHAIN`) with nothing against
    it; RPC is only chosen when asked for. A requested backend takes its newest variant the host
    can run, else its most compatible one (with warnings, and a source build where the prebuilt
    cannot run).

    Args:
        manifest: the parsed manifest.
        host: the detected host.
        requested: ``auto`` or a backend name (cpu, cuda, rocm, metal, vulkan, rpc).

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
    variants = _ordered(manifest.for_platform(host.os, arch))
    if not variants:
        msg = (
            f"llama-proc has no variants for {host.os}-{arch}; build llama-server yourself "
            "and point LLAMA_PROC_SERVER_BIN at it"
        )
        raise NoMatchingVariantError(msg)
    why: list[str] = [f"host: {host.summary()}", *notes]
    if requested != AUTO:
        return _requested(variants, host, requested, why, f"{host.os}-{arch}")
    considered: list[Candidate] = []
    for variant in (v for v in variants if v.backend in AUTO_CHAIN):
        candidate = Candidate(
            variant, tuple(runtime_problems(variant, host) + _doubts(variant, host))
        )
        considered.append(candidate)
        if candidate.usable:
            if considered[:-1]:
                why.append(_skip_line(considered[:-1]))
            why.append(f"{variant.id}: best backend this host can run")
            reasons = prebuilt_problems(variant, host)
            return Selection(
                variant, tuple(why), tuple(b.text for b in reasons), tuple(considered),
                tuple(reasons),
            )  # fmt: skip
    if considered:
        why.append(_skip_line(considered))
    msg = f"no variant for {host.os}-{arch} can run here: " + "; ".join(why[1:])
    raise NoMatchingVariantError(msg)


def _requested(
    variants: Sequence[Variant], host: HostInfo, requested: str, why: list[str], platform: str
) -> Selection:
    group = [v for v in variants if v.backend == requested]
    if not group:
        have = ", ".join(sorted({v.backend for v in variants}))
        msg = f"no {requested} variant for {platform}; available: {have}"
        raise NoMatchingVariantError(msg)
    considered = [Candidate(v, tuple(runtime_problems(v, host))) for v in group]
    # None can run here: the last (oldest toolkit, else source-only) asks the least of the host.
    chosen = next((c for c in considered if c.usable), considered[-1])
    considered = considered[: considered.index(chosen) + 1]
    if considered[:-1]:
        why.append(_skip_line(considered[:-1]))
    why.append(f"{chosen.variant.id}: requested explicitly")
    why.extend(f"warning: {b.text}" for b in chosen.blockers + tuple(_doubts(chosen.variant, host)))
    reasons = prebuilt_problems(chosen.variant, host)
    return Selection(
        chosen.variant, tuple(why), tuple(b.text for b in reasons), tuple(considered),
        tuple(reasons),
    )  # fmt: skip
