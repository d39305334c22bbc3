"""The CUDA pieces a build needs and ships.

The toolchain to compile with, the driver stub to link against, and the runtime libraries
bundled beside the binary.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING

from llama_proc.errors import ToolNotFoundError
from llama_proc.provision.compile.cuda_wheels import (
    CUDA_RUNTIME_LIBRARIES,
    ensure_cuda_toolkit,
    runtime_library_files,
)
from llama_proc.provision.compile.toolchain import (
    choose_cuda_toolkit,
    cuda_toolkit_dirs,
    find_toolchain,
)
from llama_proc.provision.elf import elf_needed

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from llama_proc.provision.compile.build_plan import BuildRequest
    from llama_proc.provision.compile.toolchain import Toolchain, ToolkitChoice
    from llama_proc.provision.manifest_records import Manifest
    from llama_proc.provision.views import FetchView

logger = logging.getLogger(__name__)


def cuda_toolchain(
    request: BuildRequest, manifest: Manifest, settings: FetchView
) -> tuple[Toolchain, ToolkitChoice]:
    """The tools of a CUDA build: with the system toolkit, or the wheel toolkit laid out now.

    Raises:
        ToolNotFoundError: no toolkit fits (the message says what to install), or cmake or a
            compiler is missing.
        ProvisionError: the wheel toolkit cannot be fetched or laid out.
    """
    choice = choose_cuda_toolkit(
        request.host, manifest.cuda_toolkits, os_name=request.os_name, arch=request.variant.arch
    )
    logger.info("CUDA toolkit: %s", choice.reason)
    if choice.source == "none":
        msg = f"CUDA builds need nvcc: {choice.reason}"
        raise ToolNotFoundError(msg)
    root = ensure_cuda_toolkit(choice.spec, settings) if choice.spec is not None else None
    return find_toolchain("cuda", request.os_name, cuda_root=root), choice


def _toolkit_lib_dirs(tools: Toolchain) -> list[Path]:
    """The library folders of a build's CUDA toolkit (the wheel toolkit's or a system one)."""
    return cuda_toolkit_dirs(tools.nvcc)[1] if tools.nvcc else []


def driver_stub_dir(lib_dirs: Iterable[Path]) -> str | None:
    """The folder holding a ``libcuda.so.1`` stand-in (``<lib>/stubs``), if the toolkit has one.

    The package-index toolkit has one (see :mod:`~llama_proc.provision.compile.cuda_wheels`); a system
    toolkit's ``stubs`` folder holds only ``libcuda.so``, which the loader never asks for.
    """
    for folder in lib_dirs:
        if (folder / "stubs" / "libcuda.so.1").is_file():
            return str(folder / "stubs")
    return None


def bundle_cuda_runtime(staging: Path, lib_dirs: Iterable[Path]) -> list[str]:
    """Put the CUDA runtime libraries the staged binaries link beside them.

    The libraries (:data:`~llama_proc.provision.compile.cuda_wheels.CUDA_RUNTIME_LIBRARIES`) named in
    the ``DT_NEEDED`` entries of the files in ``staging`` are taken from ``lib_dirs`` (a
    hard link where the cache shares a file system, else a copy) under their soname, so the
    ``$ORIGIN`` rpath finds them. Libraries already there are kept.

    Returns:
        The sonames added.
    """
    prefixes = tuple(f"{name}.so." for name in CUDA_RUNTIME_LIBRARIES)
    dirs = list(lib_dirs)
    todo = [e for e in sorted(staging.iterdir()) if e.is_file() and not e.is_symlink()]
    added: list[str] = []
    while todo:  # libcublas needs libcublasLt: follow what the added libraries link too
        entry = todo.pop(0)
        wanted = [n for n in elf_needed(entry) if n.startswith(prefixes)]
        for source in runtime_library_files(
            dirs, [n for n in wanted if not (staging / n).exists()]
        ):
            dest = staging / source.name
            real = source.resolve()
            try:
                os.link(real, dest)
            except OSError:
                shutil.copy2(real, dest)
            added.append(source.name)
            todo.append(dest)
    return added
