"""The CUDA toolkit from the package index: choice, layout, link stub, runtime bundling.

Pure unit tests run by default (fake nvcc scripts, fake wheels, tiny shared libraries built with
the host C compiler). The test marked ``cuda_wheels`` downloads NVIDIA's real wheels (~0.5 GB)
and compiles and links a small CUDA CMake project with them; it is deselected by default
(``pytest -m cuda_wheels`` runs it).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from llama_proc.config import Settings
from llama_proc.errors import ManifestError, ProvisionError
from llama_proc.provision import cuda_wheels, toolchain
from llama_proc.provision.build import bundle_cuda_runtime, elf_needed
from llama_proc.provision.cmake_flags import compose_cmake_flags
from llama_proc.provision.cuda_wheels import (
    TOOLKIT_MARKER,
    driver_stub_source,
    ensure_cuda_toolkit,
    lay_out_toolkit,
    toolkit_path,
)
from llama_proc.provision.manifest import CudaToolkitSpec, IndexFile, load_manifest, parse_manifest
from llama_proc.provision.platform import HostInfo, normalize_arch
from llama_proc.provision.toolchain import choose_cuda_toolkit, find_tool

MANIFEST = load_manifest()
CC = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
needs_cc = pytest.mark.skipif(CC is None, reason="needs a C compiler")

CUDA_H = """
#define cuMemGetInfo cuMemGetInfo_v2
#define cuMemcpyHtoD __CUDA_API_PTDS(cuMemcpyHtoD_v2)
CUresult CUDAAPI cuInit(unsigned int Flags);
CUresult CUDAAPI cuMemGetInfo(size_t *free, size_t *total);
CUresult CUDAAPI cuMemcpyHtoD(CUdeviceptr dst, const void *src, size_t n);
"""


def _spec(cuda: str = "13.0", arch: str = "x86_64") -> CudaToolkitSpec:
    wheel = IndexFile("nvidia-cuda-nvcc", "13.0.88", f"nvcc-{cuda}.whl", "a" * 64)
    return CudaToolkitSpec(cuda=cuda, os="linux", arch=arch, wheels=(wheel,))


def _host(cuda: str | None, *caps: str) -> HostInfo:
    return HostInfo(
        os="linux",
        arch="x86_64",
        nvidia_driver="580.1" if cuda else None,
        cuda_version=cuda,
        compute_capabilities=caps,
    )


def _fake_nvcc(folder: Path, release: str) -> Path:
    nvcc = folder / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True, exist_ok=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return nvcc


@pytest.fixture
def no_system_cuda(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment where no system nvcc can be found (this machine may have one)."""
    monkeypatch.setattr(toolchain, "CUDA_DEFAULT_DIRS", ())
    monkeypatch.setattr(toolchain, "_scripts_dirs", list)
    return {"PATH": ""}


# ------------------------------------------------------------------------------------ manifest


def test_shipped_manifest_pins_cuda13_wheels_for_both_linux_arches():
    found = {(t.os, t.arch): t for t in MANIFEST.cuda_toolkits}
    assert set(found) == {("linux", "x86_64"), ("linux", "aarch64")}
    for spec in found.values():
        assert spec.cuda_version[0] == 13
        projects = {w.project for w in spec.wheels}
        assert {
            "nvidia-cuda-nvcc",
            "nvidia-nvvm",
            "nvidia-cuda-runtime",
            "nvidia-cublas",
        } <= projects
        assert all(len(w.sha256) == 64 and w.filename.endswith(".whl") for w in spec.wheels)
        assert all(spec.arch in w.filename for w in spec.wheels)


def _manifest_with(toolkit: str) -> str:
    return (
        'schema = 1\n[llama_cpp]\nrepo = "a/b"\nbuild = "b1"\n[source]\nrelease_url = "x"\n'
        '[[variant]]\nid = "linux-x86_64-cpu"\nos = "linux"\narch = "x86_64"\nbackend = "cpu"\n'
        'asset = "^a$"\nbinaries = ["llama-server"]\ntargets = ["llama-server"]\n' + toolkit
    )


