"""The llama.cpp backends llama-proc knows, one row each: the one home of backend facts.

A row carries how messages name the backend, its ggml library (``libggml-<library>``), the
prefix llama-server gives its devices (``CUDA0``, ``MTL0``), its place in the ``auto`` chain and
the host probe that says what GPU on this host a build of it must show. ``--variant`` choices,
the auto chain, device names and the install's device check all read this table, so a backend
is added with one row.

A leaf module (standard library only): the host probe reads a :class:`HostGpuFacts`, which
:class:`~llama_proc.provision.host.host_info.HostInfo` satisfies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "TABLE",
    "Backend",
    "HostGpuFacts",
    "auto_chain",
    "backend_names",
    "from_device_prefix",
    "get_backend",
]


class HostGpuFacts(Protocol):
    """What host detection found that the host probes read."""

    @property
    def os(self) -> str: ...  # noqa: D102
    @property
    def nvidia_driver(self) -> str | None: ...  # noqa: D102
    @property
    def cuda_version(self) -> str | None: ...  # noqa: D102
    @property
    def amd_driver(self) -> bool: ...  # noqa: D102
    @property
    def amd_gpus(self) -> tuple[str, ...]: ...  # noqa: D102
    @property
    def vulkan_gpu_icds(self) -> tuple[str, ...]: ...  # noqa: D102
    @property
    def apple_silicon(self) -> bool: ...  # noqa: D102


@dataclass(frozen=True)
class Backend:
    """One llama.cpp backend."""

    name: str
    """The manifest's and ``--variant``'s word: ``cuda``, ``rocm``..."""
    label: str
    """How messages name it: ``CUDA``, ``ROCm``..."""
    library: str | None = None
    """Its ggml backend library: ``hip`` for ``libggml-hip.so`` / ``ggml-hip.dll``."""
    device_prefix: str | None = None
    """How llama-server names its devices, before the number: ``MTL`` for ``MTL0``."""
    auto_rank: int | None = None
    """Its place in the ``auto`` chain, best first; None: only chosen when asked for."""
    host_gpu: Callable[[HostGpuFacts], str | None] | None = None
    """What this host has that a build of it must show (for messages), or None when it has
    nothing; None for a backend that is not a GPU's (no device check)."""

    @property
    def is_gpu(self) -> bool:
        """Whether its builds must show a device of their own kind."""
        return self.host_gpu is not None


def _nvidia(host: HostGpuFacts) -> str | None:
    return f"an NVIDIA GPU (driver {host.nvidia_driver})" if host.nvidia_driver else None


def _amd(host: HostGpuFacts) -> str | None:
    if not (host.amd_driver or host.amd_gpus):
        return None
    return f"an AMD GPU ({', '.join(host.amd_gpus) or 'gfx target unknown'})"


def _cuda_gpu(host: HostGpuFacts) -> str | None:
    return _nvidia(host) or (f"CUDA {host.cuda_version}" if host.cuda_version else None)


def _vulkan_gpu(host: HostGpuFacts) -> str | None:
    found = _nvidia(host) or _amd(host)
    if found:
        return found
    icds = host.vulkan_gpu_icds
    return f"a Vulkan GPU driver ({', '.join(icds)})" if icds else None


def _metal_gpu(host: HostGpuFacts) -> str | None:
    return "an Apple silicon GPU" if host.apple_silicon and host.os == "macos" else None


TABLE: Final[tuple[Backend, ...]] = (
    Backend("cpu", "CPU", auto_rank=4),
    Backend("cuda", "CUDA", "cuda", "CUDA", 0, _cuda_gpu),
    Backend("rocm", "ROCm", "hip", "ROCm", 1, _amd),
    Backend("metal", "Metal", "metal", "MTL", 2, _metal_gpu),
    Backend("vulkan", "Vulkan", "vulkan", "Vulkan", 3, _vulkan_gpu),
    Backend("rpc", "RPC", device_prefix="RPC"),
)
"""Every backend the manifest can name, in ``--variant``'s order."""


def backend_names() -> tuple[str, ...]:
    """Every backend's name, in the table's order."""
    return tuple(b.name for b in TABLE)


def get_backend(name: str) -> Backend | None:
    """The row of backend ``name``, or None for a name the table lacks."""
    return next((b for b in TABLE if b.name == name), None)


def from_device_prefix(prefix: str) -> str:
    """The backend whose devices carry ``prefix`` (any case); else the prefix, lower case."""
    lowered = prefix.lower()
    for b in TABLE:
        if b.device_prefix is not None and b.device_prefix.lower() == lowered:
            return b.name
    return lowered


def auto_chain() -> tuple[str, ...]:
    """The backends ``auto`` tries, best first."""
    ranked = sorted((b for b in TABLE if b.auto_rank is not None), key=lambda b: b.auto_rank or 0)
    return tuple(b.name for b in ranked)
