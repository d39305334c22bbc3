"""A CUDA toolkit from the package index: NVIDIA's own wheels laid out as a toolkit root.

NVIDIA publishes the parts of the CUDA toolkit as wheels (``nvidia-cuda-nvcc``,
``nvidia-cuda-runtime``, ``nvidia-cublas``, ...). They need only the NVIDIA driver, so a host
with a driver and no toolkit can still build llama.cpp's CUDA backend.
:func:`ensure_cuda_toolkit` fetches the wheels a ``[[cuda_toolkit]]`` table of the manifest pins
(sha256-checked, through :func:`~llama_proc.provision.fetch.index.fetch_index_file`) and lays them out,
once and under the cache's lock-and-stage protocol, as the folder CMake's ``FindCUDAToolkit``
accepts::

    cache_dir/toolkits/cuda-13.0-x86_64-<hash>/
        bin/nvcc, bin/ptxas, ...    nvvm/bin/cicc, nvvm/libdevice/
        include/ (+ include/cccl/)  lib64/ (libcudart.so -> libcudart.so.13, ...), lib -> lib64
        lib64/stubs/libcuda.so      a link-time stand-in for the driver library (+ libcuda.so.1)
        llama-proc-toolkit.json     what was laid out (written last: the folder is complete)

The wheels carry no ``libcuda`` (the driver's library, which ggml-cuda links for its virtual
memory pool): a stub with the same exports, generated from the toolkit's own ``cuda.h``, stands
in at link time, as the toolkit's ``lib64/stubs`` does; at run time the driver's real
``libcuda.so.1`` is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import TYPE_CHECKING, Any, Final

from llama_proc._proc import run_with_timeout
from llama_proc.errors import ProvisionError, ToolNotFoundError
from llama_proc.provision.cache.layout import TOOLKITS_DIR
from llama_proc.provision.cache.locking import create_once
from llama_proc.provision.compile.toolchain import find_tool
from llama_proc.provision.fetch.archive import extract_archive
from llama_proc.provision.fetch.index import fetch_index_file

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

    import requests

    from llama_proc.provision.manifest_records import CudaToolkitSpec
    from llama_proc.provision.views import CacheView, FetchView

__all__ = [
    "CUDA_RUNTIME_LIBRARIES",
    "TOOLKITS_DIR",
    "TOOLKIT_MARKER",
    "driver_stub_source",
    "ensure_cuda_toolkit",
    "lay_out_toolkit",
    "read_toolkit_marker",
    "runtime_library_files",
    "toolkit_path",
]

logger = logging.getLogger(__name__)

TOOLKIT_MARKER: Final = "llama-proc-toolkit.json"
"""Written last into a laid-out toolkit: what it holds; its presence means complete."""
LAYOUT_VERSION: Final = 2
"""Version of the layout written here; a toolkit laid out by an older llama-proc is redone.
2: ``lib64/stubs/libcuda.so.1``, the name the linker looks for through ``-rpath-link``."""
CUDA_RUNTIME_LIBRARIES: Final = ("libcudart", "libcublas", "libcublasLt")
"""The toolkit libraries llama.cpp's CUDA backend links (copied beside the built binaries)."""
HASH_LENGTH: Final = 10
NVCC_CHECK_TIMEOUT: Final = 60.0
STUB_COMPILE_TIMEOUT: Final = 120.0
CUDA_ERROR_STUB_LIBRARY: Final = 34
"""What every stub function returns (CUDA's own code for "this is the stub library")."""
_SKIPPED_NAMES: Final = frozenset({"__init__.py", "__pycache__", ".metadata"})
_VERSIONED_SO_RE: Final = re.compile(r"^(lib[A-Za-z0-9_+-]+\.so)\.[0-9][0-9.]*$")
_CUDA_DECL_RE: Final = re.compile(r"\bCUDAAPI\s+(cu[A-Za-z0-9_]+)\s*\(")
_CUDA_DEFINE_RE: Final = re.compile(
    r"^\s*#\s*define\s+(cu[A-Za-z0-9_]+)\s+(?:__CUDA_API_PT[A-Z]+\s*\(\s*)?(cu[A-Za-z0-9_]+)",
    re.MULTILINE,
)
_NVCC_RELEASE_RE: Final = re.compile(r"release (\d+)\.(\d+)")


