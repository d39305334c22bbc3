"""Build llama-server from llama.cpp source with CMake, into a verified cache install.

:func:`build_variant` gets a source tree (:func:`~llama_proc.provision.sources.obtain_source`),
then lets :func:`~llama_proc.provision.cache.install_atomically` call :func:`build_into`, which
configures and builds only the variant's targets in a persistent build folder
``cache_dir/build/<key>`` and copies the whole ``bin/`` folder (binaries, shared libraries,
symlink chains) into the install. The key hashes the source identity, the generator and the
configure flags, not the targets, so the rpc variant reuses the cpu variant's objects and a
rebuild of the same inputs is incremental. A second :func:`build_variant` of the same inputs
is a pure cache hit: the install is found before any tool is even looked for.

Every command goes through one :class:`Run` helper: it logs the command, appends all output to
``cache_dir/build/<key>/build.log`` (kept), drives a progress bar from Ninja's ``[n/m]`` and
make's ``[ nn%]`` lines, and on failure raises :class:`~llama_proc.errors.BuildError` with the
log tail and a diagnosed likely cause (:func:`diagnose`). Missing tools are reported before
anything starts (:class:`~llama_proc.errors.ToolNotFoundError`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import (
    BuildError,
    CacheLockTimeoutError,
    ConfigError,
    ProvisionError,
    ToolNotFoundError,
)
from llama_proc.provision.platform import host_os

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

    from llama_proc.config import Settings
    from llama_proc.provision.cache import Install
    from llama_proc.provision.manifest import Manifest, Variant
    from llama_proc.provision.platform import HostInfo
    from llama_proc.provision.sources import SourceTree

__all__ = [
    "BUILD_SOURCE",
    "BuildPlan",
    "BuildResult",
    "Run",
    "Toolchain",
    "build_into",
    "build_key",
    "build_variant",
    "compose_cmake_flags",
    "copy_outputs",
    "defined_targets",
    "diagnose",
    "find_tool",
    "find_toolchain",
    "install_flavor",
    "parse_progress",
    "plan_build",
    "resolve_cuda_arch",
    "resolve_targets",
    "run_build",
    "validate_cmake_args",
]

logger = logging.getLogger(__name__)

BUILD_SOURCE: Final = "built"
"""``Install.source`` of a source build."""
BUILD_DIR: Final = "build"
"""Folder under the cache root holding the persistent CMake build folders."""
LOG_NAME: Final = "build.log"
CONFIGURED_MARKER: Final = "llama-proc-configure.json"
"""Written after a successful configure; a matching one lets a rebuild skip configuring."""
KEY_LENGTH: Final = 16
FLAVOR_LENGTH: Final = 10
MIN_CMAKE: Final = (3, 15)
"""``cmake --build --target a b`` (several targets) needs 3.15."""
MIN_CMAKE_CUDA: Final = (3, 18)
"""llama.cpp's CUDA backend needs CMAKE_CUDA_ARCHITECTURES support."""
MIN_CMAKE_CUDA_NATIVE: Final = (3, 24)
MIN_NVCC_NATIVE: Final = (11, 6)
"""CMake's ``native`` CUDA architecture needs nvcc's ``-arch=native`` (CUDA 11.6)."""
TOOL_PROBE_TIMEOUT: Final = 30.0
"""Seconds for ``cmake --version``, ``nvcc --version`` and the like."""
STOP_GRACE: Final = 10.0
"""Seconds an interrupted build gets to stop its compilers before they are killed."""
MAX_HINTS: Final = 2
LOG_TAIL_LINES: Final = 40
MAX_KEPT_LINES: Final = 20000
"""Output lines of one command kept in memory for the diagnosis (all of it goes to the log)."""
DEFAULT_CONFIG: Final = "Release"
NINJA_STATUS: Final = "[%f/%t] "
RPATH: Final = {"linux": "$ORIGIN", "macos": "@loader_path"}
"""Where the binaries look for their shared libraries: their own folder (none on Windows)."""
C_COMPILERS: Final = ("cc", "gcc", "clang")
CXX_COMPILERS: Final = ("c++", "g++", "clang++")
CUDA_HOME_VARS: Final = ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "CUDAToolkit_ROOT")
CUDA_DEFAULT_DIRS: Final = ("/usr/local/cuda/bin", "/opt/cuda/bin")
_VOLATILE_FLAGS: Final = re.compile(
    r"^-D(CMAKE_[A-Z]+_COMPILER_LAUNCHER|CMAKE_MAKE_PROGRAM|LLAMA_USE_PREBUILT_UI)(:[A-Z]+)?="
)
"""Flags kept out of the build key: changing them reconfigures the same folder."""
_CMAKE_ARG_RE: Final = re.compile(r"^-D[A-Za-z_][A-Za-z0-9_.+-]*(:[A-Za-z]+)?=")
_CUDA_ARCH_ITEM_RE: Final = re.compile(r"^([0-9]+[af]?(-real|-virtual)?|all|all-major|native)$")
_NINJA_RE: Final = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_RE: Final = re.compile(r"^\[\s*(\d+)%\]")
_VERSION_RE: Final = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
_TARGET_RE: Final = re.compile(
    r"(?:set\s*\(\s*TARGET|add_executable\s*\(|add_library\s*\()\s*([A-Za-z0-9_.+-]+)",
    re.IGNORECASE,
)
_TARGET_SCAN_DIRS: Final = ("tools", "examples")
_TARGET_SCAN_DEPTH: Final = 3
_COMPILER_INFO_RE: Final = re.compile(r'set\(CMAKE_(?:CXX|C)_COMPILER_(ID|VERSION) "([^"]*)"\)')


