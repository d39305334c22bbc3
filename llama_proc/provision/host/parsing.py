"""Pure parsers for what a host reports.

cpuinfo, libc versions, driver and nvidia-smi text, AMD GPU targets, Windows and macOS CPU
features. Tested against recorded text from Linux x86_64/aarch64, macOS and Windows hosts; the
probes that produce the text live in :mod:`llama_proc.provision.host.platform`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


# Aliases so manifest requirements can use the names llama.cpp's CMake options use.
_CPU_ALIASES: Final = {
    "pni": "sse3",
    "asimd": "neon",
    "asimddp": "dotprod",
    "asimdhp": "fp16",
    "svei8mm": "sve_i8mm",
}

# winnt.h PF_* constants for IsProcessorFeaturePresent.
_WINDOWS_PF: Final = {
    "sse": 6,
    "sse2": 10,
    "sse3": 13,
    "neon": 19,
    "rdrand": 28,
    "ssse3": 36,
    "sse4_1": 37,
    "sse4_2": 38,
    "avx": 39,
    "avx2": 40,
    "avx512f": 41,
    "dotprod": 43,
}

# sysctl hw.optional.* keys on macOS -> our feature names.
_MACOS_OPTIONAL: Final = {
    "hw.optional.sse3": "sse3",
    "hw.optional.supplementalsse3": "ssse3",
    "hw.optional.sse4_1": "sse4_1",
    "hw.optional.sse4_2": "sse4_2",
    "hw.optional.avx1_0": "avx",
    "hw.optional.avx2_0": "avx2",
    "hw.optional.fma": "fma",
    "hw.optional.f16c": "f16c",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.avx512bw": "avx512bw",
    "hw.optional.avx512vl": "avx512vl",
    "hw.optional.avx512vnni": "avx512_vnni",
    "hw.optional.neon": "neon",
    "hw.optional.neon_fp16": "fp16",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.arm.FEAT_SME": "sme",
}

# machdep.cpu.features / leaf7_features tokens (upper case, Intel Macs) -> our names.
_MACOS_TOKENS: Final = {
    "SSE3": "sse3",
    "SSSE3": "ssse3",
    "SSE4.1": "sse4_1",
    "SSE4.2": "sse4_2",
    "AVX1.0": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512VL": "avx512vl",
    "AVX512VNNI": "avx512_vnni",
    "BMI2": "bmi2",
    "POPCNT": "popcnt",
}


def parse_cpuinfo(text: str) -> frozenset[str]:
    """CPU features from Linux ``/proc/cpuinfo`` (x86 ``flags`` or Arm ``Features`` lines).

    Heterogeneous cores may differ, so only features every core lists are kept. Kernel names are
    kept and a few aliases are added (``pni`` -> ``sse3``, ``asimd`` -> ``neon``, ``asimddp`` ->
    ``dotprod``).
    """
    sets: list[set[str]] = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            sets.append({tok.lower() for tok in value.split()})
    if not sets:
        return frozenset()
    common = set.intersection(*sets)
    common |= {_CPU_ALIASES[f] for f in common if f in _CPU_ALIASES}
    return frozenset(common)


def parse_glibc_confstr(text: str | None) -> tuple[str, str] | None:
    """``os.confstr("CS_GNU_LIBC_VERSION")`` (``"glibc 2.36"``) -> ``("glibc", "2.36")``."""
    if not text:
        return None
    match = re.match(r"^\s*glibc\s+([0-9]+\.[0-9]+(?:\.[0-9]+)?)", text)
    return ("glibc", match.group(1)) if match else None


def parse_musl_version(text: str) -> str | None:
    """The version from musl's loader banner (``musl libc (x86_64)`` / ``Version 1.2.4``)."""
    if "musl" not in text.lower():
        return None
    match = re.search(r"^Version\s+([0-9][0-9.]*)", text, re.MULTILINE)
    return match.group(1) if match else None


def parse_driver_version_file(text: str) -> str | None:
    """The NVIDIA driver version from ``/proc/driver/nvidia/version``.

    Handles the proprietary (``Kernel Module  550.54.15``) and the open
    (``Open Kernel Module for x86_64  550.54.15``) modules.
    """
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+([0-9]+\.[0-9]+(?:\.[0-9]+)?)\b", text)
    return match.group(1) if match else None


@dataclass(frozen=True)
class NvidiaSmiInfo:
    """What ``nvidia-smi --query-gpu=driver_version,name,compute_cap`` said."""

    driver: str | None
    gpus: tuple[str, ...]
    compute_capabilities: tuple[str, ...]


