"""Memory budgets per device: host RAM and each GPU, and a server's claim split across them.

Where the GPUs come from, first answer wins:

1. ``llama-server --list-devices`` (:func:`llama_proc.devices.parse_device_list`): the devices
   the server will really use, named as its logs name them (``CUDA0``, ``ROCm0``, ``Vulkan0``,
   ``MTL0``). On macOS the figure ggml's Metal backend lists for ``MTL0`` is the device's
   recommended working set (``recommendedMaxWorkingSetSize``), not the unified RAM: the share
   macOS lets the GPU keep resident, which is the right ceiling for a budget.
2. NVML through ``nvidia-ml-py`` when installed: each GPU's total, named ``CUDA<index>`` (NVML
   orders by PCI bus; CUDA does too when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``).
3. AMD GPUs through sysfs: ``/sys/class/drm/card<N>/device/mem_info_vram_total``, named
   ``ROCm<k>`` in card order.

Each device's budget is its total less a margin (:data:`DEFAULT_DEVICE_MARGIN`). A server's
claim is its memory estimate (weights, KV cache, slots, overhead from the GGUF header) split by
its placement: the offloaded share of the layers (``--n-gpu-layers``) puts that share of the
weights, and of the KV cache unless ``--no-kv-offload``, on the GPUs, divided by
``--tensor-split`` or else in proportion to the devices' sizes (llama.cpp's layer split
divides by free memory); the rest, the slots' buffers and the process overhead stay on the
host. Unset (``auto``), all layers are claimed on the GPUs. Where the binary has ``--fit``
(on by default), llama.cpp itself fits unset options to each device's free memory at load
time; the claim is then the pool's admission guess only, and the figures measured through
NVML once the server runs replace it (:mod:`llama_proc.proxy.measure`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._childenv import child_environment
from llama_proc._proc import run_with_timeout
from llama_proc.devices import parse_device_list
from llama_proc.proxy.measure import nvml_module

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from llama_proc.devices import Device
    from llama_proc.models.gguf_info import MemoryEstimate

__all__ = [
    "DEFAULT_DEVICE_MARGIN",
    "HOST",
    "DeviceMemory",
    "Placement",
    "amd_sysfs_devices",
    "device_budgets",
    "discover_gpus",
    "list_devices",
    "nvml_devices",
    "placement_from_args",
    "split_claim",
]

logger = logging.getLogger(__name__)

HOST: Final = "host"
"""The host RAM's name among the devices."""
DEFAULT_DEVICE_MARGIN: Final = 0.1
"""Share of each GPU's memory kept out of the budget (drivers, contexts, other processes)."""
DRM: Final = Path("/sys/class/drm")
LIST_TIMEOUT: Final = 60.0
"""Seconds ``llama-server --list-devices`` may take (a first CUDA context is slow)."""
_MIB: Final = 1 << 20
_GPU_LAYER_FLAGS: Final = frozenset({"-ngl", "--gpu-layers", "--n-gpu-layers"})
_SPLIT_FLAGS: Final = frozenset({"-ts", "--tensor-split"})
_DEVICE_FLAGS: Final = frozenset({"-dev", "--device"})
_NO_KV_OFFLOAD: Final = frozenset({"-nkvo", "--no-kv-offload"})


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory, as the pool budgets it."""

    name: str
    total: int
    """Bytes."""
    source: str
    """``list-devices``, ``nvml`` or ``sysfs``."""


def list_devices(binary: Path, timeout: float = LIST_TIMEOUT) -> tuple[Device, ...] | None:
    """What ``binary --list-devices`` lists (None when it does not run or lists nothing)."""
    ran = run_with_timeout(
        [str(binary), "--list-devices"], timeout, env=child_environment(), cwd=binary.parent
    )
    if ran is None or ran.timed_out or ran.returncode != 0:
        return None
    return parse_device_list(ran.output)


def from_device_list(devices: Sequence[Device]) -> list[DeviceMemory]:
    """The GPUs ``--list-devices`` named, with their sizes (devices without one are left out)."""
    return [
        DeviceMemory(d.name, d.total_mib * _MIB, "list-devices")
        for d in devices
        if d.is_gpu and d.total_mib
    ]


def nvml_devices(nvml: Any = None) -> list[DeviceMemory]:
    """Every GPU NVML sees (``[]`` without ``nvidia-ml-py``, a driver or a GPU)."""
    lib = nvml if nvml is not None else nvml_module()
    if lib is None:
        return []
    try:
        return [
            DeviceMemory(
                f"CUDA{i}",
                int(lib.nvmlDeviceGetMemoryInfo(lib.nvmlDeviceGetHandleByIndex(i)).total),
                "nvml",
            )
            for i in range(lib.nvmlDeviceGetCount())
        ]
    except lib.NVMLError as err:
        logger.debug("NVML device memory unreadable: %s", err)
        return []


def amd_sysfs_devices(drm: Path = DRM) -> list[DeviceMemory]:
    """AMD GPUs' VRAM from the amdgpu driver's sysfs files (``[]`` where there are none)."""
    found: list[DeviceMemory] = []
    cards = sorted(drm.glob("card[0-9]*/device/mem_info_vram_total"), key=lambda p: p.as_posix())
    for path in cards:
        try:
            total = int(path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        if total > 0:
            found.append(DeviceMemory(f"ROCm{len(found)}", total, "sysfs"))
    return found


def discover_gpus(
    listed: Sequence[Device] | None, *, nvml: Any = None, drm: Path = DRM
) -> list[DeviceMemory]:
    """The GPUs to budget: ``--list-devices`` first, then NVML, then AMD's sysfs."""
    if listed:
        gpus = from_device_list(listed)
        if gpus:
            return gpus
    return nvml_devices(nvml) or amd_sysfs_devices(drm)