# --------------------------------------------------------------------------- tools


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

    @property
    def generator(self) -> str | None:
        """``Ninja`` when ninja is available, else None (CMake picks)."""
        return "Ninja" if self.ninja else None


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
    try:
        done = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=TOOL_PROBE_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = done.stdout + done.stderr
    if "nvcc" in Path(cmd[0]).name:
        match = re.search(r"release (\d+)\.(\d+)", text)
        return (int(match.group(1)), int(match.group(2))) if match else None
    match = _VERSION_RE.search(text)
    if match is None:
        return None
    return tuple(int(g) for g in match.groups() if g is not None)


def _version_text(version: Sequence[int] | None) -> str:
    return ".".join(str(v) for v in version) if version else "unknown"


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
        too_old.append(f"{cmake} ({_version_text(version)})")
    if too_old:
        msg = (
            f"cmake >= {_version_text(MIN_CMAKE)} is needed to build llama-server; found only "
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


def _find_glslc(env: Mapping[str, str]) -> str | None:
    sdk = env.get("VULKAN_SDK")
    extra = [str(Path(sdk) / "bin"), str(Path(sdk) / "Bin")] if sdk else []
    return find_tool("glslc", env=env, extra_dirs=extra)


def find_toolchain(
    backend: str, os_name: str, *, env: Mapping[str, str] | None = None
) -> Toolchain:
    """Find the tools a build of ``backend`` needs, or say exactly what to install.

    Args:
        backend: the variant's backend (cpu, cuda, metal, vulkan, rpc).
        os_name: ``linux``, ``macos`` or ``windows``.
        env: environment to search (default: ``os.environ``).

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
                f"CUDA builds need cmake >= {_version_text(MIN_CMAKE_CUDA)}; {cmake} is "
                f"{_version_text(cmake_version)}: run `pip install -U cmake ninja`"
            )
            raise ToolNotFoundError(msg)
        nvcc = _find_nvcc(environ)
        if nvcc is None:
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
    )


# --------------------------------------------------------------------------- flags


def validate_cmake_args(cmake_args: Iterable[str]) -> list[str]:
    """Check user CMake arguments: each must be a ``-DNAME=VALUE`` definition.

    Raises:
        ConfigError: an argument is not a ``-D`` definition.
    """
    out: list[str] = []
    for arg in cmake_args:
        if not _CMAKE_ARG_RE.match(arg):
            msg = (
                f"CMake argument {arg!r} is not a -DNAME=VALUE definition; only -D definitions "
                "are passed through (write --cmake-arg=-DNAME=VALUE)"
            )
            raise ConfigError(msg)
        out.append(arg)
    return out


def _normalize_cuda_arch(value: str) -> str:
    items = [i.strip() for i in re.split(r"[;, ]+", value.strip()) if i.strip()]
    normalized: list[str] = []
    for item in items:
        dotted = re.fullmatch(r"(\d+)\.(\d+)", item)
        text = f"{dotted.group(1)}{dotted.group(2)}" if dotted else item.lower()
        if not _CUDA_ARCH_ITEM_RE.match(text):
            msg = (
                f"CUDA architecture {item!r} is invalid; use a list like 86;90 (also 8.6,9.0, "
                "90-real, native, all-major)"
            )
            raise ConfigError(msg)
        if text not in normalized:
            normalized.append(text)
    if not normalized:
        msg = f"CUDA architecture list {value!r} is empty"
        raise ConfigError(msg)
    return ";".join(normalized)


def resolve_cuda_arch(
    requested: str | None,
    *,
    compute_capabilities: Sequence[str] = (),
    nvcc_version: Sequence[int] | None = None,
    cmake_version: Sequence[int] = MIN_CMAKE_CUDA_NATIVE,
    portable: bool = False,
) -> str | None:
    """The ``CMAKE_CUDA_ARCHITECTURES`` value to pass, or None to leave llama.cpp's default.

    An explicit list is normalized (``8.6,9.0`` -> ``86;90``). Without one, a portable build
    keeps llama.cpp's own broad list; a native build targets the GPUs found on this host
    (``9.0`` -> ``90``), else CMake's ``native`` when nvcc (>= 11.6) and CMake (>= 3.24) support
    it. An explicit ``native`` is kept when supported and otherwise replaced by the detected GPUs.

    Raises:
        ConfigError: the list is malformed, or no architecture can be chosen.
    """
    caps = [_normalize_cuda_arch(c) for c in compute_capabilities if c]
    detected = ";".join(dict.fromkeys(caps))
    native_ok = (
        nvcc_version is not None
        and tuple(nvcc_version) >= MIN_NVCC_NATIVE
        and tuple(cmake_version) >= MIN_CMAKE_CUDA_NATIVE
    )
    if requested and requested.strip().lower() != "native":
        return _normalize_cuda_arch(requested)
    if requested is None or not requested.strip():
        if portable:
            return None
        if detected:
            return detected
    elif native_ok:
        return "native"
    elif detected:
        return detected
    if native_ok:
        return "native"
    msg = (
        f"cannot target 'native' CUDA architectures: nvcc {_version_text(nvcc_version)} / cmake "
        f"{_version_text(cmake_version)} do not support it (needs nvcc >= 11.6, cmake >= 3.24) "
        "and no GPU compute capability was detected; pass --cuda-arch, e.g. 86;90 "
        "(LLAMA_PROC_CUDA_ARCH)"
    )
    raise ConfigError(msg)


def compose_cmake_flags(
    variant: Variant,
    base_flags: Sequence[str],
    *,
    os_name: str,
    portable: bool = False,
    build_number: int | None = None,
    commit: str = "",
    cuda_arch: str | None = None,
    cuda_compiler: str | None = None,
    launcher: str | None = None,
    make_program: str | None = None,
    cmake_args: Sequence[str] = (),
) -> list[str]:
    """All ``-D`` flags of a configure, in order (a later definition of a name wins in CMake).

    Order: the manifest's ``[build] cmake_flags``, the variant's (portable) flags, the rpath
    flags (``$ORIGIN`` / ``@loader_path``; none on Windows, where DLLs load from the exe's
    folder), the build number and commit (so ``llama-server --version`` is truthful), the CUDA
    architectures and compiler, the compiler launcher (ccache), the make program (Ninja's full
    path, so the ``ninja`` package of a venv that is not activated works), then the user's own
    arguments. The manifest's flags turn ``LLAMA_USE_PREBUILT_UI`` off: llama.cpp otherwise
    fetches the "latest" web UI during configure, unpinned bytes in a pinned build.
    """
    flags = [*base_flags, *(variant.portable_cmake_flags if portable else variant.cmake_flags)]
    rpath = RPATH.get(os_name)
    if rpath is not None:
        flags += [f"-DCMAKE_INSTALL_RPATH={rpath}", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON"]
    if build_number is not None:
        flags.append(f"-DLLAMA_BUILD_NUMBER={build_number}")
    if commit:
        flags.append(f"-DLLAMA_BUILD_COMMIT={commit}")
    is_cuda = _is_cuda(variant, flags)
    if is_cuda and cuda_arch:
        flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
    if is_cuda and cuda_compiler:
        flags.append(f"-DCMAKE_CUDA_COMPILER={cuda_compiler}")
    if launcher:
        languages = ("C", "CXX", "CUDA") if is_cuda else ("C", "CXX")
        flags += [f"-DCMAKE_{lang}_COMPILER_LAUNCHER={launcher}" for lang in languages]
    if make_program:
        flags.append(f"-DCMAKE_MAKE_PROGRAM={make_program}")
    flags += list(cmake_args)
    return flags


def _is_cuda(variant: Variant, flags: Sequence[str]) -> bool:
    return variant.backend == "cuda" or any(f.upper() == "-DGGML_CUDA=ON" for f in flags)


def _flag_value(flags: Sequence[str], name: str) -> str | None:
    value = None
    for flag in flags:
        head, sep, rest = flag.partition("=")
        if sep and head.split(":", 1)[0] == f"-D{name}":
            value = rest
    return value


def build_key(identity: str, generator: str | None, flags: Sequence[str]) -> str:
    """The persistent build folder's name: a hash of what changes the build's outputs.

    Targets are not part of it (variants that differ only in targets share one folder), nor is
    the compiler launcher.
    """
    stable = [f for f in flags if not _VOLATILE_FLAGS.match(f)]
    text = json.dumps([identity, generator or "default", stable])
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def install_flavor(
    source: SourceTree,
    variant: Variant,
    *,
    portable: bool = False,
    cuda_arch: str | None = None,
    cmake_args: Sequence[str] = (),
    fingerprint: str = "",
) -> str:
    """The install folder suffix: empty for the default build of the pinned source.

    Anything else (a local tree, another archive, portable flags, explicit CUDA architectures,
    extra CMake arguments) gets its own folder ``<variant>+src-<hash>``; it is computed from the
    requested inputs alone, so a cache hit needs no build tools.
    """
    if source.pinned and not portable and not cuda_arch and not cmake_args:
        return ""
    text = json.dumps(
        [
            source.identity,
            fingerprint,
            source.build,
            variant.id,
            portable,
            cuda_arch or "",
            list(cmake_args),
            list(variant.portable_cmake_flags if portable else variant.cmake_flags),
        ]
    )
    return "src-" + hashlib.sha256(text.encode()).hexdigest()[:FLAVOR_LENGTH]


# --------------------------------------------------------------------------- targets


def defined_targets(tree: Path) -> set[str]:
    """Target names the tree's CMake files define (``set(TARGET x)``, ``add_executable(x``).

    Looks at the top-level ``CMakeLists.txt`` and those under ``tools/`` and ``examples/``.
    """
    files = [tree / "CMakeLists.txt"]
    for sub in _TARGET_SCAN_DIRS:
        base = tree / sub
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            if len(Path(dirpath).relative_to(base).parts) >= _TARGET_SCAN_DEPTH:
                dirnames[:] = []
            if "CMakeLists.txt" in filenames:
                files.append(Path(dirpath) / "CMakeLists.txt")
    names: set[str] = set()
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        names.update(m.group(1) for m in _TARGET_RE.finditer(text) if "$" not in m.group(1))
    return names


def resolve_targets(specs: Sequence[str], available: Collection[str]) -> list[str]:
    """Pick one name per target spec: ``a|b`` becomes whichever the tree defines (``a`` first).

    A single name is kept even when the scan did not see it (it may be defined indirectly);
    CMake then reports it if it really is missing.

    Raises:
        ProvisionError: none of the alternatives of an ``a|b`` spec is defined.
    """
    from llama_proc.provision.manifest import split_alternatives

    out: list[str] = []
    for spec in specs:
        alternatives = list(split_alternatives(spec))
        chosen = next((a for a in alternatives if a in available), None)
        if chosen is None:
            if len(alternatives) > 1:
                msg = (
                    f"the source tree defines none of the targets {', '.join(alternatives)}; "
                    "it may be too old or too new for this llama-proc"
                )
                raise ProvisionError(msg)
            chosen = alternatives[0]
        if chosen not in out:
            out.append(chosen)
    return out


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build will do, decided before anything runs."""

    source: SourceTree
    variant_id: str
    build_dir: Path
    key: str
    toolchain: Toolchain
    flags: tuple[str, ...]
    targets: tuple[str, ...]
    jobs: int
    config: str = DEFAULT_CONFIG
    cuda_arch: str | None = None
    portable: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for the build commands."""

    @property
    def log_path(self) -> Path:
        """``build.log`` in the build folder (appended to by every run, kept)."""
        return self.build_dir / LOG_NAME

    @property
    def generator(self) -> str | None:
        """The CMake generator (None = CMake's default)."""
        return self.toolchain.generator

    def configure_command(self) -> list[str]:
        """``cmake -S <tree> -B <build> [-G Ninja] -D...``."""
        cmd = [self.toolchain.cmake, "-S", str(self.source.path), "-B", str(self.build_dir)]
        if self.toolchain.generator:
            cmd += ["-G", self.toolchain.generator]
        return [*cmd, *self.flags]

    def build_command(self) -> list[str]:
        """``cmake --build <build> --config Release --parallel N --target <targets>``."""
        return [
            self.toolchain.cmake,
            "--build",
            str(self.build_dir),
            "--config",
            self.config,
            "--parallel",
            str(self.jobs),
            "--target",
            *self.targets,
        ]


def _detect(host: HostInfo | None) -> HostInfo | None:
    if host is not None:
        return host
    try:
        from llama_proc.provision.platform import detect_host

        return detect_host()
    except Exception as err:  # noqa: BLE001 - detection must never break a build
        logger.debug("host detection failed: %s", err)
        return None


def plan_build(
    variant: Variant,
    source: SourceTree,
    settings: Settings,
    *,
    manifest: Manifest,
    os_name: str | None = None,
    host: HostInfo | None = None,
    cuda_arch: str | None = None,
    jobs: int | None = None,
    cmake_args: Sequence[str] = (),
    portable: bool = False,
    toolchain: Toolchain | None = None,
) -> BuildPlan:
    """Decide the tools, flags, targets and build folder of a build.

    Args:
        variant: what to build (flags, targets).
        source: the llama.cpp tree.
        settings: cache root, jobs and CUDA architecture defaults.
        manifest: ``[build] cmake_flags``.
        os_name: target OS (default: this host's).
        host: detected host (compute capabilities for CUDA); detected when needed.
        cuda_arch: CUDA architectures (default: ``settings.cuda_arch``, else the GPUs found).
        jobs: parallel jobs (default: ``settings.jobs``, else the CPU count).
        cmake_args: extra ``-DNAME=VALUE`` arguments, passed last.
        portable: use the variant's portable flags (for machines other than this one).
        toolchain: the tools to use (default: :func:`find_toolchain`).

    Raises:
        ToolNotFoundError: a needed tool is missing.
        ConfigError: bad CMake arguments or CUDA architectures.
        ProvisionError: the variant is for another OS, or its targets are not in the tree.
    """
    os_name = os_name or host_os()
    if variant.os != os_name:
        msg = (
            f"variant {variant.id} is for {variant.os}; this host is {os_name} and "
            "cross-compiling is not supported"
        )
        raise ProvisionError(msg)
    user_args = validate_cmake_args(cmake_args)
    tools = toolchain or find_toolchain(variant.backend, os_name)
    variant_flags = variant.portable_cmake_flags if portable else variant.cmake_flags
    arch: str | None = None
    if _is_cuda(variant, [*manifest.cmake_flags, *variant_flags]):
        found = None if portable else _detect(host)
        arch = resolve_cuda_arch(
            cuda_arch or settings.cuda_arch,
            compute_capabilities=found.compute_capabilities if found else (),
            nvcc_version=tools.nvcc_version,
            cmake_version=tools.cmake_version,
            portable=portable,
        )
        if arch == "native" and found is not None and found.nvidia_driver is None:
            # CMake would only find out after a minute of configuring.
            msg = (
                "no NVIDIA GPU is visible on this host, so there is no 'native' CUDA "
                "architecture to build for: pass --cuda-arch with the target GPUs' compute "
                "capability (e.g. 86;90, LLAMA_PROC_CUDA_ARCH) or --portable"
            )
            raise ConfigError(msg)
    flags = compose_cmake_flags(
        variant,
        manifest.cmake_flags,
        os_name=os_name,
        portable=portable,
        build_number=source.build_number,
        commit=source.commit,
        cuda_arch=arch,
        cuda_compiler=tools.nvcc,
        launcher=tools.ccache,
        make_program=tools.ninja,
        cmake_args=user_args,
    )
    targets = resolve_targets(variant.targets, defined_targets(source.path))
    key = build_key(source.identity or f"local:{source.path}", tools.generator, flags)
    config = _flag_value(flags, "CMAKE_BUILD_TYPE") or DEFAULT_CONFIG
    return BuildPlan(
        source=source,
        variant_id=variant.id,
        build_dir=settings.cache_dir / BUILD_DIR / key,
        key=key,
        toolchain=tools,
        flags=tuple(flags),
        targets=tuple(targets),
        jobs=jobs or settings.jobs or os.cpu_count() or 1,
        config=config,
        cuda_arch=arch,
        portable=portable,
        env={"NINJA_STATUS": NINJA_STATUS},
    )


# --------------------------------------------------------------------------- running


def parse_progress(line: str) -> tuple[int, int] | None:
    """``(done, total)`` from a Ninja ``[12/220]`` or make ``[ 45%]`` line, else None."""
    match = _NINJA_RE.match(line)
    if match:
        return int(match.group(1)), int(match.group(2))
    match = _MAKE_RE.match(line)
    if match:
        return int(match.group(1)), 100
    return None


# Most specific first: a failing Vulkan or CUDA log mentions its tools on every line.
_DIAGNOSES: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(pattern, re.IGNORECASE), hint)
    for pattern, hint in (
        (
            (
                r"Killed signal terminated program|internal compiler error: Killed|virtual memory "
                r"exhausted|out of memory|cannot allocate memory|std::bad_alloc"
            ),
            (
                "the compiler ran out of memory: build with fewer parallel jobs (--jobs 1 or "
                "LLAMA_PROC_JOBS=1)"
            ),
        ),
        (
            r"No space left on device",
            "the disk is full: free space or point LLAMA_PROC_CACHE_DIR at a bigger disk",
        ),
        (
            (
                r"No CMAKE_(C|CXX)_COMPILER could be found|is not a full path to an existing "
                r"compiler tool|CMAKE_(C|CXX)_COMPILER not set|is not able to compile "
                r"a simple test program"
            ),
            (
                "no working C/C++ compiler: install build-essential (Debian/Ubuntu), gcc-c++ "
                "(Fedora), the Xcode command line tools (`xcode-select --install`) or Visual Studio "
                "Build Tools, or point CC/CXX at one"
            ),
        ),
        (
            (
                r"CMake (\d+\.\d+[.\d]*) or higher is required|Compatibility with CMake < [\d.]+ has "
                r"been removed"
            ),
            "cmake is too old (or too new) for this source tree: run `pip install -U cmake ninja`",
        ),
        (
            r"unsupported GNU version|unsupported clang version|-allow-unsupported-compiler",
            (
                "the host C++ compiler is newer than this nvcc supports: install an older gcc and "
                "pass --cmake-arg=-DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++-12, or a newer CUDA toolkit"
            ),
        ),
        (
            (
                r"cannot find -lcublas|cublas_v2\.h: No such file|CUDA::cublas|"
                r"Could NOT find CUDAToolkit.*cublas"
            ),
            (
                "cuBLAS is missing from the CUDA toolkit: install the full toolkit "
                "(e.g. `apt install cuda-toolkit-12-8` or libcublas-dev)"
            ),
        ),
        (
            (
                r"but no GPU was detected|CUDA_ARCHITECTURES.*native.*(no|not) |No CUDA devices "
                r"found|Unsupported gpu architecture"
            ),
            (
                "CUDA architecture problem: no GPU visible at build time, or nvcc does not know "
                "this GPU; pass --cuda-arch with the GPU's compute capability (e.g. 86 or 90)"
            ),
        ),
        (
            (
                r"No CMAKE_CUDA_COMPILER could be found|Failed to find nvcc|Could not find nvcc|"
                r"CUDA Toolkit not found|CUDAToolkit_FOUND.*FALSE|Could NOT find CUDAToolkit"
            ),
            (
                "nvcc / the CUDA toolkit was not found: install it (with cuBLAS) and put nvcc on "
                "PATH or set CUDA_HOME"
            ),
        ),
        (
            (
                r"Could NOT find Vulkan|Could not find glslc|glslc: (command )?not found|"
                r"vulkan/vulkan\.h: No such file|Vulkan_INCLUDE_DIR.*NOTFOUND"
            ),
            (
                "the Vulkan SDK is missing or incomplete: install it (set VULKAN_SDK) or "
                "`apt install libvulkan-dev glslc`"
            ),
        ),
        (
            (
                r"Metal\.framework|framework not found Metal|Metal/Metal\.h|GGML_METAL.*(Apple|"
                r"macOS)|Foundation/Foundation\.h"
            ),
            (
                "Metal builds need macOS with the Xcode command line tools; on other systems build "
                "the cpu, cuda or vulkan variant"
            ),
        ),
        (
            r"ninja: error: unknown target|No rule to make target",
            (
                "a requested target does not exist in this source tree (too old or too new for "
                "this llama-proc, or a needed -DGGML_... option is off)"
            ),
        ),
        (
            r"Could NOT find (OpenSSL|CURL)",
            (
                "an optional network library is missing: pass --cmake-arg=-DLLAMA_CURL=OFF "
                "--cmake-arg=-DLLAMA_OPENSSL=OFF, or install its -dev package"
            ),
        ),
    )
)


