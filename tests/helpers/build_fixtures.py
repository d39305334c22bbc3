"""A tiny CMake project shaped like llama.cpp, for real configure/build tests in seconds.

``make_fake_llama_tree(root)`` writes a tree with the files llama-proc looks for
(``CMakeLists.txt`` + ``tools/server``), a shared library with a versioned symlink chain
(``libggml.so -> libggml.so.0 -> libggml.so.0.1.0``) linked through the ``$ORIGIN`` rpath,
a ``llama-server`` whose ``--version`` prints ``version: <LLAMA_BUILD_NUMBER> (<commit>)`` like
the real one, and a ``ggml-rpc-server`` target that exists only with ``-DGGML_RPC=ON``.
"""

from __future__ import annotations

import platform
import shutil
import sys
from typing import TYPE_CHECKING, Any

from llama_proc.provision.manifest_records import Variant

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "TOP_CMAKELISTS",
    "can_build_c",
    "fake_variant",
    "host_os",
    "make_fake_llama_tree",
]

TOP_CMAKELISTS = """\
cmake_minimum_required(VERSION 3.15)
project(fake_llama C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(CMAKE_LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(CMAKE_WINDOWS_EXPORT_ALL_SYMBOLS ON)
if (NOT DEFINED LLAMA_BUILD_NUMBER)
    set(LLAMA_BUILD_NUMBER 0)
endif()
if (NOT DEFINED LLAMA_BUILD_COMMIT)
    set(LLAMA_BUILD_COMMIT "unknown")
endif()
add_subdirectory(ggml)
add_subdirectory(tools/server)
if (GGML_RPC)
    add_subdirectory(tools/rpc)
endif()
"""

GGML_CMAKELISTS = """\
add_library(ggml SHARED ggml.c extra.c)
set_target_properties(ggml PROPERTIES VERSION 0.1.0 SOVERSION 0)
"""

GGML_C = """\
int ggml_extra(void);
int ggml_answer(void) { return 40 + ggml_extra(); }
"""

EXTRA_C = "int ggml_extra(void) { return 2; }\n"

SERVER_CMAKELISTS = """\
set(TARGET llama-server)
add_executable(${TARGET} server.c)
target_link_libraries(${TARGET} PRIVATE ggml)
target_compile_definitions(${TARGET} PRIVATE
    BUILD_NUMBER=${LLAMA_BUILD_NUMBER} BUILD_COMMIT="${LLAMA_BUILD_COMMIT}")
"""

SERVER_C = """\
#include <stdio.h>
#include <string.h>
int ggml_answer(void);
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        fprintf(stderr, "version: %d (%s)\\n", BUILD_NUMBER, BUILD_COMMIT);
        return ggml_answer() == 42 ? 0 : 1;
    }
    printf("hello %d\\n", ggml_answer());
    return 0;
}
"""

RPC_CMAKELISTS = """\
set(TARGET ggml-rpc-server)
add_executable(${TARGET} rpc-server.c)
target_link_libraries(${TARGET} PRIVATE ggml)
"""

RPC_C = """\
#include <stdio.h>
int ggml_answer(void);
int main(void) { printf("rpc %d\\n", ggml_answer()); return 0; }
"""


def make_fake_llama_tree(root: Path, *, rpc_name: str = "ggml-rpc-server") -> Path:
    """Write the tiny llama.cpp look-alike under ``root`` and return ``root``."""
    files = {
        "CMakeLists.txt": TOP_CMAKELISTS,
        "ggml/CMakeLists.txt": GGML_CMAKELISTS,
        "ggml/ggml.c": GGML_C,
        "ggml/extra.c": EXTRA_C,
        "tools/server/CMakeLists.txt": SERVER_CMAKELISTS,
        "tools/server/server.c": SERVER_C,
        "tools/rpc/CMakeLists.txt": RPC_CMAKELISTS.replace("ggml-rpc-server", rpc_name),
        "tools/rpc/rpc-server.c": RPC_C,
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def host_os() -> str:
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "darwin":
        return "macos"
    return "windows"


def can_build_c() -> bool:
    """cmake (PATH or this interpreter's scripts) and a C compiler are available."""
    from llama_proc.provision.compile.toolchain import find_tool

    if find_tool("cmake") is None:
        return False
    if host_os() == "windows":
        return shutil.which("cl") is not None
    return any(shutil.which(c) for c in ("cc", "gcc", "clang"))


def fake_variant(backend: str = "cpu", *, os_name: str | None = None, **changes: Any) -> Variant:
    """A manifest variant for this host, as llama-proc would build it."""
    import dataclasses

    from llama_proc.provision.manifest_records import Requirements

    rpc = backend == "rpc"
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "arm64": "arm64"}.get(machine, machine)
    variant = Variant(
        id=f"{os_name or host_os()}-{arch}-{backend}",
        os=os_name or host_os(),
        arch=arch,
        backend=backend,
        asset=None,
        extra_assets=(),
        sha256={},
        binaries=("llama-server", "ggml-rpc-server|rpc-server") if rpc else ("llama-server",),
        requires=Requirements(),
        cmake_flags=("-DGGML_RPC=ON", "-DGGML_NATIVE=ON"),
        portable_cmake_flags=("-DGGML_RPC=ON", "-DGGML_NATIVE=OFF"),
        targets=("llama-server", "ggml-rpc-server|rpc-server") if rpc else ("llama-server",),
    )
    return dataclasses.replace(variant, **changes)