def test_manifest_refuses_an_unpinned_or_unknown_toolkit_entry():
    wheel = '{ project = "p", version = "1", filename = "p-1.whl", sha256 = "" }'
    with pytest.raises(ManifestError, match="sha256"):
        parse_manifest(
            _manifest_with(
                f'[[cuda_toolkit]]\ncuda = "13.0"\nos = "linux"\narch = "x86_64"\nwheels = [{wheel}]\n'
            )
        )
    with pytest.raises(ManifestError, match="unknown key"):
        parse_manifest(_manifest_with('[[cuda_toolkit]]\ncuda = "13.0"\nflavour = "x"\n'))
    assert parse_manifest(_manifest_with("")).cuda_toolkits == ()


# ------------------------------------------------------------------------------------- choice


def test_system_toolkit_is_preferred_when_it_fits(tmp_path):
    nvcc = _fake_nvcc(tmp_path / "cuda", "12.8")
    env = {"PATH": "", "CUDA_HOME": str(tmp_path / "cuda")}
    choice = choose_cuda_toolkit(
        _host("13.0", "8.6"), [_spec()], os_name="linux", arch="x86_64", env=env
    )
    assert choice.source == "system"
    assert choice.nvcc == str(nvcc)
    assert choice.as_dict()["version"] == "12.8"


def test_wheels_without_a_system_toolkit(no_system_cuda):
    choice = choose_cuda_toolkit(
        _host("13.1", "8.9"), [_spec()], os_name="linux", arch="x86_64", env=no_system_cuda
    )
    assert choice.source == "wheels"
    assert choice.spec == _spec()
    assert "no system CUDA toolkit" in choice.reason
    # A build for other machines (no driver, no GPU) takes the wheels too.
    assert (
        choose_cuda_toolkit(
            None, [_spec()], os_name="linux", arch="x86_64", env=no_system_cuda
        ).source
        == "wheels"
    )


def test_system_toolkit_too_old_for_the_gpu_falls_back_to_wheels(tmp_path):
    _fake_nvcc(tmp_path / "cuda", "12.4")
    env = {"PATH": "", "CUDA_HOME": str(tmp_path / "cuda")}
    choice = choose_cuda_toolkit(
        _host("13.0", "12.0"), [_spec()], os_name="linux", arch="x86_64", env=env
    )
    assert choice.source == "wheels"
    assert "compute capability 12.0 (needs CUDA 12.8)" in choice.reason


def test_cuda12_driver_without_toolkit_says_what_to_do(no_system_cuda):
    choice = choose_cuda_toolkit(
        _host("12.4", "8.6"), [_spec()], os_name="linux", arch="x86_64", env=no_system_cuda
    )
    assert choice.source == "none"
    assert "driver supports only CUDA 12.4" in choice.reason
    assert "580" in choice.reason
    assert "CUDA_HOME" in choice.reason


def test_cuda13_wheels_refused_for_pascal_and_on_other_platforms(no_system_cuda):
    pascal = choose_cuda_toolkit(
        _host("13.0", "6.1"), [_spec()], os_name="linux", arch="x86_64", env=no_system_cuda
    )
    assert pascal.source == "none"
    assert "compute capability 6.1" in pascal.reason
    other = choose_cuda_toolkit(
        _host("13.0"), [_spec()], os_name="windows", arch="x86_64", env=no_system_cuda
    )
    assert other.source == "none"
    assert "no CUDA toolkit for windows-x86_64" in other.reason


