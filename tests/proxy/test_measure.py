"""Reading what a process holds: PSS, the RSS fallback, and GPU memory through a fake NVML."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llama_proc.proxy.measure import SlotUse, gpu_memory, host_memory, slot_use


def test_host_memory_reads_pss_then_falls_back_to_rss(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "7").mkdir(parents=True)
    (proc / "7" / "status").write_text("Name:\tx\nVmRSS:\t  2048 kB\n", encoding="ascii")
    assert host_memory(7, proc) == 2048 * 1024  # no smaps_rollup (old kernel): RSS
    (proc / "7" / "smaps_rollup").write_text("Rss:  2048 kB\nPss:  1024 kB\n", encoding="ascii")
    assert host_memory(7, proc) == 1024 * 1024
    assert host_memory(8, proc) is None  # gone


def test_host_memory_of_this_process_is_real() -> None:
    if not Path("/proc/self/status").is_file():
        return
    assert (host_memory(os.getpid()) or 0) > 1 << 20


class _FakeNVML:
    """Two GPUs of different sizes; pid 42 holds memory on both, pid 7 on the second."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - NVML's spelling
        if self.fail:
            msg = "driver gone"
            raise self.NVMLError(msg)
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, device: int) -> list[Any]:  # noqa: N802
        procs = [SimpleNamespace(pid=42, usedGpuMemory=(3 << 30) if device == 0 else (1 << 30))]
        if device == 1:
            procs.append(SimpleNamespace(pid=7, usedGpuMemory=5 << 30))
            procs.append(SimpleNamespace(pid=9, usedGpuMemory=None))  # no permission: N/A
        return procs


def test_gpu_memory_per_device_from_nvml() -> None:
    nvml = _FakeNVML()
    assert gpu_memory(42, nvml) == {"CUDA0": 3 << 30, "CUDA1": 1 << 30}
    assert gpu_memory(7, nvml) == {"CUDA1": 5 << 30}
    assert gpu_memory(9, nvml) == {}
    # NVML failing mid-read: nothing, no exception.
    assert gpu_memory(42, _FakeNVML(fail=True)) == {}


def test_slot_use_from_slots_with_and_without_token_counts() -> None:
    plain = (
        b'[{"id":0,"n_ctx":512,"is_processing":true},{"id":1,"n_ctx":512,"is_processing":false}]'
    )
    use = slot_use(plain)
    assert use == SlotUse(used=1, total=2, kv_total=1024, kv_used=None)
    counted = b'[{"id":0,"n_ctx":512,"n_past":100,"is_processing":true}]'
    assert slot_use(counted) == SlotUse(used=1, total=1, kv_total=512, kv_used=100)
    assert slot_use(b'{"error": "no slots"}') is None
    assert slot_use(b"not json") is None
