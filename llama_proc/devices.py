"""Which compute devices a llama-server sees, and where it put a model's layers.

Both answers come from llama-server's own output (b11434 sources quoted):

``llama-server --list-devices`` (``common_print_available_devices``, common/arg.cpp) lists the
devices that are not the CPU, then exits 0; a CPU-only build prints ``(none)``::

    Available devices:
      CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80500 MiB free)

A loading server's log (at log verbosity 4, "trace", and up) names the devices the model uses
and the buffers its weights landed in; the "no usable GPU" warning is printed at any verbosity::

    I llama_model_load_from_file_impl: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:01:00.0) - 80500 MiB free
    I load_tensors: offloaded 31/31 layers to GPU
    I load_tensors:        CUDA0 model buffer size =    92.10 MiB
    I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
    warning: no usable GPU found, --gpu-layers option will be ignored

"offloaded N/M layers" alone proves nothing: a CPU build with RPC support prints
"offloaded 31/31" and keeps everything in ``CPU_Mapped``. The buffer lines say where the
weights really are.

A leaf module (standard library, :mod:`llama_proc.backends` and :mod:`llama_proc.diagnosis` only), so provisioning's
install check and the runtime's start check read the output the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from llama_proc.backends import TABLE, from_device_prefix, get_backend
from llama_proc.diagnosis import Cause, diagnose_gpu

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "GPU_BACKENDS",
    "Device",
    "Placement",
    "asks_for_gpu",
    "cpu_fallback",
    "device_backend",
    "parse_device_list",
    "read_placement",
]

GPU_BACKENDS: Final = tuple(b.name for b in TABLE if b.is_gpu)
"""Backends whose builds must show a device of their own kind."""
SOFTWARE_RENDERERS: Final = ("llvmpipe", "lavapipe", "swiftshader")
"""Vulkan devices that are the CPU in disguise (description substrings, lower case)."""
_LIST_HEADER: Final = "Available devices:"
_LIST_LINE: Final = re.compile(
    r"^\s+(?P<name>\S+): (?P<desc>.*?) \((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$"
)
_USING_DEVICE: Final = re.compile(
    r"using device (?P<name>\S+) \((?P<desc>.*)\) \((?P<id>[^)]*)\) - (?P<free>\d+) MiB free"
)
_OFFLOADED: Final = re.compile(r"offloaded (?P<n>\d+)/(?P<total>\d+) layers to GPU")
_MODEL_BUFFER: Final = re.compile(r"(?P<name>\S+) model buffer size\s*=\s*(?P<mib>[\d.]+) MiB")
_NO_USABLE_GPU: Final = re.compile(r"no usable GPU found")
_HOST_BUFFER_PREFIX: Final = "CPU"
_HOST_BUFFER_SUFFIX: Final = "_Host"
"""``CUDA_Host`` and the like: pinned host memory, not the GPU's."""


def device_backend(name: str) -> str:
    """The backend of a device from its name: ``CUDA0`` -> ``cuda``, ``MTL0`` -> ``metal``."""
    match = re.match(r"[A-Za-z]+", name)
    prefix = match.group(0).lower() if match else name.lower()
    return from_device_prefix(prefix)