def test_newer_system_toolkit_than_driver_is_not_used(tmp_path):
    _fake_nvcc(tmp_path / "cuda", "13.0")
    env = {"PATH": "", "CUDA_HOME": str(tmp_path / "cuda")}
    choice = choose_cuda_toolkit(
        _host("12.8", "8.6"), [_spec()], os_name="linux", arch="x86_64", env=env
    )
    assert choice.source == "none"
    assert "is not used: it is CUDA 13.0 and the driver supports only CUDA 12.8" in choice.reason


# ------------------------------------------------------------------------------ cmake + tools


def test_wheel_toolkit_root_reaches_cmake():
    cuda = MANIFEST.get("linux-x86_64-cuda13")
    flags = compose_cmake_flags(
        cuda, (), os_name="linux", cuda_compiler="/tk/bin/nvcc", cuda_toolkit_root="/tk"
    )
    assert "-DCUDAToolkit_ROOT=/tk" in flags
    assert "-DCMAKE_CUDA_COMPILER=/tk/bin/nvcc" in flags
    cpu = compose_cmake_flags(
        MANIFEST.get("linux-x86_64-cpu"), (), os_name="linux", cuda_toolkit_root="/tk"
    )
    assert not any("CUDAToolkit_ROOT" in f for f in cpu)


@pytest.mark.skipif(find_tool("cmake") is None or CC is None, reason="needs cmake and cc")
def test_find_toolchain_uses_the_given_toolkit_root(tmp_path):
    root = tmp_path / "tk"
    nvcc = _fake_nvcc(root, "13.0")
    tools = toolchain.find_toolchain("cuda", "linux", cuda_root=root)
    assert tools.nvcc == str(nvcc)
    assert tools.nvcc_version == (13, 0)
    assert tools.cuda_root == str(root)


# ------------------------------------------------------------------------------------- layout


def test_lay_out_toolkit_merges_parts_and_links_libraries(tmp_path):
    unpacked = tmp_path / "unpacked"
    files = {
        "nvidia/__init__.py": "",
        "nvidia/cu13/bin/nvcc": "x",
        "nvidia/cu13/include/cuda.h": "x",
        "nvidia/cu13/include/cccl/cub/cub.cuh": "x",
        "nvidia/cu13/lib/libcudart.so.13": "x",
        "nvidia/cu13/lib/libcublasLt.so.13": "x",
        "nvidia/cu13/.metadata/provenance.txt": "x",
        "nvidia/cu13/nvvm/bin/cicc": "x",
    }
    for name, text in files.items():
        (unpacked / name).parent.mkdir(parents=True, exist_ok=True)
        (unpacked / name).write_text(text)
    root = tmp_path / "root"
    lay_out_toolkit(unpacked, root)
    assert (root / "bin" / "nvcc").is_file()
    assert (root / "include" / "cccl" / "cub" / "cub.cuh").is_file()
    assert (root / "nvvm" / "bin" / "cicc").is_file()
    assert (root / "lib64" / "libcudart.so").readlink() == Path("libcudart.so.13")
    assert (root / "lib64" / "libcublasLt.so").resolve() == (root / "lib64" / "libcublasLt.so.13")
    assert (root / "lib").readlink() == Path("lib64")
    assert not (root / ".metadata").exists()
    assert not list(root.rglob("*.py"))


def test_lay_out_toolkit_refuses_clashing_parts(tmp_path):
    for part in ("a", "b"):
        path = tmp_path / "unpacked" / "nvidia" / part / "include" / "cuda.h"
        path.parent.mkdir(parents=True)
        path.write_text(part)
    with pytest.raises(ProvisionError, match=r"both ship cuda\.h"):
        lay_out_toolkit(tmp_path / "unpacked", tmp_path / "root")


def test_driver_stub_exports_declared_and_versioned_names():
    source = driver_stub_source(CUDA_H)
    for name in ("cuInit", "cuMemGetInfo", "cuMemGetInfo_v2", "cuMemcpyHtoD_v2"):
        assert f"int {name}(void)" in source