def diagnose(lines: Sequence[str], returncode: int) -> str:
    """The likely cause of a failed configure/build, with the fix, from its output.

    Several causes can be true at once (no GPU visible and no cuBLAS): up to
    :data:`MAX_HINTS` are given, most specific first, joined with ``"; also: "``.
    Returns an empty string when nothing known matches.
    """
    text = "\n".join(lines)
    hints = [hint for pattern, hint in _DIAGNOSES if pattern.search(text)]
    if hints:
        return "; also: ".join(hints[:MAX_HINTS])
    # SIGKILL (the kernel's OOM killer) shows as -9 from Popen, 137 through a shell.
    if returncode in (-9, 137):
        return (
            "the build was killed (SIGKILL), usually by the out-of-memory killer: build with "
            "fewer parallel jobs (--jobs 1 or LLAMA_PROC_JOBS=1)"
        )
    first_cmake_error = next((ln for ln in lines if ln.startswith("CMake Error")), None)
    if first_cmake_error:
        return f"CMake configure failed ({first_cmake_error.strip()}); see the log"
    return ""


def _tail(lines: Sequence[str]) -> list[str]:
    tail = list(lines)[-LOG_TAIL_LINES:]
    first_error = next(
        (
            i
            for i, ln in enumerate(lines)
            if re.search(r"\berror\b|^FAILED:|CMake Error", ln, re.IGNORECASE)
        ),
        None,
    )
    if first_error is not None and first_error < len(lines) - LOG_TAIL_LINES:
        # With parallel jobs the first error can scroll far above the end of the output.
        tail = [lines[first_error], "...", *tail[2:]]
    return tail


