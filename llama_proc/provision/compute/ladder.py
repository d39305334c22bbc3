"""What to turn off when an install does not compute: CPU feature groups, in ladder order.

A native source build compiles for every instruction set this CPU reports; a prebuilt or a
portable build ships one ggml CPU library per x86 or Arm level (``libggml-cpu-haswell.so`` ...
``libggml-cpu-sapphirerapids.so``) and ggml's loader takes the best one this CPU supports. When
the best one is broken (upstream's AMX kernels die with SIGILL on Sapphire Rapids at b11434),
the cure is to give up the newest feature group and take the next rung down:

- x86-64: AMX -> the AVX-512 extensions (VBMI, VNNI, BF16) -> AVX-512 -> AVX2;
- arm64: SME -> SVE and SVE2 -> the int8 matrix multiply.

Each :class:`FeatureGroup` knows the ``/proc/cpuinfo`` names that say the host has it (a rung
the host lacks is skipped), the compiler flags that keep a native build from using it (GCC and
Clang spell them alike; MSVC and native Arm builds have none, so their ladder goes through the
variant libraries of a portable build), and the ggml CPU-variant features that need it, so
:func:`prune_cpu_variants` can remove the libraries that would use it.

:data:`CPU_VARIANT_FEATURES` is the variant table of the pinned llama.cpp
(``ggml_add_cpu_backend_variant`` in ``ggml/src/CMakeLists.txt``); a test reads the pinned
tree and checks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Sequence
    from pathlib import Path

__all__ = [
    "CPU_VARIANT_FEATURES",
    "LADDERS",
    "FeatureGroup",
    "cpu_variant_libraries",
    "feature_group",
    "host_ladder",
    "native_flags",
    "prune_cpu_variants",
    "with_compiler_flags",
]


@dataclass(frozen=True)
class FeatureGroup:
    """One rung: a group of CPU features that is turned off together."""

    name: str
    """The word used in records and settings: ``amx``, ``avx512ext``, ``avx512``, ``avx2``..."""
    label: str
    """How messages name it."""
    host_flags: frozenset[str]
    """``/proc/cpuinfo`` names (lowercase) any of which means the host has the group."""
    compiler_flags: tuple[str, ...]
    """GCC/Clang flags that keep a ``-march=native`` build from using it (empty: none)."""
    ggml_features: frozenset[str]
    """ggml CPU-variant features that need it (a variant with any of them is removed)."""


_X86: Final = (
    FeatureGroup(
        "amx",
        "AMX",
        frozenset({"amx_tile", "amx_int8", "amx_bf16"}),
        ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"),
        frozenset({"AMX_TILE", "AMX_INT8", "AMX_BF16"}),
    ),
    FeatureGroup(
        "avx512ext",
        "the AVX-512 extensions (VBMI, VNNI, BF16)",
        frozenset({"avx512_vbmi", "avx512vbmi", "avx512_vnni", "avx512vnni", "avx512_bf16"}),
        ("-mno-avx512vbmi", "-mno-avx512vnni", "-mno-avx512bf16"),
        frozenset({"AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"}),
    ),
    FeatureGroup(
        "avx512",
        "AVX-512",
        frozenset({"avx512f"}),
        ("-mno-avx512f",),
        frozenset({"AVX512"}),
    ),
    FeatureGroup(
        "avx2",
        "AVX2",
        frozenset({"avx2"}),
        ("-mno-avx2", "-mno-avxvnni", "-mno-fma", "-mno-bmi2"),
        frozenset({"AVX2", "AVX_VNNI", "BMI2", "FMA"}),
    ),
)
_ARM: Final = (
    FeatureGroup("sme", "SME", frozenset({"sme"}), (), frozenset({"SME"})),
    FeatureGroup("sve", "SVE and SVE2", frozenset({"sve", "sve2"}), (), frozenset({"SVE", "SVE2"})),
    FeatureGroup(
        "i8mm", "the int8 matrix multiply", frozenset({"i8mm"}), (), frozenset({"MATMUL_INT8"})
    ),
)
LADDERS: Final = {"x86_64": _X86, "aarch64": _ARM, "arm64": _ARM}
"""The rungs of each architecture, newest first."""

CPU_VARIANT_FEATURES: Final = {
    "x64": frozenset[str](),
    "sse42": frozenset({"SSE42"}),
    "sandybridge": frozenset({"SSE42", "AVX"}),
    "ivybridge": frozenset({"SSE42", "AVX", "F16C"}),
    "piledriver": frozenset({"SSE42", "AVX", "F16C", "FMA"}),
    "haswell": frozenset({"SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"}),
    "skylakex": frozenset({"SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"}),
    "cannonlake": frozenset(
        {"SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI"}
    ),
    "cascadelake": frozenset(
        {"SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI"}
    ),
    "icelake": frozenset(
        {"SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI"}
    ),
    "cooperlake": frozenset(
        {"SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI", "AVX512_BF16"}
    ),
    "zen4": frozenset(
        {"SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"}
        | {"AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"}
    ),
    "alderlake": frozenset({"SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI"}),
    "sapphirerapids": frozenset(
        {"SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"}
        | {"AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8"}
    ),
    "armv8.0_1": frozenset[str](),
    "armv8.2_1": frozenset({"DOTPROD"}),
    "armv8.2_2": frozenset({"DOTPROD", "FP16_VECTOR_ARITHMETIC"}),
    "armv8.2_3": frozenset({"DOTPROD", "FP16_VECTOR_ARITHMETIC", "SVE"}),
    "armv8.6_1": frozenset({"DOTPROD", "FP16_VECTOR_ARITHMETIC", "SVE", "MATMUL_INT8"}),
    "armv8.6_2": frozenset({"DOTPROD", "FP16_VECTOR_ARITHMETIC", "SVE", "MATMUL_INT8", "SVE2"}),
    "armv9.2_1": frozenset({"DOTPROD", "FP16_VECTOR_ARITHMETIC", "SVE", "MATMUL_INT8", "SME"}),
    "armv9.2_2": frozenset(
        {"DOTPROD", "FP16_VECTOR_ARITHMETIC", "SVE", "MATMUL_INT8", "SVE2", "SME"}
    ),
}
"""ggml's CPU variants at the pinned build (Linux and Windows names), and their features."""

