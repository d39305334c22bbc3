"""Why did a CMake configure or build fail? The likely cause and its fix, from the output.

:func:`diagnose` matches a failed command's output against known failures (compiler out of
memory, disk full, no compiler, CMake too old, CUDA/Vulkan/Metal toolkit problems, missing
targets) and :func:`error_tail` picks the lines a :class:`~llama_proc.errors.BuildError` shows.
The failures of a running llama-server are decoded elsewhere (:mod:`llama_proc.diagnosis`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["diagnose", "error_tail"]

MAX_HINTS: Final = 2
LOG_TAIL_LINES: Final = 40
_ERROR_LINE_RE: Final = re.compile(r"\berror\b|^FAILED:|CMake Error", re.IGNORECASE)


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


def error_tail(lines: Sequence[str]) -> list[str]:
    """The last lines of a failed command's output, led by its first error line.

    With parallel jobs the first error can scroll far above the end of the output, so when it
    is not among the last :data:`LOG_TAIL_LINES` it replaces the oldest two of them.
    """
    tail = list(lines)[-LOG_TAIL_LINES:]
    first_error = next((i for i, ln in enumerate(lines) if _ERROR_LINE_RE.search(ln)), None)
    if first_error is not None and first_error < len(lines) - LOG_TAIL_LINES:
        tail = [lines[first_error], "...", *tail[2:]]
    return tail