@dataclass(frozen=True)
class Device:
    """One compute device as llama.cpp names it."""

    name: str
    """llama.cpp's name: ``CUDA0``, ``ROCm0``, ``Vulkan0``, ``MTL0``, ``RPC0``..."""
    description: str
    """The device's own name, e.g. ``NVIDIA H100 80GB HBM3``."""
    total_mib: int | None = None
    """Memory in MiB (None when the source does not say)."""
    free_mib: int | None = None
    """Free memory in MiB when it was listed."""

    @property
    def backend(self) -> str:
        """The backend, from the name (``cuda``, ``rocm``, ``vulkan``, ``metal``, ``rpc``...)."""
        return device_backend(self.name)

    @property
    def is_gpu(self) -> bool:
        """Whether it is a GPU of a GPU backend (a software Vulkan renderer is not)."""
        desc = self.description.lower()
        backend = get_backend(self.backend)
        is_gpu = backend is not None and backend.is_gpu
        return is_gpu and not any(s in desc for s in SOFTWARE_RENDERERS)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (for ``install.json``)."""
        return {
            "name": self.name,
            "backend": self.backend,
            "description": self.description,
            "total_mib": self.total_mib,
            "free_mib": self.free_mib,
        }

    def __str__(self) -> str:
        memory = f", {self.total_mib} MiB" if self.total_mib is not None else ""
        return f"{self.name} ({self.description}{memory})"


def parse_device_list(text: str) -> tuple[Device, ...] | None:
    """Parse ``llama-server --list-devices`` output.

    Log lines around the list (backends print while they load) are ignored.

    Returns:
        The listed devices (empty for ``(none)``), or None when there is no device list at all
        (a build without ``--list-devices``).
    """
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == _LIST_HEADER)
    except StopIteration:
        return None
    found: list[Device] = []
    for line in lines[start + 1 :]:
        match = _LIST_LINE.match(line)
        if match is None:
            continue
        found.append(
            Device(
                match.group("name"),
                match.group("desc"),
                int(match.group("total")),
                int(match.group("free")),
            )
        )
    return tuple(found)


@dataclass(frozen=True)
class Placement:
    """Where a loading server put the model, as its log says."""

    devices: tuple[Device, ...] = ()
    """The devices the model uses ("using device" lines; empty = the CPU only)."""
    offloaded: tuple[int, int] | None = None
    """(layers offloaded, layers in all) from "offloaded N/M layers to GPU", if logged."""
    buffers: Mapping[str, float] = field(default_factory=dict)
    """Model weight buffers: buffer name (``CUDA0``, ``CPU_Mapped``) -> MiB."""
    no_usable_gpu: bool = False
    """llama-server warned "no usable GPU found" (the layers option was ignored)."""

    @property
    def gpu_buffers(self) -> dict[str, float]:
        """The weight buffers in device memory (host and pinned-host buffers left out)."""
        return {
            name: mib
            for name, mib in self.buffers.items()
            if not name.startswith(_HOST_BUFFER_PREFIX) and not name.endswith(_HOST_BUFFER_SUFFIX)
        }

    @property
    def on_cpu_only(self) -> bool | None:
        """True when the log shows every weight on the CPU; None when it does not say."""
        if self.no_usable_gpu or (self.offloaded is not None and self.offloaded[0] == 0):
            return True
        if self.buffers:
            return not self.gpu_buffers
        return None


def read_placement(lines: Iterable[str]) -> Placement:
    """Read the devices, offload count and weight buffers from a server log."""
    devices: dict[str, Device] = {}
    offloaded: tuple[int, int] | None = None
    buffers: dict[str, float] = {}
    no_gpu = False
    for line in lines:
        if (match := _USING_DEVICE.search(line)) is not None:
            name = match.group("name")
            devices[name] = Device(name, match.group("desc"), free_mib=int(match.group("free")))
        elif (match := _OFFLOADED.search(line)) is not None:
            offloaded = (int(match.group("n")), int(match.group("total")))
        elif (match := _MODEL_BUFFER.search(line)) is not None:
            buffers[match.group("name")] = float(match.group("mib"))
        elif _NO_USABLE_GPU.search(line):
            no_gpu = True
    return Placement(tuple(devices.values()), offloaded, buffers, no_gpu)


def asks_for_gpu(n_gpu_layers: int | str | None, device: str | None = None) -> bool:
    """Whether these options put layers on a GPU on purpose.

    A positive layer count or ``"all"`` does; ``None`` and ``"auto"`` (llama.cpp decides), 0
    and ``device="none"`` (the CPU, asked for) do not.
    """
    if device is not None and device.strip().lower() == "none":
        return False
    if isinstance(n_gpu_layers, str):
        word = n_gpu_layers.strip().lower()
        if word == "all":
            return True
        if not word.lstrip("-").isdigit():
            return False
        n_gpu_layers = int(word)
    return n_gpu_layers is not None and n_gpu_layers > 0


def cpu_fallback(lines: Sequence[str]) -> Cause | None:
    """Why the server put its layers on the CPU, or None when the log shows no such thing.

    Call it for a server that was asked for GPU layers (:func:`asks_for_gpu`) once it is
    ready. The cause names what the log says went wrong (a library that did not load, a driver
    too old, no device), else ``kind == "cpu_fallback"``.
    """
    placement = read_placement(lines)
    if not placement.on_cpu_only:
        return None
    why = diagnose_gpu(lines)
    if why is not None:
        return why
    where = ", ".join(sorted(placement.buffers)) or "the CPU"
    return Cause(
        "cpu_fallback",
        f"llama-server found no GPU to put the layers on and loaded the weights into {where}; "
        "check that this llama-server is a GPU build for this host (llama-proc doctor)",
    )