def toolkit_path(spec: CudaToolkitSpec, settings: CacheView) -> Path:
    """``cache_dir/toolkits/cuda-<version>-<arch>-<hash of the pinned wheels>``."""
    digest = hashlib.sha256("".join(w.sha256 for w in spec.wheels).encode()).hexdigest()
    return (
        settings.cache_dir / TOOLKITS_DIR / f"cuda-{spec.cuda}-{spec.arch}-{digest[:HASH_LENGTH]}"
    )


def read_toolkit_marker(root: Path) -> dict[str, Any] | None:
    """What :data:`TOOLKIT_MARKER` in ``root`` says, or None when the toolkit is incomplete."""
    try:
        data = json.loads((root / TOOLKIT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not (root / "bin" / "nvcc").is_file():
        return None
    if data.get("layout") != LAYOUT_VERSION:
        return None
    return data


def ensure_cuda_toolkit(
    spec: CudaToolkitSpec,
    settings: FetchView,
    *,
    session: requests.Session | None = None,
    force: bool = False,
) -> Path:
    """The toolkit root for ``spec``, laid out from its wheels once (later calls: a cache hit).

    Args:
        spec: the pinned wheels
            (:func:`~llama_proc.provision.compile.toolchain.choose_cuda_toolkit` picks them).
        settings: ``cache_dir``, ``index_url``, offline flag, timeouts.
        session: a ``requests`` session to reuse for the downloads.
        force: lay it out again even when complete.

    Returns:
        The toolkit root (pass it as ``CUDAToolkit_ROOT``).

    Raises:
        OfflineError: offline mode and a wheel is not cached.
        DownloadError: the index or a wheel could not be fetched.
        ChecksumMismatchError: a wheel's bytes do not match its pin.
        ArchiveError: a wheel is corrupt or unsafe.
        ToolNotFoundError: no C compiler for the driver stub.
        ProvisionError: the laid-out nvcc does not run or reports another version.
        CacheLockTimeoutError: another process held the toolkit's lock too long.
    """
    root = toolkit_path(spec, settings)

    def make(staging: Path) -> None:
        wheels = [fetch_index_file(w, settings, session) for w in spec.wheels]
        unpacked = staging / ".wheels"
        for wheel in wheels:
            extract_archive(wheel, unpacked)
        lay_out_toolkit(unpacked, staging)
        shutil.rmtree(unpacked)
        _build_driver_stub(staging)
        _check_nvcc(staging, spec)
        marker = {
            "layout": LAYOUT_VERSION,
            "cuda": spec.cuda,
            "os": spec.os,
            "arch": spec.arch,
            "wheels": [{"filename": w.filename, "sha256": w.sha256} for w in spec.wheels],
        }
        (staging / TOOLKIT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")

    logger.info("CUDA %s toolkit from the package index: %s", spec.cuda, root)
    return create_once(
        root,
        make,
        ready=lambda: root if read_toolkit_marker(root) is not None else None,
        timeout=settings.lock_timeout,
        force=force,
    )


def lay_out_toolkit(unpacked: Path, root: Path) -> None:
    """Merge unpacked wheels (``nvidia/<part>/...``) into one toolkit root.

    Each part's ``lib/`` lands in ``lib64/`` (``lib`` becomes a link to it), everything else
    keeps its path (``bin/``, ``include/``, ``nvvm/``); the wheels' Python files and metadata
    are left out. Every versioned library (``libcudart.so.13``) gets its unversioned link
    (``libcudart.so``), which the linker looks for.

    Raises:
        ProvisionError: the wheels hold no ``nvidia/`` folder, or two parts clash on a file.
    """
    parts_dir = unpacked / "nvidia"
    if not parts_dir.is_dir():
        msg = f"the CUDA wheels unpacked into {unpacked} hold no nvidia/ folder; re-download them"
        raise ProvisionError(msg)
    root.mkdir(parents=True, exist_ok=True)
    for part in sorted(p for p in parts_dir.iterdir() if p.is_dir()):
        for top in sorted(part.iterdir()):
            if top.name in _SKIPPED_NAMES or top.name.endswith(".py"):
                continue
            _merge(top, root / ("lib64" if top.name == "lib" else top.name))
    lib64 = root / "lib64"
    lib64.mkdir(exist_ok=True)
    if not (root / "lib").exists():
        (root / "lib").symlink_to("lib64")
    for folder in (lib64, root / "nvvm" / "lib64"):
        _link_unversioned(folder)


def _merge(src: Path, dest: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        dest.mkdir(parents=True, exist_ok=True)
        for child in sorted(src.iterdir()):
            if child.name not in _SKIPPED_NAMES and not child.name.endswith(".py"):
                _merge(child, dest / child.name)
        return
    if dest.exists() or dest.is_symlink():
        msg = f"two CUDA wheels both ship {dest.name} ({src}); the pinned set is inconsistent"
        raise ProvisionError(msg)
    src.rename(dest)


def _link_unversioned(folder: Path) -> None:
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        match = _VERSIONED_SO_RE.match(entry.name)
        if match and not (folder / match.group(1)).exists():
            (folder / match.group(1)).symlink_to(entry.name)


def driver_stub_source(cuda_header: str) -> str:
    """C source of a stand-in ``libcuda``: one function per driver API name in ``cuda.h``.

    Both a declared name (``cuMemGetInfo``) and what ``cuda.h`` maps it to (``cuMemGetInfo_v2``)
    are exported, so objects compiled against any API version link.
    """
    names = set(_CUDA_DECL_RE.findall(cuda_header))
    for alias, target in _CUDA_DEFINE_RE.findall(cuda_header):
        names.update((alias, target))
    lines = ["/* Link-time stand-in for the NVIDIA driver's libcuda.so.1 (llama-proc). */"]
    lines += [f"int {n}(void) {{ return {CUDA_ERROR_STUB_LIBRARY}; }}" for n in sorted(names)]
    return "\n".join(lines) + "\n"


def _build_driver_stub(root: Path) -> None:
    header = root / "include" / "cuda.h"
    try:
        source = driver_stub_source(header.read_text(encoding="utf-8", errors="replace"))
    except OSError as err:
        msg = (
            f"the CUDA wheels hold no {header.name} ({err.strerror}); the pinned set is incomplete"
        )
        raise ProvisionError(msg) from err
    compiler = _c_compiler()
    stubs = root / "lib64" / "stubs"
    stubs.mkdir(parents=True, exist_ok=True)
    c_file = stubs / "libcuda-stub.c"
    c_file.write_text(source, encoding="utf-8")
    out = stubs / "libcuda.so"
    cmd = [compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(c_file)]
    ran = run_with_timeout(cmd, STUB_COMPILE_TIMEOUT)
    if ran is None or ran.timed_out or ran.returncode != 0 or not out.is_file():
        tail = ran.output.strip().splitlines()[-3:] if ran is not None else []
        msg = (
            f"cannot build the libcuda link stub with {compiler} ({' '.join(tail) or 'no output'}); "
            "check the C compiler (CC)"
        )
        raise ProvisionError(msg)
    c_file.unlink()
    # The soname, for the linker: linking an executable against libggml-cuda resolves that
    # library's own dependencies by soname, through -rpath-link (see cmake_flags).
    (stubs / "libcuda.so.1").symlink_to("libcuda.so")


def _c_compiler() -> str:
    explicit = os.environ.get("CC", "").split()
    for name in [*explicit[:1], "cc", "gcc", "clang"]:
        found = find_tool(name)
        if found:
            return found
    msg = (
        "the CUDA toolkit from the package index needs a C compiler for its libcuda link stub: "
        "install build-essential (Debian/Ubuntu) or gcc (Fedora/RHEL)"
    )
    raise ToolNotFoundError(msg)


def _check_nvcc(root: Path, spec: CudaToolkitSpec) -> None:
    nvcc = root / "bin" / "nvcc"
    ran = run_with_timeout([str(nvcc), "--version"], NVCC_CHECK_TIMEOUT)
    match = _NVCC_RELEASE_RE.search(ran.output) if ran is not None and not ran.timed_out else None
    found = (int(match.group(1)), int(match.group(2))) if match else None
    if found != spec.cuda_version[:2]:
        said = ran.output.strip().splitlines()[-1:] if ran is not None else ["did not start"]
        msg = (
            f"the nvcc laid out from the CUDA {spec.cuda} wheels does not report release "
            f"{spec.cuda} ({' '.join(said)}); delete {root} and retry"
        )
        raise ProvisionError(msg)


def runtime_library_files(lib_dirs: Iterable[Path], sonames: Sequence[str]) -> list[Path]:
    """The files in ``lib_dirs`` named by ``sonames`` (first folder that has each wins)."""
    found: list[Path] = []
    for soname in sonames:
        for folder in lib_dirs:
            candidate = folder / soname
            if candidate.exists():
                found.append(candidate)
                break
    return found
