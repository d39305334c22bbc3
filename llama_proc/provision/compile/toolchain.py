"""The build tools of a source build: find cmake, compilers, nvcc and glslc, or say what to install.

CUDA: :func:`choose_cuda_toolkit` decides between a system toolkit and NVIDIA's toolkit wheels
from the package index (:mod:`~llama_proc.provision.compile.cuda_wheels`): a system toolkit is preferred
when it can compile for the detected GPUs and the driver can run what it builds; otherwise the
newest pinned wheel toolkit the driver supports is used. The choice says why, for ``doctor``.

:func:`find_toolchain` looks for everything a backend's build needs before anything runs and
raises :class:`~llama_proc.errors.ToolNotFoundError` naming the package to install. CMake and
Ninja may come from PyPI (``pip install cmake ninja``): the running interpreter's scripts folder
is searched after ``PATH``, so a venv that is not activated still works.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from llama_proc._proc import run_with_timeout
from llama_proc.errors import ToolNotFoundError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from llama_proc.provision.host.host_info import HostInfo
    from llama_proc.provision.manifest_records import CudaToolkitSpec

__all__ = [
    "MIN_CMAKE",
    "MIN_CMAKE_CUDA",
    "Toolchain",
    "ToolkitChoice",
    "choose_cuda_toolkit",
    "compiler_info",
    "cuda_toolkit_dirs",
    "find_tool",
    "find_toolchain",
    "version_text",
]

MIN_CMAKE: Final = (3, 15)
"""``cmake --build --target a b`` (several targets) needs 3.15."""
MIN_CMAKE_CUDA: Final = (3, 18)
"""llama.cpp's CUDA backend needs CMAKE_CUDA_ARCHITECTURES support."""
TOOL_PROBE_TIMEOUT: Final = 30.0
"""Seconds for ``cmake --version``, ``nvcc --version`` and the like."""
C_COMPILERS: Final = ("cc", "gcc", "clang")
CXX_COMPILERS: Final = ("c++", "g++", "clang++")
CUDA_HOME_VARS: Final = ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "CUDAToolkit_ROOT")
CUDA_DEFAULT_DIRS: Final = ("/usr/local/cuda/bin", "/opt/cuda/bin")
_VERSION_RE: Final = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
_NVCC_VERSION_RE: Final = re.compile(r"release (\d+)\.(\d+)")
MIN_CUDA_FOR_GPU: Final = {
    89: (11, 8), 90: (11, 8), 100: (12, 8), 101: (12, 8), 120: (12, 8), 103: (12, 9),
    121: (12, 9), 110: (13, 0),
}  # fmt: skip
"""The first CUDA release that compiles for a compute capability (``86`` and older: any)."""
CUDA13_MIN_GPU: Final = 75
"""CUDA 13 dropped compute capabilities below 7.5 (Maxwell, Pascal, Volta)."""
_COMPILER_INFO_RE: Final = re.compile(r'set\(CMAKE_(?:CXX|C)_COMPILER_(ID|VERSION) "([^"]*)"\)')


@dataclass(frozen=True)
class Toolchain:
    """The build tools found on this host."""

    cmake: str
    cmake_version: tuple[int, ...]
    ninja: str | None = None
    """Ninja (on PATH or from the ``ninja`` package); None = CMake's default generator."""
    ccache: str | None = None
    c_compiler: str | None = None
    cxx_compiler: str | None = None
    nvcc: str | None = None
    nvcc_version: tuple[int, ...] | None = None
    glslc: str | None = None
    cuda_root: str | None = None
    """The CUDA toolkit root passed as ``CUDAToolkit_ROOT`` (the wheel toolkit); None = CMake finds it."""

    @property
    def generator(self) -> str | None:
        """``Ninja`` when ninja is available, else None (CMake picks)."""
        return "Ninja" if self.ninja else None


def version_text(version: Sequence[int] | None) -> str:
    """``3.28.1`` from ``(3, 28, 1)``; ``unknown`` for None or an empty version."""
    return ".".join(str(v) for v in version) if version else "unknown"


