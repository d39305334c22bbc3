"""Host detection: OS, arch, libc, CPU features, GPUs.

Detection never hangs (every probe that could block runs in a child process with a timeout) and
never raises: what cannot be found is reported as unknown, with a note saying why.

The probes are thin; the parsing lives in pure functions (:func:`parse_cpuinfo`,
:func:`parse_nvidia_smi`, :func:`parse_driver_version_file`, ...) that are tested against
recorded text from Linux x86_64/aarch64, macOS and Windows hosts.

NVIDIA: the driver's CUDA version comes from ``cuDriverGetVersion`` on libcuda (callable before
``cuInit``, so no CUDA context is ever created in the caller's process); the driver version
string from ``/proc/driver/nvidia/version`` or ``nvidia-smi``; GPU names and compute
capabilities (``gpu_details=True``) from a short-lived child process that calls ``cuInit`` and
``cuDeviceGetAttribute``, falling back to ``nvidia-smi --query-gpu``. Running ``cuInit`` in a
child keeps a forking caller's CUDA usable and lets a wedged driver time out.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._proc import run_with_timeout
from llama_proc.provision.host.cuda_probe import (
    _CUDA_PROBE_SCRIPT,
    CudaProbe,
    cuda_version_from_int,
    parse_cuda_probe,
)
from llama_proc.provision.host.host_info import (
    LLAMA_CPU_FEATURES,
    SOFTWARE_VULKAN_ICDS,
    HostInfo,
    host_os,
    normalize_arch,
    normalize_os,
)
from llama_proc.provision.host.parsing import (
    _MACOS_OPTIONAL,
    NvidiaSmiInfo,
    gfx_from_target_version,
    macos_cpu_features,
    parse_amd_gfx_targets,
    parse_cpuinfo,
    parse_driver_version_file,
    parse_glibc_confstr,
    parse_kfd_properties,
    parse_musl_version,
    parse_nvidia_smi,
    parse_nvidia_smi_banner,
    windows_cpu_features,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "LLAMA_CPU_FEATURES",
    "SOFTWARE_VULKAN_ICDS",
    "CudaProbe",
    "HostInfo",
    "NvidiaSmiInfo",
    "cuda_version_from_int",
    "detect_host",
    "gfx_from_target_version",
    "host_os",
    "macos_cpu_features",
    "normalize_arch",
    "normalize_os",
    "parse_amd_gfx_targets",
    "parse_cpuinfo",
    "parse_cuda_probe",
    "parse_driver_version_file",
    "parse_glibc_confstr",
    "parse_kfd_properties",
    "parse_musl_version",
    "parse_nvidia_smi",
    "parse_nvidia_smi_banner",
    "windows_cpu_features",
]

logger = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT: Final = 5.0
"""Seconds one ``nvidia-smi`` call may take (a hung driver must not hang detection)."""
CUDA_PROBE_TIMEOUT: Final = 15.0
"""Seconds the ``cuInit`` child may take (initialising many GPUs is slow, not infinite)."""
MUSL_PROBE_TIMEOUT: Final = 2.0
SW_VERS_TIMEOUT: Final = 2.0
_TEXT_LIMIT: Final = 1 << 20
"""Read at most this many bytes of /proc files (cpuinfo on a 512-core box is ~1 MB)."""
CUDA_LIBRARIES: Final = {
    "linux": ("libcuda.so.1", "libcuda.so", "/usr/lib/wsl/lib/libcuda.so.1"),
    "windows": ("nvcuda.dll",),
}
NVIDIA_SMI_FALLBACKS: Final = {
    "linux": ("/usr/bin/nvidia-smi", "/usr/lib/wsl/lib/nvidia-smi"),
    "windows": (
        r"C:\Windows\System32\nvidia-smi.exe",
        r"C:\Program Files\NVIDIA Corporation\NVSMI\nvidia-smi.exe",
    ),
}
VULKAN_LIBRARIES: Final = {
    "linux": ("libvulkan.so.1", "libvulkan.so"),
    "macos": (
        "libvulkan.1.dylib",
        "/usr/local/lib/libvulkan.1.dylib",
        "/opt/homebrew/lib/libvulkan.1.dylib",
    ),
}
VULKAN_ICD_DIRS: Final = (
    "/etc/vulkan/icd.d",
    "/usr/local/share/vulkan/icd.d",
    "/usr/share/vulkan/icd.d",
    # NixOS keeps the driver's manifests here.
    "/run/opengl-driver/share/vulkan/icd.d",
)
"""Where the Vulkan loader looks for driver manifests (ICDs) on Linux, besides XDG_DATA_DIRS."""
VULKAN_ICD_ENV: Final = ("VK_DRIVER_FILES", "VK_ICD_FILENAMES", "VK_ADD_DRIVER_FILES")
"""Variables that name ICD manifests explicitly (they replace or extend the folders)."""
KFD_TOPOLOGY: Final = "/sys/class/kfd/kfd/topology/nodes"
"""The amdgpu kernel driver's compute (KFD) topology: one folder per CPU or GPU node."""
HIP_LIBRARIES: Final = {
    "linux": ("libamdhip64.so.7", "libamdhip64.so.6", "libamdhip64.so"),
}
"""The HIP runtime a ROCm build of llama.cpp loads; upstream's Linux ROCm archive does not
bundle it (its Windows zip does)."""
WINDOWS_HIP_GLOB: Final = "amdhip64*.dll"
"""The AMD Adrenalin driver installs the HIP runtime DLL into System32."""
ROCMINFO_TIMEOUT: Final = 10.0
"""Seconds ``rocminfo`` / ``hipInfo`` may take (they initialise the ROCm runtime)."""
DRIVER_VERSION_FILE: Final = "/proc/driver/nvidia/version"
NVIDIA_EVIDENCE: Final = {
    # Kernel driver, its control device, WSL2's GPU bridge, Jetson (Tegra) boards.
    "linux": (
        "/proc/driver/nvidia",
        "/dev/nvidiactl",
        "/dev/dxg",
        "/etc/nv_tegra_release",
        "/dev/nvhost-ctrl-gpu",
    ),
}
"""Paths of which at least one exists on any Linux host an NVIDIA GPU can be used from; with
none of them the CUDA probes are skipped (most hosts: no library loading, no processes)."""
LD_SO_CACHE: Final = "/etc/ld.so.cache"


