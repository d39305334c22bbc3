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
from llama_proc.provision.cache.installer import install_atomically
from llama_proc.provision.compile import cuda_wheels, toolchain
from llama_proc.provision.compile.cmake_flags import compose_cmake_flags, toolkit_link_flags
from llama_proc.provision.compile.cuda_runtime import bundle_cuda_runtime, driver_stub_dir
from llama_proc.provision.compile.cuda_wheels import (
    TOOLKIT_MARKER,
    driver_stub_source,
    ensure_cuda_toolkit,
    lay_out_toolkit,
    toolkit_path,
)
from llama_proc.provision.compile.toolchain import choose_cuda_toolkit, find_tool
from llama_proc.provision.elf import elf_needed
from llama_proc.provision.host.host_info import HostInfo, normalize_arch
from llama_proc.provision.manifest import load_manifest, parse_manifest
from llama_proc.provision.manifest_records import CudaToolkitSpec, IndexFile

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


def _fake_nvcc(folder: Path, release: str, *, cublas: bool = True) -> Path:
    """A toolkit in the ``targets/<triple>`` layout, whose nvcc reports it as the real one does."""
    nvcc = folder / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True, exist_ok=True)
    target = folder / "targets" / "x86_64-linux"
    nvcc.write_text(
        "#!/bin/sh\n"
        f"echo 'Cuda compilation tools, release {release}, V{release}.1'\n"
        'case "$*" in *--dryrun*)\n'
        f"  echo '#$ INCLUDES=\"-I{target}/include\"  '\n"
        f'  echo \'#$ LIBRARIES=  "-L{target}/lib/stubs" "-L{target}/lib"\' ;;\n'
        "esac\n"
    )
    nvcc.chmod(0o755)
    (target / "include").mkdir(parents=True)
    (target / "lib" / "stubs").mkdir(parents=True)
    if cublas:
        (target / "include" / "cublas_v2.h").write_text("/* cuBLAS */\n")
        (target / "lib" / "libcublas.so.12").write_text("")
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


def test_system_toolkit_without_cublas_falls_back_to_wheels(tmp_path):
    # As a CUDA runtime image has it: nvcc and cudart, but no cuBLAS; reached through a
    # wrapper script on PATH, which is followed by asking nvcc where its toolkit is.
    real = _fake_nvcc(tmp_path / "cuda-13.0", "13.0", cublas=False)
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    includes, libs = toolchain.cuda_toolkit_dirs(str(wrapper))
    target = tmp_path / "cuda-13.0" / "targets" / "x86_64-linux"
    assert includes[0] == target / "include"
    assert libs[0] == target / "lib"  # the stubs folder is not a runtime library folder
    assert target / "lib" / "stubs" not in libs
    env = {"PATH": str(wrapper.parent)}
    choice = choose_cuda_toolkit(
        _host("13.0", "8.6"), [_spec()], os_name="linux", arch="x86_64", env=env
    )
    assert choice.source == "wheels"
    assert f"the system toolkit {wrapper} is not used: it has no cuBLAS headers" in choice.reason
    (target / "include" / "cublas_v2.h").write_text("")
    choice = choose_cuda_toolkit(
        _host("13.0", "8.6"), [_spec()], os_name="linux", arch="x86_64", env=env
    )
    assert "it has no cuBLAS library (libcublas)" in choice.reason
    (target / "lib" / "libcublas.so.13").write_text("")
    choice = choose_cuda_toolkit(
        _host("13.0", "8.6"), [_spec()], os_name="linux", arch="x86_64", env=env
    )
    assert choice.source == "system"


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
    # The linker resolves libggml-cuda's own dependencies by soname when it links the server.
    link = "-Wl,-rpath-link,/tk/lib64:/tk/lib64/stubs"
    assert f"-DCMAKE_EXE_LINKER_FLAGS={link}" in flags
    assert f"-DCMAKE_SHARED_LINKER_FLAGS={link}" in flags
    windows = compose_cmake_flags(
        MANIFEST.get("windows-x86_64-cuda13"), (), os_name="windows", cuda_toolkit_root="C:/tk"
    )
    assert "-DCUDAToolkit_ROOT=C:/tk" in windows
    assert not any("LINKER_FLAGS" in f for f in windows)
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
    # Under its soname too, for -rpath-link and for the install check where there is no driver.
    assert (stub.parent / "libcuda.so.1").readlink() == Path("libcuda.so")
    assert not (root / ".wheels").exists()
    assert ensure_cuda_toolkit(spec, settings) == root
    assert fetched == ["nvcc.whl", "rt.whl"]  # the second call was a cache hit

    # A toolkit laid out by an older llama-proc (no layout version) is laid out again.
    marker = root / TOOLKIT_MARKER
    old = json.loads(marker.read_text())
    del old["layout"]
    marker.write_text(json.dumps(old))
    (stub.parent / "libcuda.so.1").unlink()
    assert ensure_cuda_toolkit(spec, settings) == root
    assert fetched == ["nvcc.whl", "rt.whl"] * 2
    assert (stub.parent / "libcuda.so.1").exists()


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