def device_budgets(
    gpus: Sequence[DeviceMemory], margin: float = DEFAULT_DEVICE_MARGIN
) -> dict[str, int]:
    """Each GPU's budget in bytes: its total less ``margin`` of it."""
    keep = min(max(margin, 0.0), 0.9)
    return {g.name: int(g.total * (1.0 - keep)) for g in gpus}


@dataclass(frozen=True)
class Placement:
    """Where a server puts its model, from its flags."""

    gpu_layers: int | None = None
    """``--n-gpu-layers``; None = auto or all."""
    tensor_split: tuple[float, ...] = ()
    kv_offload: bool = True
    devices: tuple[str, ...] = ()
    """``--device``; ``("none",)`` keeps everything on the host."""


def placement_from_args(words: Sequence[str]) -> Placement:
    """The placement flags in ``words`` (the server's extra arguments), the last one winning."""
    layers: int | None = None
    split: tuple[float, ...] = ()
    kv_offload = True
    devices: tuple[str, ...] = ()
    for i, word in enumerate(words):
        name, eq, inline = word.partition("=")
        value = inline if eq else (words[i + 1] if i + 1 < len(words) else "")
        if name in _GPU_LAYER_FLAGS:
            layers = int(value) if value.lstrip("-").isdigit() else None
        elif name in _SPLIT_FLAGS:
            try:
                split = tuple(float(v) for v in value.replace("/", ",").split(",") if v)
            except ValueError:
                split = ()
        elif name in _DEVICE_FLAGS:
            devices = tuple(v.strip() for v in value.split(",") if v.strip())
        elif name in _NO_KV_OFFLOAD:
            kv_offload = False
        elif name in ("-kvo", "--kv-offload"):
            kv_offload = True
    return Placement(layers, split, kv_offload, devices)


def split_claim(
    estimate: MemoryEstimate,
    n_layer: int,
    placement: Placement,
    gpus: Sequence[DeviceMemory],
    *,
    fit: bool = False,
) -> dict[str, int]:
    """Bytes a server is expected to hold on the host and on each GPU (see the module doc).

    With ``fit`` (the binary has ``--fit``) and no ``--n-gpu-layers``, llama.cpp fits the
    layers to the GPUs itself: what would pass a GPU's budget is claimed on the host instead.
    """
    chosen = [g for g in gpus if not placement.devices or g.name in placement.devices]
    layers = n_layer if placement.gpu_layers is None or placement.gpu_layers < 0 else (
        min(placement.gpu_layers, n_layer)
    )  # fmt: skip
    if not chosen or n_layer <= 0 or layers == 0 or placement.devices == ("none",):
        return {HOST: estimate.total}
    share = layers / n_layer
    on_gpus = estimate.weights * share + (estimate.kv_cache * share if placement.kv_offload else 0)
    weights = list(placement.tensor_split[: len(chosen)])
    if len(weights) != len(chosen) or sum(weights) <= 0:
        weights = [float(g.total) for g in chosen]
    claim = {g.name: int(on_gpus * w / sum(weights)) for g, w in zip(chosen, weights, strict=True)}
    if fit and placement.gpu_layers is None:
        caps = device_budgets(chosen)
        claim = {name: min(size, caps[name]) for name, size in claim.items()}
    claim = {name: size for name, size in claim.items() if size > 0}
    claim[HOST] = max(0, estimate.total - sum(claim.values()))
    return claim


def too_large(claim: Mapping[str, int], budgets: Mapping[str, int]) -> list[str]:
    """``CUDA1: needs 9.00 GiB of 7.20 GiB`` for each device the claim exceeds alone."""
    return [
        f"{name}: needs {size / 2**30:.2f} GiB of {budgets[name] / 2**30:.2f} GiB"
        for name, size in claim.items()
        if name in budgets and size > budgets[name]
    ]