# ----------------------------------------------------------------------------- probes
def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:  # noqa: PTH123
            return fh.read(_TEXT_LIMIT)
    except OSError:
        return None


def _run(cmd: Sequence[str], timeout: float) -> tuple[int, str] | None:
    """Run a probe command; ``(returncode, stdout+stderr)`` or None if it could not run.

    A probe that times out counts as one that could not run (its whole tree is killed).
    """
    ran = run_with_timeout(cmd, timeout)
    if ran is None or ran.returncode is None:
        return None
    return ran.returncode, ran.output


def _libc(notes: list[str]) -> tuple[str | None, str | None]:
    try:
        confstr = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        confstr = None
    parsed = parse_glibc_confstr(confstr)
    if parsed:
        return parsed
    # musl has no confstr; its dynamic loader prints a banner (and exits 1) when run bare.
    machine = platform.machine()
    for loader in (f"/lib/ld-musl-{machine}.so.1", *sorted(_glob("/lib", "ld-musl-*.so.1"))):
        if Path(loader).is_file():
            result = _run([loader], MUSL_PROBE_TIMEOUT)
            version = parse_musl_version(result[1]) if result else None
            return "musl", version
    name, version = platform.libc_ver()
    if name == "glibc" and version:
        return "glibc", version
    notes.append("could not determine the C library (neither glibc nor musl found)")
    return None, None


def _glob(folder: str, pattern: str) -> list[str]:
    try:
        return [str(p) for p in Path(folder).glob(pattern)]
    except OSError:
        return []


def _linux_cpu_features(arch: str) -> frozenset[str]:
    text = _read_text("/proc/cpuinfo") or ""
    found = set(parse_cpuinfo(text))
    # Advanced SIMD is mandatory in AArch64, whatever /proc/cpuinfo (or a container) shows.
    if arch in ("aarch64", "arm64"):
        found.add("neon")
    return frozenset(found)


