"""The CUDA variant on a real NVIDIA GPU (``pytest -m gpu`` on a machine that has one).

Deselected by default. It builds (or reuses) the cuda variant through llama-proc, checks that
llama-server lists the GPU, serves the smoke model with every layer offloaded and records the
build time and tokens/s in the test output.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from llama_proc.config import Settings

pytestmark = pytest.mark.gpu


def test_cuda_variant_serves_with_all_layers_on_the_gpu(
    real_settings: Settings, smol_model: Path
) -> None:
    from llama_proc.provision import detect_host, ensure_server
    from llama_proc.proxy.device_budget import discover_gpus, list_devices
    from llama_proc.proxy.measure import gpu_memory, nvml_module
    from llama_proc.server import LlamaServer

    host = detect_host()
    assert host.nvidia_driver, "this test needs an NVIDIA driver: run it on a GPU machine"
    install = ensure_server(real_settings.replace(variant="cuda"))
    assert install.variant_id.endswith("-cuda")
    print("install:", install.source, install.metadata.get("build_seconds"), "s to build")

    listed = subprocess.run(
        [str(install.server_binary), "--list-devices"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    devices = listed.stdout + listed.stderr
    assert "CUDA0" in devices, devices

    with LlamaServer(smol_model, binary=install.server_binary, n_gpu_layers=99) as server:
        reply = server.chat(
            [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            temperature=0,
            max_tokens=32,
        )
        logs = "\n".join(server.logs())
        # The pool's per-device budget finds the GPU; NVML (where installed) sees what the
        # server holds on it, which replaces the estimate in the budget.
        gpus = discover_gpus(list_devices(install.server_binary))
        assert [g.name for g in gpus][:1] == ["CUDA0"], gpus
        assert gpus[0].total > 1 << 30
        if nvml_module() is not None:
            held = gpu_memory(server.pid or 0)
            assert held.get("CUDA0", 0) > 50 << 20, held
            print("measured on the GPU:", held)
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert "CUDA0" in logs
    print("gpu tokens/s:", reply.get("timings", {}).get("predicted_per_second"))
