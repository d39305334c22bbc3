"""Devices and layer placement: parsed from llama-server's own output, checked at start.

Log lines are real b11434 output (the CPU lines captured from this project's build with
``-lv 4``; the GPU lines quoted from the pinned sources' format strings). The start check runs
against the fake server, whose GPU build sees its device only when its runtime library is a
file beside it, and against the real CPU llama-server.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
from pathlib import Path

import pytest

from llama_proc.devices import (
    Device,
    asks_for_gpu,
    cpu_fallback,
    device_backend,
    parse_device_list,
    read_placement,
)
from llama_proc.diagnosis import diagnose, diagnose_gpu
from llama_proc.errors import CpuFallbackError, InvalidArgumentError, ServerStartError
from llama_proc.server import LlamaServer

FAKE_SERVER = Path(__file__).resolve().parents[1] / "helpers" / "fake_llama_server.py"
posix_only = pytest.mark.skipif(os.name != "posix", reason="shell-script stand-in")

CUDA_LIST = """\
ggml_cuda_init: found 1 CUDA devices (Total VRAM: 81079 MiB):
  Device 0: NVIDIA H100 80GB HBM3, compute capability 9.0, VMM: yes, VRAM: 81079 MiB
Available devices:
  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80500 MiB free)
"""
NONE_LIST = "Available devices:\n  (none)\n"
# b11434 CPU build (GGML_RPC=ON), -ngl 99 -lv 4: RPC support makes llama.cpp report a full
# offload although every weight stays in CPU_Mapped.
CPU_RPC_LOG = [
    "0.00.004.279 I cmn  common_param: device_info:",
    "0.00.004.304 I cmn  common_param:   - CPU     : AMD EPYC (24105 MiB, 24105 MiB free)",
    "0.00.275.225 I load_tensors: offloading output layer to GPU",
    "0.00.275.260 I load_tensors: offloading 29 repeating layers to GPU",
    "0.00.275.260 I load_tensors: offloaded 31/31 layers to GPU",
    "0.00.275.271 I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB",
    "0.00.277.093 I llama_context:        CPU  output buffer size =     0.75 MiB",
    "0.00.327.719 I srv  llama_server: listening on http://127.0.0.1:45017",
]
CUDA_LOG = [
    (
        "0.00.120.000 I llama_model_load_from_file_impl: using device CUDA0 (NVIDIA H100 80GB "
        "HBM3) (0000:01:00.0) - 80500 MiB free"
    ),
    "0.00.275.260 I load_tensors: offloaded 31/31 layers to GPU",
    "0.00.275.271 I load_tensors:        CUDA0 model buffer size =    92.10 MiB",
    "0.00.275.272 I load_tensors:   CPU_Mapped model buffer size =    15.00 MiB",
    "0.00.275.273 I load_tensors:    CUDA_Host model buffer size =     1.00 MiB",
]
NO_GPU_BUILD = [
    "warning: no usable GPU found, --gpu-layers option will be ignored",
    "warning: one possible reason is that llama.cpp was compiled without GPU support",
    "0.00.275.271 I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB",
]
LOADER_ERROR = (
    "load_backend: failed to load /opt/llama/libggml-cuda.so: libcudart.so.12: cannot open "
    "shared object file: No such file or directory"
)
OLD_DRIVER = (
    "0.00.010.000 E ggml_cuda_init: failed to initialize CUDA: CUDA driver version is "
    "insufficient for CUDA runtime version"
)


# ----------------------------------------------------------------------------- parsing
def test_device_list_in_upstream_format() -> None:
    devices = parse_device_list(CUDA_LIST)
    assert devices == (Device("CUDA0", "NVIDIA H100 80GB HBM3", 81079, 80500),)
    assert devices[0].backend == "cuda"
    assert devices[0].is_gpu
    assert parse_device_list(NONE_LIST) == ()
    assert parse_device_list("error: invalid argument: --list-devices\n") is None


@pytest.mark.parametrize(
    ("name", "backend"),
    [("CUDA0", "cuda"), ("ROCm1", "rocm"), ("Vulkan0", "vulkan"), ("MTL0", "metal"),
     ("RPC0[10.0.0.9:50052]", "rpc"), ("BLAS", "blas")],
)  # fmt: skip
def test_device_backend_from_its_name(name: str, backend: str) -> None:
    assert device_backend(name) == backend


def test_software_vulkan_is_not_a_gpu() -> None:
    (lavapipe,) = (
        parse_device_list(
            "Available devices:\n  Vulkan0: llvmpipe (LLVM 15.0.7, 256 bits) (24105 MiB, 24105 MiB free)\n"
        )
        or ()
    )
    assert lavapipe.backend == "vulkan"
    assert not lavapipe.is_gpu


def test_placement_on_a_gpu() -> None:
    placement = read_placement(CUDA_LOG)
    assert [d.name for d in placement.devices] == ["CUDA0"]
    assert placement.devices[0].description == "NVIDIA H100 80GB HBM3"
    assert placement.devices[0].free_mib == 80500
    assert placement.offloaded == (31, 31)
    assert placement.gpu_buffers == {"CUDA0": 92.10}
    assert placement.on_cpu_only is False
    assert cpu_fallback(CUDA_LOG) is None


def test_full_offload_count_with_cpu_buffers_is_a_cpu_fallback() -> None:
    placement = read_placement(CPU_RPC_LOG)
    assert placement.devices == ()
    assert placement.offloaded == (31, 31)
    assert placement.on_cpu_only is True
    cause = cpu_fallback(CPU_RPC_LOG)
    assert cause is not None
    assert cause.kind == "cpu_fallback"
    assert "CPU_Mapped" in cause.text


def test_a_log_that_does_not_say_is_no_verdict() -> None:
    quiet = ["0.00.322.605 I srv  llama_server: model loaded"]
    assert read_placement(quiet).on_cpu_only is None
    assert cpu_fallback(quiet) is None


@pytest.mark.parametrize(
    ("lines", "kind", "words"),
    [
        pytest.param(NO_GPU_BUILD, "no_gpu_backend", "without GPU support", id="cpu-build"),
        pytest.param([LOADER_ERROR, *CPU_RPC_LOG], "missing_library", "libcudart.so.12", id="cudart"),
        pytest.param([OLD_DRIVER, *CPU_RPC_LOG], "gpu_driver_too_old", "update the NVIDIA driver", id="driver"),
        pytest.param(
            ["0.00.010.000 E ggml_cuda_init: failed to initialize ROCm: no ROCm-capable device is detected",
             *CPU_RPC_LOG],
            "no_gpu_device", "HIP_VISIBLE_DEVICES", id="no-rocm-device",
        ),
        pytest.param(["offloaded 0/31 layers to GPU"], "cpu_fallback", "no GPU", id="zero-layers"),
    ],
)  # fmt: skip
def test_cpu_fallback_names_the_cause(lines: list[str], kind: str, words: str) -> None:
    cause = cpu_fallback(lines)
    assert cause is not None
    assert cause.kind == kind
    assert words in cause.text


def test_gpu_causes_are_decoded_for_a_failed_start_too() -> None:
    cause = diagnose(["CUDA error: no kernel image is available for execution on the device"], -6)
    assert cause.kind == "gpu_arch_unsupported"
    assert diagnose_gpu(["vkCreateInstance: ERROR_INCOMPATIBLE_DRIVER"]) is not None
    assert diagnose_gpu(["0.00.006.233 I srv    load_model: loading model 'x.gguf'"]) is None
    # a model that fails to load is not a GPU library that fails to load
    assert diagnose_gpu(["E srv    load_model: failed to load model, 'bad.gguf'"]) is None


@pytest.mark.parametrize(
    ("ngl", "device", "asked"),
    [(99, None, True), ("all", None, True), ("12", None, True), (None, None, False),
     ("auto", None, False), (0, None, False), (-1, None, False), (99, "none", False),
     (99, "CUDA0", True)],
)  # fmt: skip
def test_what_counts_as_asking_for_the_gpu(
    ngl: int | str | None, device: str | None, asked: bool
) -> None:
    assert asks_for_gpu(ngl, device) is asked


# ----------------------------------------------------------------------------- the start check
@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(struct.pack("<4sIQQ", b"GGUF", 3, 0, 0))
    return path


def _gpu_build(folder: Path, backend: str = "cuda") -> Path:
    """A fake GPU llama-server that looks for its runtime library in its own folder."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "llama-server"
    shim.write_text(
        "#!/bin/sh\n"
        f'exec "{sys.executable}" "{FAKE_SERVER}" --fake-gpu {backend} '
        '--fake-lib-dir "$(dirname "$0")" "$@"\n'
    )
    shim.chmod(0o755)
    return shim


