"""What host detection found: the HostInfo record and the OS and arch names it uses.

Normalized names (``linux``/``macos``/``windows``, ``x86_64``/``aarch64``) so that a record
built anywhere compares with one detected here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Final

SOFTWARE_VULKAN_ICDS: Final = ("lvp", "lavapipe", "llvmpipe", "swiftshader")
"""ICD manifest names containing one of these are CPU renderers, not GPUs."""

LLAMA_CPU_FEATURES: Final = (
    "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f",
    "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
    "neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme",
)  # fmt: skip
"""The CPU features llama.cpp's CPU backends select on, in a stable order for reports."""


@dataclass(frozen=True)
class HostInfo:
    """What matters about this machine for choosing a llama-server variant."""

    os: str
    """``linux``, ``macos`` or ``windows``."""
    arch: str
    """Normalised machine: ``x86_64``, ``aarch64`` (Linux) or ``arm64`` (macOS)."""
    os_version: str | None = None
    """Kernel release on Linux, product version on macOS, build on Windows."""
    libc: str | None = None
    """``glibc``, ``musl`` or None (not Linux / unknown)."""
    libc_version: str | None = None
    cpu_features: frozenset[str] = field(default_factory=frozenset)
    """Lowercase feature names: sse4_2, avx, avx2, fma, f16c, avx512f, neon, ..."""
    nvidia_driver: str | None = None
    cuda_version: str | None = None
    """Highest CUDA version the driver supports, e.g. ``12.4``."""
    gpus: tuple[str, ...] = ()
    """GPU names, when known."""
    compute_capabilities: tuple[str, ...] = ()
    """NVIDIA compute capabilities, e.g. ``("9.0",)``."""
    vulkan: bool = False
    """A Vulkan loader library is present."""
    apple_silicon: bool = False
    """The CPU is Apple silicon (also true under Rosetta)."""
    rosetta: bool = False
    """This process is an x86_64 process translated by Rosetta 2."""
    cpu_count: int = 1
    wsl: bool = False
    """Linux running under Windows Subsystem for Linux."""
    vulkan_icds: tuple[str, ...] = ()
    """Vulkan driver manifests (ICD ``.json`` file names) found on Linux, e.g.
    ``nvidia_icd.json``, ``radeon_icd.x86_64.json``; ``lvp_*`` is a CPU renderer."""
    amd_driver: bool = False
    """An AMD GPU compute driver is present (Linux: the KFD topology; Windows: the HIP DLL)."""
    amd_gpus: tuple[str, ...] = ()
    """gfx targets of the AMD GPUs, e.g. ``("gfx1100",)`` (empty = none found or unknown)."""
    hip_runtime: bool = False
    """The HIP runtime library (``libamdhip64``) is on the loader path (Linux)."""
    notes: tuple[str, ...] = ()
    """What a probe could not find out, and why (for ``llama-proc doctor``)."""

    @property
    def platform(self) -> str:
        """``<os>-<arch>``, the manifest's platform key."""
        return f"{self.os}-{self.arch}"

    @property
    def vulkan_gpu_icds(self) -> tuple[str, ...]:
        """The Vulkan ICDs that drive a GPU (CPU renderers such as lavapipe left out)."""
        return tuple(
            i for i in self.vulkan_icds if not any(m in i.lower() for m in SOFTWARE_VULKAN_ICDS)
        )

    def summary(self) -> str:
        """One line describing the host."""
        parts = [self.platform]
        if self.libc:
            parts.append(f"{self.libc} {self.libc_version or '?'}")
        simd = [f for f in ("avx512f", "avx2", "avx", "neon") if f in self.cpu_features]
        if simd:
            parts.append(simd[0])
        if self.nvidia_driver:
            cc = f", sm {','.join(self.compute_capabilities)}" if self.compute_capabilities else ""
            parts.append(
                f"NVIDIA driver {self.nvidia_driver} (CUDA {self.cuda_version or '?'}{cc})"
            )
        if self.apple_silicon:
            parts.append("Apple silicon" + (" under Rosetta" if self.rosetta else ""))
        if self.amd_gpus or self.amd_driver:
            parts.append(f"AMD {','.join(self.amd_gpus) or 'GPU (gfx target unknown)'}")
        if self.vulkan:
            parts.append("Vulkan loader")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields for ``install.json`` (CPU features: those llama.cpp uses)."""
        return {
            "platform": self.platform,
            "os_version": self.os_version,
            "libc": self.libc,
            "libc_version": self.libc_version,
            "cpu_features": [f for f in LLAMA_CPU_FEATURES if f in self.cpu_features],
            "nvidia_driver": self.nvidia_driver,
            "cuda_version": self.cuda_version,
            "gpus": list(self.gpus),
            "compute_capabilities": list(self.compute_capabilities),
            "vulkan": self.vulkan,
            "vulkan_icds": list(self.vulkan_icds),
            "amd_driver": self.amd_driver,
            "amd_gpus": list(self.amd_gpus),
            "hip_runtime": self.hip_runtime,
            "apple_silicon": self.apple_silicon,
            "rosetta": self.rosetta,
            "wsl": self.wsl,
            "cpu_count": self.cpu_count,
            "summary": self.summary(),
        }


# ----------------------------------------------------------------------------- pure parsing
def normalize_os(sys_platform: str) -> str:
    """``sys.platform`` -> ``linux``, ``macos``, ``windows`` (others pass through)."""
    if sys_platform.startswith("linux"):
        return "linux"
    if sys_platform == "darwin":
        return "macos"
    if sys_platform in ("win32", "cygwin"):
        return "windows"
    return sys_platform


def host_os() -> str:
    """This process's OS as the manifest names it (``linux``, ``macos``, ``windows``)."""
    return normalize_os(sys.platform)


def normalize_arch(machine: str, os_name: str, *, is_64bit: bool = True) -> str:
    """``platform.machine()`` -> the manifest's arch names.

    ``AMD64``/``x64`` become ``x86_64``; 64-bit Arm is ``arm64`` on macOS and Windows and
    ``aarch64`` on Linux. A 32-bit interpreter on a 64-bit OS reports its own (32-bit) arch,
    since that is what it can load.
    """
    m = machine.strip().lower()
    if m in ("x86_64", "amd64", "x64", "em64t"):
        return "x86_64" if is_64bit else "x86"
    if m in ("i386", "i486", "i586", "i686", "x86"):
        return "x86"
    if m in ("aarch64", "arm64", "armv8", "armv8l", "aarch64_be"):
        if not is_64bit:
            return "arm"
        return "aarch64" if os_name == "linux" else "arm64"
    return m or "unknown"
