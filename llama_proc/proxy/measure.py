"""What a running server really holds: host memory from ``/proc``, GPU memory from NVML.

:func:`measure_process` reads a process's proportional set size (PSS: shared pages, such as a
GGUF file two servers map, are split between them, so the figures of several servers add up
to what they hold together) from ``/proc/<pid>/smaps_rollup``, its resident set size from
``/proc/<pid>/status`` where that file is missing, and the GPU memory NVML reports for the
process on each device when ``nvidia-ml-py`` is installed (imported only then). Where neither
``/proc`` nor NVML answers (macOS, Windows) it returns None and the pool keeps its estimate.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "Measured",
    "SlotUse",
    "gpu_memory",
    "host_memory",
    "measure_process",
    "nvml_module",
    "slot_use",
]

logger = logging.getLogger(__name__)

PROC: Final = Path("/proc")
_KIB: Final = 1024


@dataclass(frozen=True)
class Measured:
    """Memory one server process holds, read from the system."""

    host: int
    """Bytes of host RAM (PSS, else RSS)."""
    devices: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Bytes on each GPU, keyed ``CUDA<NVML index>`` (llama.cpp's names in PCI bus order)."""


@dataclass(frozen=True)
class SlotUse:
    """A server's slots as its ``GET /slots`` reports them."""

    used: int
    """Slots processing a request."""
    total: int
    kv_total: int
    """Context tokens over all slots (the KV cache's size in tokens)."""
    kv_used: int | None = None
    """Tokens held in the KV cache, where the server reports them per slot (``n_past``)."""


def slot_use(body: bytes) -> SlotUse | None:
    """Parse a ``/slots`` answer; None when it is not the list of slots it should be."""
    try:
        slots = json.loads(body)
    except ValueError:
        return None
    if not isinstance(slots, list) or not all(isinstance(s, dict) for s in slots):
        return None
    past = [s.get("n_past") for s in slots]
    return SlotUse(
        used=sum(1 for s in slots if s.get("is_processing") is True),
        total=len(slots),
        kv_total=sum(s["n_ctx"] for s in slots if isinstance(s.get("n_ctx"), int)),
        kv_used=sum(p for p in past if isinstance(p, int))
        if any(isinstance(p, int) for p in past)
        else None,
    )


def _kib_field(path: Path, name: str) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * _KIB
    return None


def host_memory(pid: int, proc: Path = PROC) -> int | None:
    """Bytes of RAM ``pid`` holds: PSS from ``smaps_rollup``, else VmRSS; None if unreadable."""
    pss = _kib_field(proc / str(pid) / "smaps_rollup", "Pss:")
    if pss is not None:
        return pss
    return _kib_field(proc / str(pid) / "status", "VmRSS:")


@functools.cache
def nvml_module() -> Any:
    """The initialised ``pynvml`` module, or None where it is missing or finds no driver."""
    if importlib.util.find_spec("pynvml") is None:
        return None
    import pynvml  # noqa: PLC0415 - optional, heavy: only where it is installed

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        logger.debug("NVML unavailable: %s", err)
        return None
    return pynvml


def gpu_memory(pid: int, nvml: Any = None) -> dict[str, int]:
    """Bytes ``pid`` holds on each GPU NVML sees (``{}`` without NVML or without a GPU).

    Args:
        pid: the process.
        nvml: a ``pynvml``-like module (tests pass a fake); default: the real one, if any.
    """
    lib = nvml if nvml is not None else nvml_module()
    if lib is None:
        return {}
    out: dict[str, int] = {}
    try:
        for index in range(lib.nvmlDeviceGetCount()):
            device = lib.nvmlDeviceGetHandleByIndex(index)
            for proc in lib.nvmlDeviceGetComputeRunningProcesses(device):
                used = getattr(proc, "usedGpuMemory", None)
                if proc.pid == pid and isinstance(used, int):
                    out[f"CUDA{index}"] = out.get(f"CUDA{index}", 0) + used
    except lib.NVMLError as err:
        logger.debug("NVML process memory unreadable: %s", err)
    return out


def measure_process(pid: int | None) -> Measured | None:
    """Host and GPU memory ``pid`` holds now; None when the host figure cannot be read."""
    if pid is None:
        return None
    host = host_memory(pid)
    if host is None:
        return None
    return Measured(host, MappingProxyType(gpu_memory(pid)))
