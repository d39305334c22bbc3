"""Per-device budgets with fakes for what needs a GPU: discovery, placement split, admission.

Two GPUs of different sizes (24 and 8 GiB), found through ``--list-devices``, through a fake
NVML, or through AMD's sysfs files; a placement split across them by layers, tensor split and
KV offload; and a pool whose servers' claims land on different GPUs, so that room is made on
the GPU that is short and a model larger than a GPU's budget is refused at once with figures.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from proxy_fakes import FakeFactory
from tiny_gguf import write_model

from llama_proc.devices import parse_device_list
from llama_proc.models.gguf_info import MemoryEstimate, estimate_memory, read_model_info
from llama_proc.proxy import device_budget
from llama_proc.proxy.budget import estimate_server_claims, estimate_server_memory
from llama_proc.proxy.device_budget import (
    HOST,
    DeviceMemory,
    device_budgets,
    discover_gpus,
    placement_from_args,
    split_claim,
)
from llama_proc.proxy.metrics import ProxyMetrics
from llama_proc.proxy.models_config import ModelSpec
from llama_proc.proxy.pool import ServerPool
from llama_proc.proxy.scheduler import by_lru
from llama_proc.proxy.servers import ModelTooLargeError

GIB = 1 << 30
LISTED = """Available devices:
  CUDA0: NVIDIA RTX 4090 (24564 MiB, 23000 MiB free)
  CUDA1: NVIDIA RTX 3070 (8192 MiB, 8000 MiB free)