def _scripts_dirs() -> list[str]:
    """The running interpreter's scripts folder: ``pip install cmake ninja`` puts them there."""
    dirs: list[str] = []
    for candidate in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        if candidate and candidate not in dirs:
            dirs.append(candidate)
    return dirs


def find_tool(
    name: str, *, env: Mapping[str, str] | None = None, extra_dirs: Iterable[str] = ()
) -> str | None:
    """Find an executable on PATH, then in the interpreter's scripts folder, then ``extra_dirs``.

    Args:
        name: program name (``.exe`` is added on Windows by :func:`shutil.which`).
        env: environment whose ``PATH`` is searched (default: ``os.environ``).
        extra_dirs: more folders to look in, in order.
    """
    environ = os.environ if env is None else env
    found = shutil.which(name, path=environ.get("PATH", os.defpath))
    if found:
        return found
    for folder in [*_scripts_dirs(), *extra_dirs]:
        found = shutil.which(name, path=folder)
        if found:
            return found
    return None


def _probe_version(cmd: Sequence[str]) -> tuple[int, ...] | None:
    ran = run_with_timeout(cmd, TOOL_PROBE_TIMEOUT)
    if ran is None or ran.timed_out:
        return None
    if "nvcc" in Path(cmd[0]).name:
        match = _NVCC_VERSION_RE.search(ran.output)
        return (int(match.group(1)), int(match.group(2))) if match else None
    match = _VERSION_RE.search(ran.output)
    if match is None:
        return None
    return tuple(int(g) for g in match.groups() if g is not None)


def _find_cmake(env: Mapping[str, str]) -> tuple[str, tuple[int, ...]]:
    """The first cmake that is new enough: PATH first, then the interpreter's scripts."""
    candidates: list[str] = []
    on_path = shutil.which("cmake", path=env.get("PATH", os.defpath))
    if on_path:
        candidates.append(on_path)
    for folder in _scripts_dirs():
        found = shutil.which("cmake", path=folder)
        if found and found not in candidates:
            candidates.append(found)
    too_old: list[str] = []
    for cmake in candidates:
        version = _probe_version([cmake, "--version"])
        if version is not None and version >= MIN_CMAKE:
            return cmake, version
        too_old.append(f"{cmake} ({version_text(version)})")
    if too_old:
        msg = (
            f"cmake >= {version_text(MIN_CMAKE)} is needed to build llama-server; found only "
            f"{', '.join(too_old)}: run `pip install -U cmake ninja`"
        )
    else:
        msg = (
            "cmake is needed to build llama-server and was not found on PATH: run "
            "`pip install cmake ninja` (or `pip install 'llama-proc[build]'`)"
        )
    raise ToolNotFoundError(msg)


def _find_compiler(env: Mapping[str, str], var: str, names: Sequence[str]) -> str | None:
    explicit = env.get(var, "").strip()
    if explicit:
        first = shlex.split(explicit)[0] if explicit else ""
        return find_tool(first, env=env) or (first if Path(first).is_file() else None)
    for name in names:
        found = shutil.which(name, path=env.get("PATH", os.defpath))
        if found:
            return found
    return None


def _find_nvcc(env: Mapping[str, str]) -> str | None:
    explicit = env.get("CUDACXX", "").strip()
    if explicit and Path(explicit).is_file():
        return explicit
    homes = [str(Path(env[v]) / "bin") for v in CUDA_HOME_VARS if env.get(v)]
    return find_tool("nvcc", env=env, extra_dirs=[*homes, *CUDA_DEFAULT_DIRS])


_NVCC_DIRS_RE: Final = re.compile(r"^#\$ (INCLUDES|LIBRARIES)=(.*)$", re.MULTILINE)