def parse_nvidia_smi(text: str) -> NvidiaSmiInfo | None:
    """Parse ``--format=csv,noheader`` lines: ``550.54.15, NVIDIA H100 80GB HBM3, 9.0``.

    Two columns (driver, name) are accepted for drivers too old to know ``compute_cap``.
    Returns None when no line has that shape (an error message, an empty answer).
    """
    driver: str | None = None
    gpus: list[str] = []
    caps: list[str] = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 2 or not re.match(r"^[0-9]+\.[0-9]+(\.[0-9]+)?$", cols[0]):
            continue
        driver = driver or cols[0]
        # GPU names may hold commas in theory; the compute capability is always last.
        has_cap = len(cols) >= 3 and re.match(r"^[0-9]+\.[0-9]+$", cols[-1]) is not None
        name = ", ".join(cols[1:-1] if has_cap or len(cols) >= 3 else cols[1:])
        if name and name != "[N/A]":
            gpus.append(name)
        if has_cap:
            caps.append(cols[-1])
    if driver is None:
        return None
    return NvidiaSmiInfo(driver, tuple(gpus), tuple(caps))


def parse_nvidia_smi_banner(text: str) -> str | None:
    """The ``CUDA Version: 12.4`` from plain ``nvidia-smi`` output."""
    match = re.search(r"CUDA Version\s*:\s*([0-9]+\.[0-9]+)", text)
    return match.group(1) if match else None


def gfx_from_target_version(value: int) -> str | None:
    """KFD's ``gfx_target_version`` (``110000``, ``90010``) -> ``gfx1100``, ``gfx90a``.

    The number is ``major * 10000 + minor * 100 + stepping``; the gfx name writes minor and
    stepping as one hex digit each. 0 (a CPU node) gives None.
    """
    if value <= 0:
        return None
    major, minor, stepping = value // 10000, (value // 100) % 100, value % 100
    return f"gfx{major}{minor:x}{stepping:x}"


def parse_kfd_properties(text: str) -> str | None:
    """The gfx target of one KFD topology node's ``properties`` file (None for CPU nodes)."""
    match = re.search(r"^gfx_target_version\s+([0-9]+)\s*$", text, re.MULTILINE)
    return gfx_from_target_version(int(match.group(1))) if match else None


def parse_amd_gfx_targets(text: str) -> tuple[str, ...]:
    """AMD gfx targets from ``rocminfo`` or ``hipInfo`` output.

    ``rocminfo`` prints ``Name: gfx1100`` per agent, ``hipInfo`` ``gcnArchName:
    gfx90a:sramecc+:xnack-``; targets come back in order, without duplicates or feature suffixes.
    """
    found = re.findall(
        r"^\s*(?:Name|gcnArchName)\s*:\s*(gfx[0-9a-f]+)(?::\S*)?\s*$", text, re.MULTILINE
    )
    return tuple(dict.fromkeys(found))


def windows_cpu_features(is_present: Callable[[int], bool], arch: str) -> frozenset[str]:
    """CPU features from ``IsProcessorFeaturePresent`` (``is_present(PF_*)``).

    Windows has no PF_ constants for FMA and F16C; every CPU with AVX2 has both (Haswell,
    Excavator and later), so they are implied by AVX2.
    """
    found: set[str] = set()
    for name, code in _WINDOWS_PF.items():
        with contextlib.suppress(Exception):
            if is_present(code):
                found.add(name)
    if "avx2" in found:
        found |= {"fma", "f16c"}
    if arch in ("arm64", "aarch64"):
        found.add("neon")
    return frozenset(found)


def macos_cpu_features(
    optional: Mapping[str, int], features: str = "", leaf7_features: str = ""
) -> frozenset[str]:
    """CPU features from macOS sysctls.

    Args:
        optional: ``hw.optional.*`` values that were readable (1 = present).
        features: ``machdep.cpu.features`` (Intel only).
        leaf7_features: ``machdep.cpu.leaf7_features`` (Intel only; AVX2, AVX512*).
    """
    found = {name for key, name in _MACOS_OPTIONAL.items() if optional.get(key, 0) == 1}
    for token in f"{features} {leaf7_features}".upper().split():
        if token in _MACOS_TOKENS:
            found.add(_MACOS_TOKENS[token])
    if optional.get("hw.optional.arm64", 0) == 1 and optional.get("hw.optional.neon", 1) != 0:
        found.add("neon")
    return frozenset(found)