STUB_SERVER_C = """#include <stdio.h>
int cuInit(unsigned int flags);
int main(int argc, char **argv) {
    fprintf(stderr, "version: 11434 (abc1234)\\nbuilt with cc for Linux\\n");
    return argc > 5 ? cuInit(0) : 0;
}
"""


def _driverless_build(tmp_path: Path) -> tuple[Path, Path]:
    """(a staged CUDA build that links libcuda.so.1, the toolkit's stub folder), made with cc."""
    assert CC is not None
    stubs = tmp_path / "tk" / "lib64" / "stubs"
    stubs.mkdir(parents=True)
    stub_c = stubs / "stub.c"
    stub_c.write_text("int cuInit(unsigned int flags) { return 34; }\n")
    subprocess.run(
        [CC, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stubs / "libcuda.so"),
         str(stub_c)],
        check=True,
    )  # fmt: skip
    (stubs / "libcuda.so.1").symlink_to("libcuda.so")
    built = tmp_path / "built"
    built.mkdir()
    main_c = built / "server.c"
    main_c.write_text(STUB_SERVER_C)
    subprocess.run(
        [CC, "-o", str(built / "llama-server"), str(main_c), f"-L{stubs}", "-l:libcuda.so.1"],
        check=True,
    )
    main_c.unlink()
    return built, stubs


@needs_cc
@pytest.mark.skipif(Path("/proc/driver/nvidia").exists(), reason="needs a host without a driver")
def test_build_for_other_machines_is_checked_against_the_driver_stub(tmp_path):
    built, stubs = _driverless_build(tmp_path)
    settings = Settings.from_env({"LLAMA_PROC_CACHE_DIR": str(tmp_path / "cache")})
    stub = driver_stub_dir([stubs.parent, tmp_path / "missing"])
    assert stub == str(stubs)
    assert driver_stub_dir([tmp_path / "missing"]) is None

    def populate(staging: Path, stub: str | None) -> dict[str, object]:
        shutil.copy2(built / "llama-server", staging / "llama-server")
        return {
            "variant_id": "linux-x86_64-cuda13",
            "build": "b11434",
            "source": "built",
            "cuda_runtime": {"driver_stub": stub},
        }

    def install(target: Path, stub: str | None) -> Path:
        return install_atomically(
            target,
            lambda staging: populate(staging, stub),
            settings=settings,
            binaries=("llama-server",),
            os_name="linux",
        ).path

    # Without a stub the missing driver library fails the check, and nothing is installed.
    with pytest.raises(ProvisionError, match=r"libcuda\.so\.1"):
        install(tmp_path / "cache" / "no-stub", None)
    assert not (tmp_path / "cache" / "no-stub").exists()

    path = install(tmp_path / "cache" / "with-stub", stub)
    record = json.loads((path / "install.json").read_text())
    assert record["smoke_check"].startswith(f"ok against the libcuda stub in {stubs}")
    assert record["build_number"] == 11434
    # The stub was only for the check: the installed binary still cannot load here.
    ran = subprocess.run([str(path / "llama-server")], capture_output=True, text=True)
    assert ran.returncode != 0
    assert "libcuda.so.1" in ran.stderr


# ---------------------------------------------------------------- real wheels (opt-in, ~0.5 GB)

# llama.cpp's shape: the server links a shared library (ggml-cuda) that links the CUDA libraries.
CMAKE_PROJECT = """cmake_minimum_required(VERSION 3.18)
project(wheeltk LANGUAGES CXX CUDA)
find_package(CUDAToolkit REQUIRED)
message(STATUS "wheel toolkit ${CUDAToolkit_VERSION} at ${CUDAToolkit_BIN_DIR}")
add_library(gpu SHARED probe.cu)
target_link_libraries(gpu PRIVATE CUDA::cudart CUDA::cublas CUDA::cuda_driver)
add_executable(probe main.cpp)
target_link_libraries(probe PRIVATE gpu)
"""
MAIN_CPP = """int probe_main();
int main() { return probe_main(); }
"""
PROBE_CU = """#include <cstdio>
#include <cuda.h>
#include <cublas_v2.h>
__global__ void twice(float *x) { x[threadIdx.x] *= 2.0f; }
int probe_main() {
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
    (project / "main.cpp").write_text(MAIN_CPP)
    build = tmp_path / "build"
    configure = subprocess.run(
        [
            cmake, "-S", str(project), "-B", str(build),
            f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}",
            f"-DCUDAToolkit_ROOT={root}",
            "-DCMAKE_CUDA_ARCHITECTURES=86",
            *toolkit_link_flags(str(root), "linux"),
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
    assert "libgpu.so" in elf_needed(probe)
    needed = elf_needed(build / "libgpu.so")
    assert {"libcudart.so.13", "libcublas.so.13", "libcuda.so.1"} <= set(needed)
    out = tmp_path / "install"
    out.mkdir()
    shutil.copy2(probe, out / "probe")
    shutil.copy2(build / "libgpu.so", out / "libgpu.so")
    added = bundle_cuda_runtime(out, [root / "lib64"])
    assert sorted(added) == ["libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13"]