class Run:
    """Run build commands: log each, append its output to a log file, show progress, diagnose.

    Args:
        log_path: the log file (appended to; created with its folder).
        env: extra environment variables for the commands.
        progress: force the progress bar on/off; None = only when stderr is a terminal.
        desc: progress bar label.
    """

    def __init__(
        self,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        progress: bool | None = None,
        desc: str = "build",
    ) -> None:
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.progress = progress
        self.desc = desc
        self.last_progress: tuple[int, int] | None = None

    def __call__(
        self, cmd: Sequence[str], *, cwd: Path | None = None, show_progress: bool = False
    ) -> list[str]:
        """Run ``cmd`` to completion and return its output lines.

        Raises:
            ToolNotFoundError: the program does not exist.
            BuildError: it exited with a non-zero status (with log tail and likely cause).
        """
        command = [str(c) for c in cmd]
        logger.info("running: %s", shlex.join(command))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        lines: collections.deque[str] = collections.deque(maxlen=MAX_KEPT_LINES)
        bar: Any = None
        # Line-buffered so `tail -f build.log` follows a long build as it happens.
        with self.log_path.open("a", encoding="utf-8", errors="replace", buffering=1) as log:
            log.write(f"\n$ {shlex.join(command)}\n")
            try:
                proc = subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    encoding="utf-8",
                    errors="replace",
                    env=self.env,
                    cwd=cwd,
                    # Its own process group, so an interrupt can stop the whole build tree.
                    start_new_session=os.name == "posix",
                    creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
                )
            except FileNotFoundError as err:
                msg = f"cannot run {command[0]}: not found; run `pip install cmake ninja`"
                raise ToolNotFoundError(msg) from err
            with proc:  # closes the pipe and reaps the child on every path
                try:
                    assert proc.stdout is not None  # noqa: S101 - stdout=PIPE above
                    for raw in proc.stdout:
                        log.write(raw)
                        line = raw.rstrip("\r\n")
                        lines.append(line)
                        logger.debug("%s", line)
                        if show_progress:
                            bar = self._advance(bar, line)
                    returncode = proc.wait()
                except BaseException:
                    # Ctrl-C or a broken pipe: leave no compiler running in the background.
                    _stop_tree(proc)
                    raise
                finally:
                    if bar is not None:
                        bar.close()
            log.write(f"# exit code {returncode}\n")
        if returncode != 0:
            kept = list(lines)
            hint = diagnose(kept, returncode)
            raise BuildError(command, returncode, _tail(kept), hint, str(self.log_path))
        return list(lines)

    def _advance(self, bar: Any, line: str) -> Any:
        step = parse_progress(line)
        if step is None:
            return bar
        done, total = step
        self.last_progress = step
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(
                total=total,
                desc=self.desc,
                unit="step",
                file=sys.stderr,
                # None lets tqdm hide itself when stderr is not a terminal.
                disable=None if self.progress is None else not self.progress,
                leave=False,
            )
        if bar.total != total:
            bar.total = total
        bar.update(max(done - bar.n, 0))
        return bar