def _sysctl(name: str, *, as_int: bool) -> int | str | None:
    """``sysctlbyname`` through ctypes (macOS); None when the key does not exist."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sysctlbyname
    except (OSError, AttributeError):
        return None
    size = ctypes.c_size_t(0)
    if fn(name.encode(), None, ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        return None
    if as_int:
        value = ctypes.c_int64(0)
        size = ctypes.c_size_t(ctypes.sizeof(value))
        if fn(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)):
            return None
        # 4-byte sysctls fill only the low half of the little-endian int64.
        return int(value.value)
    buf = ctypes.create_string_buffer(size.value + 1)
    if fn(name.encode(), buf, ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        return None
    return buf.value.decode("utf-8", errors="replace")


def _macos_facts() -> tuple[frozenset[str], bool, bool, str | None]:
    optional: dict[str, int] = {}
    for key in (*_MACOS_OPTIONAL, "hw.optional.arm64"):
        value = _sysctl(key, as_int=True)
        if isinstance(value, int):
            optional[key] = value
    features = _sysctl("machdep.cpu.features", as_int=False)
    leaf7 = _sysctl("machdep.cpu.leaf7_features", as_int=False)
    cpu = macos_cpu_features(
        optional,
        features if isinstance(features, str) else "",
        leaf7 if isinstance(leaf7, str) else "",
    )
    translated = _sysctl("sysctl.proc_translated", as_int=True) == 1
    apple = optional.get("hw.optional.arm64", 0) == 1 or platform.machine() == "arm64"
    version = platform.mac_ver()[0] or None
    if version is None or version.startswith("10.16"):
        # Interpreters built against an old SDK see the compatibility version 10.16.
        product = _sysctl("kern.osproductversion", as_int=False)
        if isinstance(product, str) and product:
            version = product
    return cpu, apple, translated, version


def _windows_cpu_features(arch: str) -> frozenset[str]:
    try:
        kernel32 = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined,unused-ignore]
        fn = kernel32.IsProcessorFeaturePresent
    except (OSError, AttributeError):
        return frozenset()
    return windows_cpu_features(lambda code: bool(fn(code)), arch)


def _os_version(os_name: str) -> str | None:
    if os_name == "windows":
        try:
            v = sys.getwindowsversion()  # type: ignore[attr-defined,unused-ignore]
        except AttributeError:
            return platform.version() or None
        return f"{v.major}.{v.minor}.{v.build}"
    return platform.release() or None


def _load_library(names: Sequence[str]) -> Any:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _cuda_driver_version(os_name: str) -> str | None:
    """CUDA version the driver supports, via ``cuDriverGetVersion`` (no ``cuInit``)."""
    lib = _load_library(CUDA_LIBRARIES.get(os_name, ()))
    if lib is None:
        return None
    value = ctypes.c_int(0)
    try:
        rc = lib.cuDriverGetVersion(ctypes.byref(value))
    except (AttributeError, OSError):
        return None
    return cuda_version_from_int(value.value) if rc == 0 else None


def _cuda_devices(os_name: str, notes: list[str]) -> CudaProbe | None:
    """GPU names and compute capabilities from a ``cuInit`` child process."""
    names = CUDA_LIBRARIES.get(os_name, ())
    if not names:
        return None
    result = _run([sys.executable, "-I", "-c", _CUDA_PROBE_SCRIPT, *names], CUDA_PROBE_TIMEOUT)
    if result is None:
        notes.append(f"the CUDA device probe did not answer within {CUDA_PROBE_TIMEOUT:g}s")
        return None
    probe = parse_cuda_probe(result[1])
    if probe.error:
        notes.append(f"CUDA device probe: {probe.error}")
    return probe


def _nvidia_smi_path(os_name: str) -> str | None:
    found = shutil.which("nvidia-smi")
    if found:
        return found
    for candidate in NVIDIA_SMI_FALLBACKS.get(os_name, ()):
        if Path(candidate).is_file():
            return candidate
    return None


def _nvidia_smi(smi: str, notes: list[str]) -> NvidiaSmiInfo | None:
    base = [smi, "--format=csv,noheader"]
    for query in ("driver_version,name,compute_cap", "driver_version,name"):
        result = _run([*base, f"--query-gpu={query}"], NVIDIA_SMI_TIMEOUT)
        if result is None:
            notes.append(f"nvidia-smi did not answer within {NVIDIA_SMI_TIMEOUT:g}s")
            return None
        rc, out = result
        info = parse_nvidia_smi(out) if rc == 0 else None
        if info is not None:
            return info
    notes.append(f"nvidia-smi failed: {out.strip().splitlines()[-1] if out.strip() else rc}")
    return None


@dataclass
class _Nvidia:
    driver: str | None = None
    cuda: str | None = None
    gpus: tuple[str, ...] = ()
    caps: tuple[str, ...] = ()


def _nvidia(os_name: str, notes: list[str], *, gpu_details: bool) -> _Nvidia:
    info = _Nvidia()
    if os_name not in CUDA_LIBRARIES:
        return info
    evidence = NVIDIA_EVIDENCE.get(os_name)
    if evidence is not None and not any(Path(p).exists() for p in evidence):
        return info  # no NVIDIA driver: the common fast path
    if os_name == "linux":
        text = _read_text(DRIVER_VERSION_FILE)
        info.driver = parse_driver_version_file(text) if text else None
    info.cuda = _cuda_driver_version(os_name)
    smi = _nvidia_smi_path(os_name)
    if info.driver is None and info.cuda is None and smi is None:
        return info
    if gpu_details and info.cuda is not None:
        probe = _cuda_devices(os_name, notes)
        if probe is not None:
            info.gpus, info.caps = probe.gpus, probe.compute_capabilities
            info.cuda = info.cuda or probe.cuda_version
    if smi is not None and (info.driver is None or (gpu_details and not info.gpus)):
        smi_info = _nvidia_smi(smi, notes)
        if smi_info is not None:
            info.driver = info.driver or smi_info.driver
            if not info.gpus:
                info.gpus, info.caps = smi_info.gpus, smi_info.compute_capabilities
    if smi is not None and info.cuda is None and info.driver is not None and gpu_details:
        result = _run([smi], NVIDIA_SMI_TIMEOUT)
        info.cuda = parse_nvidia_smi_banner(result[1]) if result else None
    if info.driver is None and info.cuda is not None:
        notes.append(
            "libcuda answered but the driver version is unknown (no "
            f"{DRIVER_VERSION_FILE} and no working nvidia-smi)"
        )
    return info


def _linux_has_library(names: Sequence[str]) -> bool | None:
    """Whether the dynamic loader would find one of ``names``; None = cannot tell cheaply.

    Looks in ``LD_LIBRARY_PATH`` and in the loader's cache (the names are stored there as
    NUL-terminated strings), which is what ``ldconfig -p`` reads, without loading anything.
    """
    for folder in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if folder and any(Path(folder, name).exists() for name in names):
            return True
    try:
        cache = Path(LD_SO_CACHE).read_bytes()
    except OSError:
        return None
    return any(name.encode() + b"\0" in cache for name in names)


def _vulkan(os_name: str) -> bool:
    if os_name == "windows":
        root = os.environ.get("SYSTEMROOT", r"C:\Windows")
        return Path(root, "System32", "vulkan-1.dll").is_file()
    names = VULKAN_LIBRARIES.get(os_name, ())
    if os_name == "linux":
        found = _linux_has_library(names)
        if found is not None:
            return found
    # Loading the loader library creates no Vulkan instance and enumerates no ICDs.
    return _load_library(names) is not None


def _vulkan_icds(os_name: str) -> tuple[str, ...]:
    """File names of the Vulkan ICD manifests the loader would read (Linux only)."""
    if os_name != "linux":
        return ()
    named = [
        Path(item).name
        for var in VULKAN_ICD_ENV
        for item in os.environ.get(var, "").split(os.pathsep)
        if item.strip()
    ]
    xdg = os.environ.get("XDG_DATA_DIRS", "").split(os.pathsep)
    folders = [*VULKAN_ICD_DIRS, *(f"{d}/vulkan/icd.d" for d in xdg if d)]
    found = [Path(f).name for folder in folders for f in _glob(folder, "*.json")]
    return tuple(sorted(set(named + found)))


@dataclass
class _Amd:
    driver: bool = False
    gpus: tuple[str, ...] = ()
    hip_runtime: bool = False


def _amd_tool(names: Sequence[str], notes: list[str]) -> tuple[str, ...]:
    for name in names:
        tool = shutil.which(name)
        if tool is None:
            continue
        result = _run([tool], ROCMINFO_TIMEOUT)
        if result is None:
            notes.append(f"{name} did not answer within {ROCMINFO_TIMEOUT:g}s")
            return ()
        return parse_amd_gfx_targets(result[1])
    return ()


def _amd(os_name: str, notes: list[str]) -> _Amd:
    info = _Amd()
    if os_name == "linux":
        nodes = _glob(KFD_TOPOLOGY, "*/properties")
        if not nodes:
            return info  # no amdgpu compute driver: the common fast path
        info.driver = True
        targets = (parse_kfd_properties(_read_text(n) or "") for n in sorted(nodes))
        info.gpus = tuple(dict.fromkeys(t for t in targets if t))
        if not info.gpus:
            info.gpus = _amd_tool(("rocminfo",), notes)
        info.hip_runtime = _linux_has_library(HIP_LIBRARIES["linux"]) is True
    elif os_name == "windows":
        root = os.environ.get("SYSTEMROOT", r"C:\Windows")
        if not _glob(str(Path(root, "System32")), WINDOWS_HIP_GLOB):
            return info
        # Upstream's Windows ROCm zip carries its own HIP runtime; the driver must be there.
        info.driver = info.hip_runtime = True
        info.gpus = _amd_tool(("hipInfo", "hipinfo"), notes)
    if info.driver and not info.gpus:
        notes.append("an AMD GPU driver is present but no gfx target could be read")
    return info


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _safe(probe: Callable[[], Any], default: Any, what: str, notes: list[str]) -> Any:
    try:
        return probe()
    except Exception as err:  # detection must never raise
        logger.debug("host probe %s failed", what, exc_info=True)
        notes.append(f"{what} probe failed: {err}")
        return default


def detect_host(*, gpu_details: bool = True, refresh: bool = False) -> HostInfo:
    """Detect this host. Never raises and never hangs; unknown facts are left empty.

    The result is cached for the life of the process (pass ``refresh=True`` to probe again).

    Args:
        gpu_details: also list GPU names and compute capabilities (runs ``cuInit`` in a child
            process, or ``nvidia-smi``; adds tens to hundreds of milliseconds on NVIDIA hosts).
            Variant selection does not need them (the resolution ladder passes False); CUDA
            builds and ``doctor`` do.
        refresh: ignore the cached result.
    """
    if refresh:
        _detect.cache_clear()
    return _detect(gpu_details=gpu_details)


@functools.cache
def _detect(*, gpu_details: bool) -> HostInfo:
    notes: list[str] = []
    os_name = host_os()
    arch = normalize_arch(platform.machine(), os_name, is_64bit=sys.maxsize > 2**32)
    host = HostInfo(
        os=os_name,
        arch=arch,
        os_version=_safe(lambda: _os_version(os_name), None, "OS version", notes),
        cpu_count=_safe(_cpu_count, 1, "CPU count", notes),
    )
    if os_name == "linux":
        libc, libc_version = _safe(lambda: _libc(notes), (None, None), "libc", notes)
        release = (host.os_version or "").lower()
        host = replace(
            host,
            libc=libc,
            libc_version=libc_version,
            cpu_features=_safe(lambda: _linux_cpu_features(arch), frozenset(), "CPU", notes),
            wsl="microsoft" in release or "wsl" in release,
        )
    elif os_name == "macos":
        cpu, apple, translated, version = _safe(
            _macos_facts, (frozenset(), False, False, host.os_version), "macOS sysctl", notes
        )
        host = replace(
            host, cpu_features=cpu, apple_silicon=apple, rosetta=translated, os_version=version
        )
    elif os_name == "windows":
        host = replace(
            host,
            cpu_features=_safe(lambda: _windows_cpu_features(arch), frozenset(), "CPU", notes),
        )
    nvidia = _safe(
        lambda: _nvidia(os_name, notes, gpu_details=gpu_details), _Nvidia(), "NVIDIA", notes
    )
    vulkan = _safe(lambda: _vulkan(os_name), False, "Vulkan", notes)  # noqa: FBT003
    icds = _safe(lambda: _vulkan_icds(os_name), (), "Vulkan ICD", notes)
    amd = _safe(lambda: _amd(os_name, notes), _Amd(), "AMD GPU", notes)
    return replace(
        host,
        nvidia_driver=nvidia.driver,
        cuda_version=nvidia.cuda,
        gpus=nvidia.gpus,
        compute_capabilities=nvidia.caps,
        vulkan=vulkan,
        vulkan_icds=icds,
        amd_driver=amd.driver,
        amd_gpus=amd.gpus,
        hip_runtime=amd.hip_runtime,
        notes=tuple(notes),
    )
