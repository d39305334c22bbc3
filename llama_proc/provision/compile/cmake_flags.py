"""The CMake side of a source build: flags, CUDA architectures, targets and cache keys.

Pure functions of their inputs (no tool runs here): :func:`compose_cmake_flags` orders every
``-D`` definition of a configure, :func:`resolve_cuda_arch` picks ``CMAKE_CUDA_ARCHITECTURES``,
:func:`resolve_targets` maps the manifest's target specs onto what a source tree defines, and
:func:`build_key` / :func:`install_flavor` name the build folder and the install folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ConfigError, ProvisionError
from llama_proc.provision.compile.toolchain import version_text
from llama_proc.provision.manifest import split_alternatives

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Sequence

    from llama_proc.provision.fetch.source_tree import SourceTree
    from llama_proc.provision.manifest_records import Variant

__all__ = [
    "build_key",
    "compose_cmake_flags",
    "defined_targets",
    "flag_value",
    "install_flavor",
    "is_cuda_build",
    "resolve_cuda_arch",
    "resolve_targets",
    "toolkit_link_flags",
    "validate_cmake_args",
]

KEY_LENGTH: Final = 16
FLAVOR_LENGTH: Final = 10
MIN_CMAKE_CUDA_NATIVE: Final = (3, 24)
MIN_NVCC_NATIVE: Final = (11, 6)
"""CMake's ``native`` CUDA architecture needs nvcc's ``-arch=native`` (CUDA 11.6)."""
RPATH: Final = {"linux": "$ORIGIN", "macos": "@loader_path"}
"""Where the binaries look for their shared libraries: their own folder (none on Windows)."""
_VOLATILE_FLAGS: Final = re.compile(
    r"^-D(CMAKE_[A-Z]+_COMPILER_LAUNCHER|CMAKE_MAKE_PROGRAM|LLAMA_USE_PREBUILT_UI)(:[A-Z]+)?="
)
"""Flags kept out of the build key: changing them reconfigures the same folder."""
_CMAKE_ARG_RE: Final = re.compile(r"^-D[A-Za-z_][A-Za-z0-9_.+-]*(:[A-Za-z]+)?=")
_CUDA_ARCH_ITEM_RE: Final = re.compile(r"^([0-9]+[af]?(-real|-virtual)?|all|all-major|native)$")
_TARGET_RE: Final = re.compile(
    r"(?:set\s*\(\s*TARGET|add_executable\s*\(|add_library\s*\()\s*([A-Za-z0-9_.+-]+)",
    re.IGNORECASE,
)
_TARGET_SCAN_DIRS: Final = ("tools", "examples")
_TARGET_SCAN_DEPTH: Final = 3


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
        f"cannot target 'native' CUDA architectures: nvcc {version_text(nvcc_version)} / cmake "
        f"{version_text(cmake_version)} do not support it (needs nvcc >= 11.6, cmake >= 3.24) "
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
    cuda_toolkit_root: str | None = None,
    launcher: str | None = None,
    make_program: str | None = None,
    cmake_args: Sequence[str] = (),
) -> list[str]:
    """All ``-D`` flags of a configure, in order (a later definition of a name wins in CMake).

    Order: the manifest's ``[build] cmake_flags``, the variant's (portable) flags, the rpath
    flags (``$ORIGIN`` / ``@loader_path``; none on Windows, where DLLs load from the exe's
    folder), the build number and commit (so ``llama-server --version`` is truthful), the CUDA
    architectures, compiler and toolkit root (``CUDAToolkit_ROOT``: the wheel toolkit, which
    ``FindCUDAToolkit`` would not look for, with its :func:`toolkit_link_flags`), the compiler
    launcher (ccache), the make program
    (Ninja's full
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
    is_cuda = is_cuda_build(variant, flags)
    if is_cuda and cuda_arch:
        flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
    if is_cuda and cuda_compiler:
        flags.append(f"-DCMAKE_CUDA_COMPILER={cuda_compiler}")
    if is_cuda and cuda_toolkit_root:
        flags.append(f"-DCUDAToolkit_ROOT={cuda_toolkit_root}")
        flags += toolkit_link_flags(cuda_toolkit_root, os_name)
    if launcher:
        languages = ("C", "CXX", "CUDA") if is_cuda else ("C", "CXX")
        flags += [f"-DCMAKE_{lang}_COMPILER_LAUNCHER={launcher}" for lang in languages]
    if make_program:
        flags.append(f"-DCMAKE_MAKE_PROGRAM={make_program}")
    flags += list(cmake_args)
    return flags


def toolkit_link_flags(root: str, os_name: str) -> list[str]:
    """Linker flags for a CUDA toolkit outside the loader's search path (the wheel toolkit).

    Linking ``llama-server`` against ``libggml-cuda.so`` makes the linker resolve that
    library's own dependencies (``libcublas.so.13``, ``libcuda.so.1``...) by soname, which it
    finds on the default paths only for a system toolkit and an installed driver. ``-rpath-link``
    points it at the toolkit's libraries and the driver stub; nothing of it is recorded in the
    binaries, which find the bundled runtime through ``$ORIGIN`` and the real driver at run
    time. Not needed elsewhere: Windows links import libraries, and there is no CUDA on macOS.
    """
    if os_name != "linux":
        return []
    lib = Path(root) / "lib64"
    link = f"-Wl,-rpath-link,{lib}:{lib / 'stubs'}"
    return [f"-DCMAKE_EXE_LINKER_FLAGS={link}", f"-DCMAKE_SHARED_LINKER_FLAGS={link}"]


def is_cuda_build(variant: Variant, flags: Sequence[str]) -> bool:
    """Whether a build compiles the CUDA backend: a cuda variant, or ``-DGGML_CUDA=ON`` in flags."""
    return variant.backend == "cuda" or any(f.upper() == "-DGGML_CUDA=ON" for f in flags)


def flag_value(flags: Sequence[str], name: str) -> str | None:
    """The value the last ``-D<name>[:TYPE]=...`` in ``flags`` gives (CMake's rule), else None."""
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