def _stop_tree(proc: subprocess.Popen[str]) -> None:
    """Stop a build command and everything it started.

    On POSIX the command leads its own process group: SIGINT reaches cmake and Ninja like a
    Ctrl-C would, and Ninja then interrupts the compilers it runs in their own groups; whatever
    is left after :data:`STOP_GRACE` seconds is killed. On Windows the tree is killed.
    """
    if os.name != "posix":
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(proc.pid)],
            capture_output=True,
            timeout=TOOL_PROBE_TIMEOUT,
            check=False,
        )
        proc.kill()
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(STOP_GRACE)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass(frozen=True)
class BuildResult:
    """What :func:`run_build` produced."""

    bin_dir: Path
    seconds: float
    configured: bool
    """Whether CMake's configure step ran (False when a matching configure was reused)."""
    steps: int | None
    """Build steps Ninja/make reported (None when it printed none)."""


def _configure_record(plan: BuildPlan) -> dict[str, Any]:
    return {"command": plan.configure_command()}


def _needs_configure(plan: BuildPlan) -> bool:
    marker = plan.build_dir / CONFIGURED_MARKER
    if not (plan.build_dir / "CMakeCache.txt").is_file() or not marker.is_file():
        return True
    try:
        return bool(json.loads(marker.read_text(encoding="utf-8")) != _configure_record(plan))
    except (OSError, ValueError):
        return True