def _wheel(path: Path, members: dict[str, tuple[str, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, (text, mode) in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            zf.writestr(info, text)
    return path


@needs_cc
def test_ensure_cuda_toolkit_lays_out_once_and_builds_the_driver_stub(tmp_path, monkeypatch):
    nvcc = "#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n"
    wheels = {
        "nvcc.whl": _wheel(
            tmp_path / "nvcc.whl",
            {
                "nvidia/cu13/bin/nvcc": (nvcc, 0o755),
                "nvidia_cuda_nvcc-13.0.dist-info/RECORD": ("", 0o644),
            },
        ),
        "rt.whl": _wheel(
            tmp_path / "rt.whl",
            {
                "nvidia/cu13/include/cuda.h": (CUDA_H, 0o644),
                "nvidia/cu13/lib/libcudart.so.13": ("x", 0o644),
            },
        ),
    }
    fetched: list[str] = []

    def fake_fetch(spec: IndexFile, settings: Settings, session: object = None) -> Path:
        fetched.append(spec.filename)
        return wheels[spec.filename]

    monkeypatch.setattr(cuda_wheels, "fetch_index_file", fake_fetch)
    spec = CudaToolkitSpec(
        "13.0",
        "linux",
        "x86_64",
        (IndexFile("n", "1", "nvcc.whl", "a" * 64), IndexFile("r", "1", "rt.whl", "b" * 64)),
    )
    settings = Settings.from_env({"LLAMA_PROC_CACHE_DIR": str(tmp_path / "cache")})
    root = ensure_cuda_toolkit(spec, settings)
    assert root == toolkit_path(spec, settings)
    assert root.parent == tmp_path / "cache" / "toolkits"
    assert json.loads((root / TOOLKIT_MARKER).read_text())["cuda"] == "13.0"
    assert (root / "lib64" / "libcudart.so").is_symlink()
    stub = root / "lib64" / "stubs" / "libcuda.so"
    symbols = subprocess.run(["nm", "-D", str(stub)], capture_output=True, text=True).stdout
    assert "cuMemGetInfo_v2" in symbols
    assert not (root / ".wheels").exists()
    assert ensure_cuda_toolkit(spec, settings) == root
    assert fetched == ["nvcc.whl", "rt.whl"]  # the second call was a cache hit


@needs_cc
def test_ensure_cuda_toolkit_refuses_an_nvcc_of_another_release(tmp_path, monkeypatch):
    nvcc = "#!/bin/sh\necho 'Cuda compilation tools, release 12.9, V12.9.1'\n"
    wheel = _wheel(
        tmp_path / "w.whl",
        {"nvidia/cu13/bin/nvcc": (nvcc, 0o755), "nvidia/cu13/include/cuda.h": (CUDA_H, 0o644)},
    )
    monkeypatch.setattr(cuda_wheels, "fetch_index_file", lambda *a, **k: wheel)
    spec = CudaToolkitSpec("13.0", "linux", "x86_64", (IndexFile("n", "1", "w.whl", "a" * 64),))
    settings = Settings.from_env({"LLAMA_PROC_CACHE_DIR": str(tmp_path / "cache")})
    with pytest.raises(ProvisionError, match=r"does not report release 13\.0"):
        ensure_cuda_toolkit(spec, settings)
    assert not toolkit_path(spec, settings).exists()


# ----------------------------------------------------------------------------- runtime bundle


def _shared(cc: str, out: Path, soname: str, *links: Path) -> None:
    src = out.with_suffix(".c")
    symbol = out.name.split(".")[0].replace("-", "_")
    src.write_text(f"int f_{symbol}(void) {{ return 0; }}\n")
    libs = (
        ["-Wl,--no-as-needed"] + [f"-L{p.parent}" for p in links] + [f"-l:{p.name}" for p in links]
    )
    subprocess.run(
        [cc, "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(out), str(src), *libs],
        check=True,
    )


@needs_cc
def test_bundle_copies_the_linked_cuda_libraries_and_what_they_link(tmp_path):
    assert CC is not None
    lib = tmp_path / "tk" / "lib64"
    lib.mkdir(parents=True)
    _shared(CC, lib / "libcudart.so.13", "libcudart.so.13")
    _shared(CC, lib / "libcublasLt.so.13", "libcublasLt.so.13")
    _shared(CC, lib / "libcublas.so.13", "libcublas.so.13", lib / "libcublasLt.so.13")
    staging = tmp_path / "staging"
    staging.mkdir()
    _shared(CC, staging / "libggml-cuda.so", "libggml-cuda.so", lib / "libcublas.so.13")
    (staging / "README").write_text("not an ELF file")
    assert elf_needed(staging / "README") == []
    assert "libcublas.so.13" in elf_needed(staging / "libggml-cuda.so")
    added = bundle_cuda_runtime(staging, [tmp_path / "missing", lib])
    assert sorted(added) == ["libcublas.so.13", "libcublasLt.so.13"]
    assert (staging / "libcublasLt.so.13").is_file()
    assert not (staging / "libcudart.so.13").exists()  # not linked: not copied
    assert bundle_cuda_runtime(staging, [lib]) == []  # already there


# ---------------------------------------------------------------- real wheels (opt-in, ~0.5 GB)

CMAKE_PROJECT = """cmake_minimum_required(VERSION 3.18)
project(wheeltk LANGUAGES CXX CUDA)
find_package(CUDAToolkit REQUIRED)
message(STATUS "wheel toolkit ${CUDAToolkit_VERSION} at ${CUDAToolkit_BIN_DIR}")
add_executable(probe probe.cu)
target_link_libraries(probe PRIVATE CUDA::cudart CUDA::cublas CUDA::cuda_driver)
"""
PROBE_CU = """#include <cstdio>
#include <cuda.h>
#include <cublas_v2.h>
__global__ void twice(float *x) { x[threadIdx.x] *= 2.0f; }
int main() {
    int version = 0;
    cuDriverGetVersion(&version);
    float *d = nullptr;
    if (cudaMalloc(&d, 64 * sizeof(float)) != cudaSuccess) { std::printf("no GPU\\n"); return 0; }
    twice<<<1, 64>>>(d);
    cublasHandle_t h;
    std::printf("driver %d cublas %d\\n", version, (int)cublasCreate(&h));
    return 0;
}
"""


@pytest.mark.compile
@pytest.mark.cuda_wheels
def test_real_wheel_toolkit_compiles_and_links_a_cuda_project(real_settings, tmp_path):
    spec = next(
        t
        for t in MANIFEST.cuda_toolkits
        if t.os == "linux" and t.arch == normalize_arch(platform.machine(), "linux")
    )
    root = ensure_cuda_toolkit(spec, real_settings)
    cmake = find_tool("cmake")
    assert cmake is not None
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(CMAKE_PROJECT)
    (project / "probe.cu").write_text(PROBE_CU)
    build = tmp_path / "build"
    configure = subprocess.run(
        [
            cmake, "-S", str(project), "-B", str(build),
            f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}",
            f"-DCUDAToolkit_ROOT={root}",
            "-DCMAKE_CUDA_ARCHITECTURES=86",
        ],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert configure.returncode == 0, configure.stdout + configure.stderr
    assert "wheel toolkit 13.0" in configure.stdout
    assert str(root) in configure.stdout
    built = subprocess.run(
        [cmake, "--build", str(build)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert built.returncode == 0, built.stdout + built.stderr
    probe = build / "probe"
    needed = elf_needed(probe)
    assert {"libcudart.so.13", "libcublas.so.13", "libcuda.so.1"} <= set(needed)
    out = tmp_path / "install"
    out.mkdir()
    shutil.copy2(probe, out / "probe")
    added = bundle_cuda_runtime(out, [root / "lib64"])
    assert sorted(added) == ["libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13"]