_VARIANT_LIBRARY_RE: Final = re.compile(
    r"^(?:lib)?ggml-cpu-(?P<name>[A-Za-z0-9_.]+?)\.(?:so|dll|dylib)$"
)
_C_FLAGS: Final = ("-DCMAKE_C_FLAGS=", "-DCMAKE_CXX_FLAGS=")


def feature_group(name: str) -> FeatureGroup:
    """The group called ``name`` (any architecture).

    Raises:
        KeyError: no group has that name.
    """
    for ladder in LADDERS.values():
        for group in ladder:
            if group.name == name:
                return group
    raise KeyError(name)


def host_ladder(arch: str, cpu_features: Collection[str]) -> tuple[FeatureGroup, ...]:
    """The rungs of ``arch`` that this CPU has, newest first (empty for an unknown arch)."""
    return tuple(g for g in LADDERS.get(arch, ()) if g.host_flags & set(cpu_features))


def native_flags(groups: Iterable[FeatureGroup]) -> list[str]:
    """The compiler flags that turn ``groups`` off in a native build, in ladder order."""
    return [flag for group in groups for flag in group.compiler_flags]


def with_compiler_flags(cmake_args: Sequence[str], flags: Sequence[str]) -> list[str]:
    """``cmake_args`` with ``flags`` added to ``CMAKE_C_FLAGS`` and ``CMAKE_CXX_FLAGS``.

    A definition the user gave is extended in place (CMake keeps the last one); otherwise
    both are appended. No flags: ``cmake_args`` unchanged.
    """
    out = list(cmake_args)
    if not flags:
        return out
    text = " ".join(flags)
    for prefix in _C_FLAGS:
        at = max((i for i, a in enumerate(out) if a.startswith(prefix)), default=None)
        if at is None:
            out.append(prefix + text)
        else:
            value = out[at][len(prefix) :].strip()
            out[at] = f"{prefix}{value} {text}" if value else prefix + text
    return out


def cpu_variant_libraries(folder: Path) -> dict[str, Path]:
    """The ggml CPU-variant libraries in ``folder``, by variant name (real files and links)."""
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        match = _VARIANT_LIBRARY_RE.match(entry.name)
        if match is not None and match.group("name") in CPU_VARIANT_FEATURES:
            found[match.group("name")] = entry
    return found


def prune_cpu_variants(folder: Path, groups: Iterable[FeatureGroup]) -> list[str]:
    """Remove the CPU-variant libraries that use any of ``groups``; return their names.

    ggml's loader then takes the best variant left. The baseline variants (``x64``,
    ``armv8.0_1``) use none of the groups, so one always stays.
    """
    banned: set[str] = set()
    for group in groups:
        banned |= group.ggml_features
    removed: list[str] = []
    for name, path in cpu_variant_libraries(folder).items():
        if CPU_VARIANT_FEATURES[name] & banned:
            path.unlink()
            removed.append(path.name)
    return removed