"""


class _FakeNVML:
    class NVMLError(Exception):
        pass

    sizes = (24 * GIB, 8 * GIB)

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - NVML's spelling
        return len(self.sizes)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(total=self.sizes[handle], free=self.sizes[handle], used=0)


def test_gpus_from_list_devices_then_nvml_then_amd_sysfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = parse_device_list(LISTED)
    gpus = discover_gpus(listed, nvml=_FakeNVML(), drm=tmp_path)
    assert [(g.name, g.total, g.source) for g in gpus] == [
        ("CUDA0", 24564 << 20, "list-devices"),
        ("CUDA1", 8192 << 20, "list-devices"),
    ]
    # No list (a build that cannot list): NVML answers.
    gpus = discover_gpus(None, nvml=_FakeNVML(), drm=tmp_path)
    assert [(g.name, g.total, g.source) for g in gpus] == [
        ("CUDA0", 24 * GIB, "nvml"),
        ("CUDA1", 8 * GIB, "nvml"),
    ]
    # NVML absent, AMD cards in sysfs.
    monkeypatch.setattr(device_budget, "nvml_module", lambda: None)
    for card, size in (("card1", 16 * GIB), ("card0", 8 * GIB)):
        (tmp_path / card / "device").mkdir(parents=True)
        (tmp_path / card / "device" / "mem_info_vram_total").write_text(f"{size}\n")
    gpus = discover_gpus(None, drm=tmp_path)
    assert [(g.name, g.total, g.source) for g in gpus] == [
        ("ROCm0", 8 * GIB, "sysfs"),
        ("ROCm1", 16 * GIB, "sysfs"),
    ]
    assert discover_gpus(None, drm=tmp_path / "none") == []
    # macOS: Metal's listed size is its recommended working set, budgeted as it is.
    metal = parse_device_list(
        "Available devices:\n  MTL0: Apple M2 Max (49152 MiB, 49152 MiB free)\n"
    )
    (gpu,) = discover_gpus(metal, drm=tmp_path / "none")
    assert (gpu.name, gpu.total) == ("MTL0", 48 * GIB)
    assert device_budgets([gpu], 0.25) == {"MTL0": 36 * GIB}


ESTIMATE = MemoryEstimate(
    weights=8 * GIB,
    kv_cache=4 * GIB,
    slots=GIB // 2,
    overhead=GIB // 2,
    ctx_size=8192,
    n_parallel=1,
    kv_type="f16",
)
TWO = [DeviceMemory("CUDA0", 24 * GIB, "nvml"), DeviceMemory("CUDA1", 8 * GIB, "nvml")]


def _split(*args: str) -> dict[str, int]:
    return split_claim(ESTIMATE, 32, placement_from_args(args), TWO)


def test_claim_is_split_across_two_gpus_by_placement() -> None:
    # All layers, no tensor split: weights and KV in proportion to the GPUs' sizes (3:1).
    assert _split() == {"CUDA0": 9 * GIB, "CUDA1": 3 * GIB, HOST: GIB}
    assert _split("-ts", "1,1") == {"CUDA0": 6 * GIB, "CUDA1": 6 * GIB, HOST: GIB}
    # Half the layers: half of the weights and the KV on the GPUs, the rest on the host.
    assert _split("--n-gpu-layers=16") == {
        "CUDA0": 9 * GIB // 2,
        "CUDA1": 3 * GIB // 2,
        HOST: 7 * GIB,
    }
    # KV cache kept on the host.
    assert _split("-nkvo") == {"CUDA0": 6 * GIB, "CUDA1": 2 * GIB, HOST: 5 * GIB}
    assert _split("-dev", "CUDA1") == {"CUDA1": 12 * GIB, HOST: GIB}
    assert _split("-ngl", "0") == {HOST: ESTIMATE.total}
    assert _split("-dev", "none") == {HOST: ESTIMATE.total}
    assert split_claim(ESTIMATE, 32, placement_from_args(()), []) == {HOST: ESTIMATE.total}


A = ModelSpec(id="a", path=Path("/m/a.gguf"))
B = ModelSpec(id="b", path=Path("/m/b.gguf"))
C = ModelSpec(id="c", path=Path("/m/c.gguf"))
HUGE = ModelSpec(id="huge", path=Path("/m/huge.gguf"))
CLAIMS = {
    "a": {HOST: GIB, "CUDA1": 4 * GIB},
    "b": {HOST: GIB, "CUDA1": 4 * GIB},
    "c": {HOST: GIB, "CUDA0": 10 * GIB},
    "huge": {HOST: GIB, "CUDA0": 25 * GIB},
}


def test_room_is_made_on_the_gpu_that_is_short_and_too_large_is_refused() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ServerPool(
            factory,
            max_servers=8,
            memory_budget=64 * GIB,
            device_budgets=device_budgets(TWO),  # 21.6 and 7.2 GiB
            device_estimate=lambda spec, flags: CLAIMS[spec.id],
            victim_policy=by_lru,
        )
        for spec in (C, A):  # C is the least recently used when B needs room on CUDA1
            async with pool.lease(spec):
                pass
        async with pool.lease(B):
            pass
        states = {i.model: i.state for i in pool.snapshot()}
        assert states == {"a": "stopped", "b": "ready", "c": "ready"}
        assert pool.stats["evictions_memory"] == 1
        # /metrics: each GPU's budget and what the servers on it claim.
        text = ProxyMetrics(pool).render()
        assert f'llama_proc_pool_device_budget_bytes{{device="CUDA1"}} {int(7.2 * GIB)}' in text
        assert f'llama_proc_pool_device_reserved_bytes{{device="CUDA1"}} {4 * GIB}' in text
        assert f'llama_proc_pool_device_reserved_bytes{{device="CUDA0"}} {10 * GIB}' in text
        with pytest.raises(ModelTooLargeError, match=r"CUDA0: needs 25.00 GiB of 21.60 GiB"):
            await pool.acquire(HUGE)
        assert [s for s, _ in factory.starts] == ["c", "a", "b"]
        await pool.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_server_claims_come_from_the_header_and_the_configs_placement(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf", layers=4, context=1024)
    options = {"ctx_size": 512, "parallel": 1, "n_gpu_layers": 2}
    spec = ModelSpec(id="m", path=model, options=options)
    claims = estimate_server_claims(spec, (), TWO)
    est = estimate_memory(read_model_info(model), 512, 1)
    on_gpus = (est.weights + est.kv_cache) / 2  # two of four layers
    assert claims["CUDA0"] == int(on_gpus * 3 / 4)
    assert claims["CUDA1"] == int(on_gpus / 4)
    assert sum(claims.values()) == estimate_server_memory(spec)
    # The request's flags win: no layers offloaded, all on the host.
    assert estimate_server_claims(spec, ("-ngl", "0"), TWO) == {HOST: estimate_server_memory(spec)}
    assert estimate_server_claims(spec, (), []) == {HOST: estimate_server_memory(spec)}


def test_with_fit_and_no_layer_count_the_overflow_is_claimed_on_the_host() -> None:
    big = MemoryEstimate(
        weights=36 * GIB, kv_cache=4 * GIB, slots=GIB // 2, overhead=GIB // 2,
        ctx_size=8192, n_parallel=1, kv_type="f16",
    )  # fmt: skip
    auto = placement_from_args(())
    # Without --fit: all layers claimed on the GPUs, more than they hold (refused at once).
    assert split_claim(big, 32, auto, TWO) == {"CUDA0": 30 * GIB, "CUDA1": 10 * GIB, HOST: GIB}
    # With --fit, llama.cpp keeps each GPU within its margin and the rest runs on the host.
    fitted = split_claim(big, 32, auto, TWO, fit=True)
    assert fitted == {
        "CUDA0": int(24 * GIB * 0.9),
        "CUDA1": int(8 * GIB * 0.9),
        HOST: big.total - int(24 * GIB * 0.9) - int(8 * GIB * 0.9),
    }
    # An explicit layer count is the user's: no fitting.
    explicit = split_claim(big, 32, placement_from_args(("-ngl", "32")), TWO, fit=True)
    assert explicit["CUDA0"] == 30 * GIB
