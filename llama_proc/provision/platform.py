"""Host detection: OS, arch, libc, CPU features, GPUs.

Detection never hangs (every probe has a timeout) and never raises: what cannot be found is
reported as unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["HostInfo", "detect_host"]


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

    @property
    def platform(self) -> str:
        """``<os>-<arch>``, the manifest's platform key."""
        return f"{self.os}-{self.arch}"

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
            parts.append(f"NVIDIA driver {self.nvidia_driver} (CUDA {self.cuda_version or '?'}{cc})")
        if self.apple_silicon:
            parts.append("Apple silicon" + (" under Rosetta" if self.rosetta else ""))
        if self.vulkan:
            parts.append("Vulkan loader")
        return ", ".join(parts)


def detect_host() -> HostInfo:
    """Detect this host. Never raises; unknown facts are left empty."""
    raise NotImplementedError