def _forget_configure(build_dir: Path) -> None:
    """Drop a failed configure's cache so a fixed toolchain is detected again next time."""
    (build_dir / CONFIGURED_MARKER).unlink(missing_ok=True)
    (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


def run_build(plan: BuildPlan, *, progress: bool | None = None, lock_timeout: float) -> BuildResult:
    """Configure (unless a matching configure exists) and build the plan's targets.

    The build folder is locked for the whole run: the cpu and rpc variants share it.

    Raises:
        BuildError: configure or build failed.
        ToolNotFoundError: cmake disappeared.
        CacheLockTimeoutError: another process held the build folder too long.
    """
    from filelock import FileLock, Timeout

    plan.build_dir.mkdir(parents=True, exist_ok=True)
    lock_path = plan.build_dir.parent / f"{plan.build_dir.name}.lock"
    run = Run(plan.log_path, env=plan.env, progress=progress, desc=f"building {plan.variant_id}")
    started = time.monotonic()
    try:
        with FileLock(lock_path, timeout=lock_timeout):
            configured = _needs_configure(plan)
            if configured:
                logger.info("configuring %s in %s", plan.source.path, plan.build_dir)
                try:
                    run(plan.configure_command())
                except BuildError:
                    _forget_configure(plan.build_dir)
                    raise
                (plan.build_dir / CONFIGURED_MARKER).write_text(
                    json.dumps(_configure_record(plan), indent=1), encoding="utf-8"
                )
            logger.info("building targets %s with %d jobs", ", ".join(plan.targets), plan.jobs)
            run(plan.build_command(), show_progress=True)
    except Timeout as err:
        raise CacheLockTimeoutError(str(lock_path), lock_timeout) from err
    seconds = time.monotonic() - started
    bin_dir = plan.build_dir / "bin"
    if (bin_dir / plan.config).is_dir():  # multi-config generators (Visual Studio, Xcode)
        bin_dir = bin_dir / plan.config
    steps = run.last_progress[1] if run.last_progress else None
    return BuildResult(bin_dir=bin_dir, seconds=seconds, configured=configured, steps=steps)


def _compiler_info(build_dir: Path, toolchain: Toolchain) -> dict[str, str]:
    """Compiler id and version from CMake's own detection, else ``<c++> --version``."""
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
        try:
            done = subprocess.run(
                [compiler, "--version"],
                capture_output=True,
                text=True,
                timeout=TOOL_PROBE_TIMEOUT,
                check=False,
            )
            first = (done.stdout or done.stderr).strip().splitlines()
            return {"id": Path(compiler).name, "version": first[0] if first else ""}
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {"id": "unknown", "version": ""}


def copy_outputs(bin_dir: Path, staging: Path) -> list[str]:
    """Copy everything in ``bin_dir`` into ``staging`` (symlinks kept as symlinks).

    Returns:
        The copied top-level names.

    Raises:
        BuildError: the build produced no ``bin/`` folder.
    """
    if not bin_dir.is_dir():
        msg = f"the build produced no {bin_dir} folder"
        raise BuildError(["copy", str(bin_dir)], 1, [msg], "the build output layout is unexpected")
    staging.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for entry in sorted(bin_dir.iterdir()):
        dest = staging / entry.name
        if entry.is_symlink():
            # In-folder symlink chains (libggml.so -> libggml.so.0 -> ...) stay links, so the
            # $ORIGIN rpath resolves them exactly as in the build tree.
            dest.symlink_to(entry.readlink())
        elif entry.is_dir():
            shutil.copytree(entry, dest, symlinks=True)
        else:
            shutil.copy2(entry, dest)
        names.append(entry.name)
    return names


def build_into(
    staging: Path,
    variant: Variant,
    source: SourceTree,
    *,
    settings: Settings,
    manifest: Manifest | None = None,
    plan: BuildPlan | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Build ``variant`` from ``source`` and copy the results into ``staging``.

    This is the ``populate`` step of an install (and the build backend's entry).

    Args:
        staging: folder to fill (created).
        variant: what to build.
        source: the llama.cpp tree.
        settings: cache root, jobs, progress.
        manifest: the manifest (default: the shipped one).
        plan: a ready plan; otherwise made with :func:`plan_build` and ``options``.
        **options: keyword arguments of :func:`plan_build` (cuda_arch, jobs, cmake_args,
            portable, host, os_name, toolchain).

    Returns:
        The install metadata (variant, build, source, flags, compiler, timings...).

    Raises:
        ToolNotFoundError: a needed tool is missing.
        BuildError: configure or build failed.
        ConfigError: bad CMake arguments or CUDA architectures.
        ProvisionError: the variant's targets are not in the tree.
    """
    if plan is None:
        from llama_proc.provision.manifest import load_manifest

        plan = plan_build(
            variant, source, settings, manifest=manifest or load_manifest(), **options
        )
    logger.info(
        "building %s (%s) from %s in %s",
        variant.id,
        ", ".join(plan.targets),
        source.origin,
        plan.build_dir,
    )
    result = run_build(plan, progress=settings.progress, lock_timeout=settings.lock_timeout)
    copied = copy_outputs(result.bin_dir, staging)
    tools = plan.toolchain
    return {
        "variant_id": variant.id,
        "build": source.build or "unknown",
        "source": BUILD_SOURCE,
        "source_origin": source.origin,
        "source_kind": source.kind,
        "source_path": str(source.path),
        "source_sha256": source.sha256,
        "source_commit": source.commit,
        "cmake_flags": list(plan.flags),
        "targets": list(plan.targets),
        "generator": plan.generator or "default",
        "cmake": {"path": tools.cmake, "version": _version_text(tools.cmake_version)},
        "compiler": _compiler_info(plan.build_dir, tools),
        "ccache": tools.ccache,
        "nvcc": _version_text(tools.nvcc_version) if tools.nvcc else None,
        "cuda_architectures": plan.cuda_arch,
        "portable": plan.portable,
        "jobs": plan.jobs,
        "build_dir": str(plan.build_dir),
        "build_log": str(plan.log_path),
        "build_seconds": round(result.seconds, 1),
        "build_steps": result.steps,
        "configured": result.configured,
        "files": copied,
    }


def build_variant(
    variant: Variant,
    settings: Settings,
    *,
    manifest: Manifest | None = None,
    source: str | Path | None = None,
    source_build: str | None = None,
    cuda_arch: str | None = None,
    jobs: int | None = None,
    cmake_args: Sequence[str] = (),
    portable: bool = False,
    force: bool = False,
    host: HostInfo | None = None,
    toolchain: Toolchain | None = None,
    explain: list[str] | None = None,
) -> Install:
    """Build ``variant`` from source into the cache (or return the cached build).

    Args:
        variant: the manifest variant (flags, targets, binaries).
        settings: cache root, jobs, CUDA architectures, build source, offline, progress.
        manifest: the manifest (default: the shipped one).
        source: folder, archive path/URL (``#sha256=<hex>``), ``"release"`` or ``"index"``;
            None = ``settings.build_source``, else the pinned source (see
            :func:`~llama_proc.provision.sources.obtain_source`).
        source_build: the build tag (``b1234``) of a source whose build cannot be found out.
        cuda_arch: CMAKE_CUDA_ARCHITECTURES (default: settings, else this host's GPUs).
        jobs: parallel compile jobs (default: settings, else the CPU count).
        cmake_args: extra ``-DNAME=VALUE`` arguments.
        portable: build with the variant's portable flags (runs on other machines).
        force: rebuild and reinstall even if the install exists (the build stays incremental).
        host: detected host (for CUDA compute capabilities); detected when needed.
        toolchain: the tools to use (default: found on this host).
        explain: gets one line per decision (source used, cache hit or build time).

    Returns:
        The complete install; ``metadata["source_origin"]`` says which source was used.

    Raises:
        ToolNotFoundError: cmake, a compiler or a GPU toolkit is missing.
        BuildError: configure or build failed (log tail, likely cause, log path).
        ConfigError: bad CMake arguments or CUDA architectures.
        ProvisionError: the source cannot be obtained or verified, or the install failed.
        CacheLockTimeoutError: another process held a lock too long.
    """
    from llama_proc.provision.cache import install_atomically, install_dir
    from llama_proc.provision.manifest import load_manifest
    from llama_proc.provision.sources import obtain_source, tree_fingerprint

    manifest = manifest or load_manifest()
    os_name = host_os()
    if variant.os != os_name:
        msg = (
            f"variant {variant.id} is for {variant.os}; this host is {os_name} and "
            "cross-compiling is not supported"
        )
        raise ProvisionError(msg)
    user_args = validate_cmake_args(cmake_args)
    tree = obtain_source(settings, manifest, source, build=source_build)
    arch_request = cuda_arch or settings.cuda_arch
    flavor = install_flavor(
        tree,
        variant,
        portable=portable,
        cuda_arch=arch_request if variant.backend == "cuda" else None,
        cmake_args=user_args,
        fingerprint=tree_fingerprint(tree.path) if tree.kind == "local" else "",
    )
    target = install_dir(settings, tree.build or "unknown", variant.id, flavor)

    built: list[dict[str, Any]] = []

    def populate(staging: Path) -> dict[str, Any]:
        metadata = build_into(
            staging,
            variant,
            tree,
            settings=settings,
            manifest=manifest,
            os_name=os_name,
            host=host,
            cuda_arch=cuda_arch,
            jobs=jobs,
            cmake_args=user_args,
            portable=portable,
            toolchain=toolchain,
        )
        built.append(metadata)
        return metadata

    populate_fn: Callable[[Path], Mapping[str, Any]] = populate
    install = install_atomically(
        target,
        populate_fn,
        settings=settings,
        binaries=variant.binaries,
        os_name=os_name,
        force=force,
    )
    origin = install.metadata.get("source_origin", tree.origin)
    lines = [f"source: {origin} (build {tree.build or 'unknown'})"]
    if built:
        meta = built[0]
        steps = meta["build_steps"]
        work = f"{steps} build steps" if steps else "already up to date"
        lines.append(
            f"built {', '.join(meta['targets'])} in {meta['build_seconds']} s ({work}; "
            f"{meta['generator']}, {meta['compiler']['id']} {meta['compiler']['version']}); "
            f"log: {meta['build_log']}"
        )
    else:
        lines.append(f"cache hit: {install.path} (already built; --force rebuilds)")
    for line in lines:
        logger.info("%s: %s", variant.id, line)
    if explain is not None:
        explain.extend(lines)
    logger.info("llama-server %s ready at %s", variant.id, install.server_binary)
    return install