@posix_only
def test_gpu_layers_on_the_cpu_refuse_to_start(tmp_path: Path, model: Path) -> None:
    binary = _gpu_build(tmp_path / "cuda")  # no libcudart.so.12 beside it
    server = LlamaServer(model, binary=binary, n_gpu_layers=99, start_timeout=30)
    with pytest.raises(CpuFallbackError, match="loaded the model on the CPU") as err:
        server.start()
    assert isinstance(err.value, ServerStartError)
    assert "libcudart.so.12" in err.value.cause
    assert "install is incomplete" in err.value.cause
    assert not server.is_running


@posix_only
def test_cpu_fallback_warn_keeps_the_server(
    tmp_path: Path, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binary = _gpu_build(tmp_path / "cuda")
    caplog.set_level(logging.WARNING, logger="llama_proc")
    with LlamaServer(model, binary=binary, n_gpu_layers="all", cpu_fallback="warn") as server:
        assert server.is_running
        assert server.devices == ()
    assert any("libcudart.so.12" in r.getMessage() for r in caplog.records)


@posix_only
def test_devices_in_use_are_reported(tmp_path: Path, model: Path) -> None:
    binary = _gpu_build(tmp_path / "cuda")
    (binary.parent / "libcudart.so.12").write_bytes(b"\x7fELF fake cuda runtime")
    with LlamaServer(model, binary=binary, n_gpu_layers=99) as server:
        (device,) = server.devices
        assert (device.name, device.backend) == ("CUDA0", "cuda")
        assert device.description == "NVIDIA H100 80GB HBM3"
        assert server.placement is not None
        assert server.placement.gpu_buffers == {"CUDA0": 92.10}


@posix_only
def test_no_gpu_layers_asked_means_no_check(tmp_path: Path, model: Path) -> None:
    binary = _gpu_build(tmp_path / "cuda")
    with LlamaServer(model, binary=binary, n_gpu_layers=99, device="none") as server:
        assert server.is_running
    with LlamaServer(model, binary=binary) as server:
        assert server.is_running


@posix_only
def test_gpu_layers_in_extra_args_are_checked_too(tmp_path: Path, model: Path) -> None:
    binary = _gpu_build(tmp_path / "cuda")
    server = LlamaServer(model, binary=binary, extra_args=["-ngl", "99"], start_timeout=30)
    with pytest.raises(CpuFallbackError, match="n_gpu_layers=99"):
        server.start()
    with LlamaServer(model, binary=binary, extra_args=["-ngl", "99", "--device=none"]) as server:
        assert server.is_running


def test_cpu_fallback_option_is_checked(model: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="cpu_fallback"):
        LlamaServer(model, cpu_fallback="ignore")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the real server
def test_real_cpu_server_lists_no_gpu(llama_server_bin: Path) -> None:
    from llama_proc._proc import run_with_timeout

    ran = run_with_timeout([str(llama_server_bin), "--list-devices"], 60)
    assert ran is not None
    assert ran.returncode == 0
    devices = parse_device_list(ran.output)
    assert devices is not None
    assert not [d for d in devices if d.is_gpu]


@pytest.mark.timeout(300)
def test_real_cpu_server_refuses_gpu_layers(llama_server_bin: Path, smol_model: Path) -> None:
    server = LlamaServer(
        smol_model, binary=llama_server_bin, n_gpu_layers=99, ctx_size=512, start_timeout=120
    )
    with pytest.raises(CpuFallbackError) as err:
        server.start()
    assert not server.is_running
    assert "CPU" in err.value.cause
    with LlamaServer(
        smol_model, binary=llama_server_bin, n_gpu_layers=99, ctx_size=512, start_timeout=120,
        cpu_fallback="warn",
    ) as server:  # fmt: skip
        assert server.devices == ()
        assert server.placement is not None
        assert "CPU_Mapped" in server.placement.buffers
        assert "--log-verbosity" in server.process.argv