def cuda_toolkit_dirs(nvcc: str) -> tuple[list[Path], list[Path]]:
    """The (include, library) folders of the toolkit an ``nvcc`` belongs to.

    Asked of nvcc itself (``-v --dryrun`` prints the ``INCLUDES`` and ``LIBRARIES`` it would
    pass on), as CMake's ``FindCUDAToolkit`` does, so a wrapper script on ``PATH`` or a
    ``targets/<triple>`` layout is followed; the folders beside ``bin/`` are added in case.
    """
    root = Path(nvcc).resolve().parent.parent
    includes = [root / "include"]
    libs = [root / "lib64", root / "lib"]
    ran = run_with_timeout(
        [nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
        TOOL_PROBE_TIMEOUT,
    )
    if ran is not None and not ran.timed_out:
        for kind, value in _NVCC_DIRS_RE.findall(ran.output):
            try:
                words = shlex.split(value)
            except ValueError:
                continue
            for word in words:
                folder = Path(os.path.normpath(word[2:]))  # "bin/../lib64" names "lib64"
                if kind == "INCLUDES" and word.startswith("-I"):
                    includes.insert(0, folder)
                elif kind == "LIBRARIES" and word.startswith("-L") and folder.name != "stubs":
                    libs.insert(0, folder)
    return list(dict.fromkeys(includes)), list(dict.fromkeys(libs))


def _missing_cublas(nvcc: str) -> str | None:
    """What of cuBLAS (which llama.cpp's CUDA backend links) the toolkit of ``nvcc`` lacks."""
    includes, libs = cuda_toolkit_dirs(nvcc)
    if not any((folder / "cublas_v2.h").is_file() for folder in includes):
        return "it has no cuBLAS headers (cublas_v2.h), which llama.cpp needs"
    names = ("libcublas.so*", "cublas.lib", "libcublas.dylib")
    if not any(any(folder.glob(name)) for folder in libs for name in names):
        return "it has no cuBLAS library (libcublas), which llama.cpp needs"
    return None


def _find_glslc(env: Mapping[str, str]) -> str | None:
    sdk = env.get("VULKAN_SDK")
    extra = [str(Path(sdk) / "bin"), str(Path(sdk) / "Bin")] if sdk else []
    return find_tool("glslc", env=env, extra_dirs=extra)


CudaSource = Literal["system", "wheels", "none"]


@dataclass(frozen=True)
class ToolkitChoice:
    """Which CUDA toolkit a build uses, and why (``doctor`` prints :meth:`as_dict`)."""

    source: CudaSource
    """``system`` (an installed toolkit), ``wheels`` (the package index) or ``none``."""
    reason: str
    """One line: why this toolkit (or, for ``none``, what to install)."""
    nvcc: str | None = None
    """The system toolkit's nvcc (None for the wheels: they are laid out on first use)."""
    version: tuple[int, ...] | None = None
    """The toolkit's CUDA version."""
    spec: CudaToolkitSpec | None = None
    """The pinned wheels (source ``wheels``)."""

    def as_dict(self) -> dict[str, Any]:
        """``{"source", "version", "nvcc", "reason"}``: a data field for ``doctor``/JSON output."""
        return {
            "source": self.source,
            "version": version_text(self.version) if self.version else None,
            "nvcc": self.nvcc,
            "reason": self.reason,
        }


def _gpu_arches(host: HostInfo | None) -> list[int]:
    arches: list[int] = []
    for cap in host.compute_capabilities if host is not None else ():
        match = _VERSION_RE.match(cap)
        if match:
            arches.append(int(match.group(1)) * 10 + int(match.group(2)))
    return arches


def _toolkit_problem(
    version: Sequence[int], driver: tuple[int, ...] | None, arches: Sequence[int]
) -> str | None:
    """Why a CUDA ``version`` toolkit cannot serve this host, or None when it can."""
    if driver is not None and version[0] > driver[0]:
        return (
            f"it is CUDA {version_text(version)} and the driver supports only CUDA "
            f"{version_text(driver)}, so what it builds would not start"
        )
    for arch in arches:
        need = MIN_CUDA_FOR_GPU.get(arch)
        if need is not None and tuple(version[:2]) < need:
            return (
                f"CUDA {version_text(version)} cannot compile for compute capability "
                f"{arch / 10:.1f} (needs CUDA {version_text(need)})"
            )
        if version[0] >= 13 and arch < CUDA13_MIN_GPU:
            return f"CUDA {version_text(version)} no longer compiles for compute capability {arch / 10:.1f}"
    return None


def choose_cuda_toolkit(
    host: HostInfo | None,
    toolkits: Sequence[CudaToolkitSpec],
    *,
    os_name: str,
    arch: str,
    env: Mapping[str, str] | None = None,
) -> ToolkitChoice:
    """Pick the CUDA toolkit of a build: the system's when it fits, else the package index's.

    A system toolkit (``CUDACXX``, ``CUDA_HOME``..., ``PATH``, ``/usr/local/cuda``) fits when
    the driver supports its major version and it compiles for every detected GPU. Otherwise the
    newest pinned wheel toolkit (``toolkits``, the manifest's ``[[cuda_toolkit]]`` tables) that
    fits is chosen. Without a driver (a build for other machines) any toolkit fits.

    Args:
        host: the detected host (driver CUDA version, compute capabilities); None = unknown.
        toolkits: the pinned wheel toolkits.
        os_name: the build's OS.
        arch: the build's architecture.
        env: environment to search (default: ``os.environ``).

    Returns:
        The choice; ``source == "none"`` when nothing fits (``reason`` says what to install).
    """
    environ = dict(os.environ if env is None else env)
    driver_match = _VERSION_RE.match(host.cuda_version or "") if host is not None else None
    driver = (int(driver_match.group(1)), int(driver_match.group(2))) if driver_match else None
    arches = _gpu_arches(host)
    nvcc = _find_nvcc(environ)
    not_system = "no system CUDA toolkit (nvcc) was found"
    if nvcc is not None:
        version = _probe_version([nvcc, "--version"])
        problem = "its version cannot be read" if version is None else None
        problem = problem or _toolkit_problem(version or (), driver, arches)
        problem = problem or _missing_cublas(nvcc)
        if problem is None:
            fits = f"driver CUDA {version_text(driver)}" if driver else "no driver to check against"
            return ToolkitChoice(
                "system",
                f"system toolkit {nvcc} (CUDA {version_text(version)}; {fits})",
                nvcc,
                version,
            )
        not_system = f"the system toolkit {nvcc} is not used: {problem}"
    candidates = sorted(
        (t for t in toolkits if t.os == os_name and t.arch == arch),
        key=lambda t: t.cuda_version,
        reverse=True,
    )
    refusals: list[str] = []
    for spec in candidates:
        problem = _toolkit_problem(spec.cuda_version, driver, arches)
        if problem is None:
            return ToolkitChoice(
                "wheels",
                f"CUDA {spec.cuda} toolkit from the package index ({not_system})",
                None,
                spec.cuda_version,
                spec,
            )
        refusals.append(f"the package index's CUDA {spec.cuda} toolkit: {problem}")
    if not candidates:
        refusals.append(f"the package index has no CUDA toolkit for {os_name}-{arch}")
    driver_hint = (
        " or update the NVIDIA driver to one for CUDA 13 (580 or newer)"
        if driver is not None and driver[0] < 13 and candidates
        else ""
    )
    return ToolkitChoice(
        "none",
        f"{not_system}; {'; '.join(refusals)}: install a CUDA toolkit with cuBLAS (e.g. "
        f"`apt install cuda-toolkit-12-8`) and set CUDA_HOME{driver_hint}",
    )


def find_toolchain(
    backend: str,
    os_name: str,
    *,
    env: Mapping[str, str] | None = None,
    cuda_root: Path | None = None,
) -> Toolchain:
    """Find the tools a build of ``backend`` needs, or say exactly what to install.

    Args:
        backend: the variant's backend (cpu, cuda, metal, vulkan, rpc).
        os_name: ``linux``, ``macos`` or ``windows``.
        env: environment to search (default: ``os.environ``).
        cuda_root: a CUDA toolkit root to use (the wheel toolkit,
            :func:`~llama_proc.provision.compile.cuda_wheels.ensure_cuda_toolkit`) instead of searching.

    Raises:
        ToolNotFoundError: cmake missing or too old, no C/C++ compiler, no nvcc for CUDA,
            no glslc for Vulkan, or Metal requested off macOS.
    """
    environ = dict(os.environ if env is None else env)
    if backend == "metal" and os_name != "macos":
        msg = "Metal builds need macOS (Apple's Metal framework); build the cpu or vulkan variant"
        raise ToolNotFoundError(msg)
    cmake, cmake_version = _find_cmake(environ)
    cc = cxx = None
    if os_name != "windows":  # CMake finds Visual Studio itself; cl.exe need not be on PATH
        cc = _find_compiler(environ, "CC", C_COMPILERS)
        cxx = _find_compiler(environ, "CXX", CXX_COMPILERS)
        if cc is None or cxx is None:
            missing = "C" if cc is None else "C++"
            install = (
                "run `xcode-select --install`"
                if os_name == "macos"
                else "install build-essential (Debian/Ubuntu) or gcc-c++ (Fedora/RHEL)"
            )
            msg = (
                f"no {missing} compiler found (looked for CC/CXX, "
                f"{', '.join(C_COMPILERS if cc is None else CXX_COMPILERS)} on PATH): {install}"
            )
            raise ToolNotFoundError(msg)
    nvcc = nvcc_version = glslc = None
    if backend == "cuda":
        if cmake_version < MIN_CMAKE_CUDA:
            msg = (
                f"CUDA builds need cmake >= {version_text(MIN_CMAKE_CUDA)}; {cmake} is "
                f"{version_text(cmake_version)}: run `pip install -U cmake ninja`"
            )
            raise ToolNotFoundError(msg)
        nvcc = str(cuda_root / "bin" / "nvcc") if cuda_root is not None else _find_nvcc(environ)
        if nvcc is None or not Path(nvcc).is_file():
            msg = (
                "CUDA builds need nvcc from the CUDA toolkit and none was found (PATH, CUDACXX, "
                "CUDA_HOME, /usr/local/cuda): install the toolkit (with cuBLAS), e.g. "
                "`apt install cuda-toolkit-12-8`, or set CUDA_HOME"
            )
            raise ToolNotFoundError(msg)
        nvcc_version = _probe_version([nvcc, "--version"])
    if backend == "vulkan":
        glslc = _find_glslc(environ)
        if glslc is None:
            msg = (
                "Vulkan builds need the glslc shader compiler and Vulkan headers: install the "
                "Vulkan SDK (set VULKAN_SDK) or `apt install glslc libvulkan-dev`"
            )
            raise ToolNotFoundError(msg)
    ninja = find_tool("ninja", env=environ)
    ccache = find_tool("ccache", env=environ) or find_tool("sccache", env=environ)
    return Toolchain(
        cmake=cmake,
        cmake_version=cmake_version,
        ninja=ninja,
        ccache=ccache,
        c_compiler=cc,
        cxx_compiler=cxx,
        nvcc=nvcc,
        nvcc_version=nvcc_version,
        glslc=glslc,
        cuda_root=str(cuda_root) if cuda_root is not None and backend == "cuda" else None,
    )


def compiler_info(build_dir: Path, toolchain: Toolchain) -> dict[str, str]:
    """The compiler a build used: id and version from CMake's own detection in ``build_dir``.

    Falls back to the first line of ``<c++> --version``, then to ``unknown``.
    """
    for name in ("CMakeCXXCompiler.cmake", "CMakeCCompiler.cmake"):
        for path in sorted(build_dir.glob(f"CMakeFiles/*/{name}")):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            found = {m.group(1): m.group(2) for m in _COMPILER_INFO_RE.finditer(text)}
            if found.get("ID"):
                return {"id": found["ID"], "version": found.get("VERSION", "")}
    compiler = toolchain.cxx_compiler or toolchain.c_compiler
    if compiler:
        ran = run_with_timeout([compiler, "--version"], TOOL_PROBE_TIMEOUT)
        if ran is not None and not ran.timed_out:
            first = ran.output.strip().splitlines()
            return {"id": Path(compiler).name, "version": first[0] if first else ""}
    return {"id": "unknown", "version": ""}
