"""Host detection: pure parsers against recorded text, and the probes that can run here."""

from __future__ import annotations

import os
import platform as pyplatform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from llama_proc.provision.host import platform as hostmod
from llama_proc.provision.host.cuda_probe import cuda_version_from_int, parse_cuda_probe
from llama_proc.provision.host.host_info import HostInfo, normalize_arch, normalize_os
from llama_proc.provision.host.parsing import (
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
from llama_proc.provision.host.platform import detect_host

if TYPE_CHECKING:
    from collections.abc import Sequence


@pytest.fixture(autouse=True)
def _fresh_detection():
    """Detection is cached per process; fakes must not leak into other tests."""
    hostmod._detect.cache_clear()
    yield
    hostmod._detect.cache_clear()


# ----------------------------------------------------------------------------- recorded text
CPUINFO_X86 = """\
processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model name	: AMD EPYC 7B13
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm avx2 bmi1 bmi2 erms
bugs		: sysret_ss_attrs spectre_v1 spectre_v2
bogomips	: 4899.99

processor	: 1
vendor_id	: AuthenticAMD
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm avx2 bmi1 bmi2 erms
"""

# A hybrid part where only the first core reports AVX-512: the common set must drop it.
CPUINFO_X86_HYBRID = """\
processor	: 0
flags		: sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512bw
processor	: 1
flags		: sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma f16c
"""

CPUINFO_ARM64 = """\
processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x1
CPU part	: 0xd40
CPU revision	: 1

processor	: 1
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
"""

# Raspberry Pi 4 running a 32-bit style kernel listing (no asimd): nothing invented.
CPUINFO_ARMV7 = """\
processor	: 0
model name	: ARMv7 Processor rev 3 (v7l)
Features	: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
"""

DRIVER_PROPRIETARY = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
DRIVER_OPEN = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  560.35.03  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Fri Aug 16 21:42:42 UTC 2024\n"
    "GCC version:  gcc version 13.2.0 (Ubuntu 13.2.0-23ubuntu4)\n"
)
DRIVER_ARM = (
    "NVRM version: NVIDIA UNIX aarch64 Kernel Module  535.104.05  Sat Aug 19 01:13:56 UTC 2023\n"
)

SMI_H100 = "550.54.15, NVIDIA H100 80GB HBM3, 9.0\n550.54.15, NVIDIA H100 80GB HBM3, 9.0\n"
SMI_WINDOWS = "551.61, NVIDIA GeForce RTX 4090, 8.9\r\n"
SMI_OLD = "470.223.02, Tesla T4\n"
SMI_BAD_FIELD = 'Field "compute_cap" is not a valid field to query.\n\n'
SMI_BANNER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""
MUSL_BANNER = """\
musl libc (x86_64)
Version 1.2.4
Dynamic Program Loader
Usage: /lib/ld-musl-x86_64.so.1 [options] [--] pathname [args]
"""

MAC_INTEL_FEATURES = (
    "FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36 CLFSH DS ACPI MMX "
    "FXSR SSE SSE2 SS HTT TM PBE SSE3 PCLMULQDQ DTES64 MON DSCPL VMX EST TM2 SSSE3 FMA CX16 TPR "
    "PDCM SSE4.1 SSE4.2 x2APIC MOVBE POPCNT AES PCID XSAVE OSXSAVE SEGLIM64 TSCTMR AVX1.0 RDRAND "
    "F16C"
)
MAC_INTEL_LEAF7 = (
    "RDWRFSGS TSC_THREAD_OFFSET SGX BMI1 AVX2 SMEP BMI2 ERMS INVPCID FPU_CSDS MPX RDSEED ADX SMAP "
    "CLFSOPT IPT MDCLEAR TSXFA IBRS STIBP L1DF SSBD"
)
MAC_M1_OPTIONAL = {
    "hw.optional.arm64": 1,
    "hw.optional.neon": 1,
    "hw.optional.neon_fp16": 1,
    "hw.optional.arm.FEAT_DotProd": 1,
    "hw.optional.arm.FEAT_I8MM": 0,
    "hw.optional.arm.FEAT_BF16": 0,
    "hw.optional.arm.FEAT_FP16": 1,
}


# ----------------------------------------------------------------------------- pure parsers
@pytest.mark.parametrize(
    ("sys_platform", "expected"),
    [
        pytest.param("linux", "linux", id="linux"),
        pytest.param("darwin", "macos", id="macos"),
        pytest.param("win32", "windows", id="windows"),
        pytest.param("cygwin", "windows", id="cygwin"),
        pytest.param("freebsd14", "freebsd14", id="other-passes-through"),
    ],
)
def test_normalize_os(sys_platform, expected):
    assert normalize_os(sys_platform) == expected


@pytest.mark.parametrize(
    ("machine", "os_name", "is_64bit", "expected"),
    [
        pytest.param("x86_64", "linux", True, "x86_64", id="linux-x86_64"),
        pytest.param("AMD64", "windows", True, "x86_64", id="windows-AMD64"),
        pytest.param("x86_64", "macos", True, "x86_64", id="intel-mac-or-rosetta"),
        pytest.param("aarch64", "linux", True, "aarch64", id="linux-aarch64"),
        pytest.param("arm64", "linux", True, "aarch64", id="linux-arm64-spelling"),
        pytest.param("arm64", "macos", True, "arm64", id="macos-arm64"),
        pytest.param("ARM64", "windows", True, "arm64", id="windows-ARM64"),
        pytest.param("AMD64", "windows", False, "x86", id="32-bit-python-on-64-bit-windows"),
        pytest.param("i686", "linux", False, "x86", id="i686"),
        pytest.param("armv7l", "linux", False, "armv7l", id="armv7"),
        pytest.param("", "linux", True, "unknown", id="empty"),
    ],
)
def test_normalize_arch(machine, os_name, is_64bit, expected):
    assert normalize_arch(machine, os_name, is_64bit=is_64bit) == expected


def test_parse_cpuinfo_x86():
    features = parse_cpuinfo(CPUINFO_X86)
    assert {"sse4_2", "avx", "avx2", "fma", "f16c"} <= features
    assert "sse3" in features  # alias of the kernel's "pni"
    assert "avx512f" not in features
    assert "sysret_ss_attrs" not in features  # the bugs line is not a feature list


def test_parse_cpuinfo_keeps_only_features_every_core_has():
    features = parse_cpuinfo(CPUINFO_X86_HYBRID)
    assert "avx2" in features
    assert "avx512f" not in features
    assert "avx512bw" not in features


def test_parse_cpuinfo_arm64_adds_llama_cpp_names():
    features = parse_cpuinfo(CPUINFO_ARM64)
    assert {"neon", "dotprod", "sve", "i8mm", "bf16", "asimd"} <= features
    assert "sve_i8mm" in features


def test_parse_cpuinfo_armv7_reports_what_it_says():
    assert "neon" in parse_cpuinfo(CPUINFO_ARMV7)
    assert "dotprod" not in parse_cpuinfo(CPUINFO_ARMV7)


@pytest.mark.parametrize("text", ["", "processor : 0\nmodel name : x\n"])
def test_parse_cpuinfo_without_feature_lines(text):
    assert parse_cpuinfo(text) == frozenset()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("glibc 2.36", ("glibc", "2.36"), id="debian12"),
        pytest.param("glibc 2.17", ("glibc", "2.17"), id="centos7"),
        pytest.param("glibc 2.39.9000", ("glibc", "2.39.9000"), id="three-part"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="none"),
        pytest.param("uclibc 1.0", None, id="other"),
    ],
)
def test_parse_glibc_confstr(text, expected):
    assert parse_glibc_confstr(text) == expected


def test_parse_musl_version():
    assert parse_musl_version(MUSL_BANNER) == "1.2.4"
    assert parse_musl_version("ld.so: unknown option") is None
    assert parse_musl_version("musl libc (aarch64)\n") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(DRIVER_PROPRIETARY, "550.54.15", id="proprietary"),
        pytest.param(DRIVER_OPEN, "560.35.03", id="open-kernel-module"),
        pytest.param(DRIVER_ARM, "535.104.05", id="aarch64"),
        pytest.param("garbage", None, id="garbage"),
        pytest.param("", None, id="empty"),
    ],
)
def test_parse_driver_version_file(text, expected):
    assert parse_driver_version_file(text) == expected


def test_parse_nvidia_smi_two_gpus():
    info = parse_nvidia_smi(SMI_H100)
    assert info is not None
    assert info.driver == "550.54.15"
    assert info.gpus == ("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3")
    assert info.compute_capabilities == ("9.0", "9.0")


def test_parse_nvidia_smi_windows_line_endings():
    info = parse_nvidia_smi(SMI_WINDOWS)
    assert info is not None
    assert (info.driver, info.gpus, info.compute_capabilities) == (
        "551.61",
        ("NVIDIA GeForce RTX 4090",),
        ("8.9",),
    )


def test_parse_nvidia_smi_old_driver_without_compute_cap():
    info = parse_nvidia_smi(SMI_OLD)
    assert info is not None
    assert (info.driver, info.gpus, info.compute_capabilities) == ("470.223.02", ("Tesla T4",), ())


@pytest.mark.parametrize(
    "text",
    [
        SMI_BAD_FIELD,
        "",
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
    ],
)
def test_parse_nvidia_smi_errors(text):
    assert parse_nvidia_smi(text) is None


def test_parse_nvidia_smi_banner():
    assert parse_nvidia_smi_banner(SMI_BANNER) == "12.4"
    assert parse_nvidia_smi_banner("no banner") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(12040, "12.4"), (11080, "11.8"), (12000, "12.0"), (13010, "13.1"), (0, None), (-1, None)],
)
def test_cuda_version_from_int(value, expected):
    assert cuda_version_from_int(value) == expected


def test_parse_cuda_probe():
    ok = parse_cuda_probe(
        '{"cuda": 12040, "init": 0, "devices": [["NVIDIA H100 80GB HBM3", "9.0"], ["NVIDIA A10", "8.6"]]}\n'
    )
    assert ok.cuda_version == "12.4"
    assert ok.gpus == ("NVIDIA H100 80GB HBM3", "NVIDIA A10")
    assert ok.compute_capabilities == ("9.0", "8.6")
    assert ok.error is None
    failed = parse_cuda_probe('{"cuda": 12040, "init": 100}')
    assert failed.cuda_version == "12.4"
    assert failed.gpus == ()
    assert "100" in (failed.error or "")
    assert parse_cuda_probe('{"error": "libcuda not found"}').error == "libcuda not found"
    assert parse_cuda_probe("Segmentation fault").error is not None
    assert parse_cuda_probe("").gpus == ()


def test_windows_cpu_features_avx2_machine():
    present = {6, 10, 13, 36, 37, 38, 39, 40}
    features = windows_cpu_features(lambda code: code in present, "x86_64")
    assert {"sse4_2", "avx", "avx2", "fma", "f16c"} <= features
    assert "avx512f" not in features
    assert "neon" not in features


def test_windows_cpu_features_old_machine_has_no_implied_fma():
    present = {6, 10, 13, 36, 37, 38}
    features = windows_cpu_features(lambda code: code in present, "x86_64")
    assert "sse4_2" in features
    assert not {"avx", "avx2", "fma", "f16c"} & features


def test_windows_cpu_features_arm64():
    features = windows_cpu_features(lambda code: code in {19, 43}, "arm64")
    assert {"neon", "dotprod"} <= features


def test_windows_cpu_features_probe_errors_are_swallowed():
    def broken(_code: int) -> bool:
        msg = "no kernel32"
        raise OSError(msg)

    assert windows_cpu_features(broken, "x86_64") == frozenset()


def test_macos_cpu_features_intel():
    optional = {"hw.optional.avx1_0": 1, "hw.optional.avx2_0": 1, "hw.optional.arm64": 0}
    features = macos_cpu_features(optional, MAC_INTEL_FEATURES, MAC_INTEL_LEAF7)
    assert {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"} <= features
    assert "neon" not in features
    assert "avx512f" not in features


def test_macos_cpu_features_apple_silicon():
    features = macos_cpu_features(MAC_M1_OPTIONAL)
    assert {"neon", "dotprod", "fp16"} <= features
    assert "i8mm" not in features
    assert "avx2" not in features


def test_macos_cpu_features_rosetta_process_sees_intel_sysctls():
    # Under Rosetta the machdep strings describe the emulated CPU (no AVX); arm64 is still 1.
    optional = {"hw.optional.arm64": 1}
    features = macos_cpu_features(optional, "FPU SSE SSE2 SSE3 SSSE3 SSE4.1 SSE4.2", "")
    assert "sse4_2" in features
    assert "avx2" not in features


def test_summary_and_dict():
    host = HostInfo(
        os="linux",
        arch="x86_64",
        libc="glibc",
        libc_version="2.35",
        cpu_features=frozenset({"avx2", "avx", "fma"}),
        nvidia_driver="550.54.15",
        cuda_version="12.4",
        gpus=("NVIDIA H100",),
        compute_capabilities=("9.0",),
    )
    assert host.summary() == (
        "linux-x86_64, glibc 2.35, avx2, NVIDIA driver 550.54.15 (CUDA 12.4, sm 9.0)"
    )
    data = host.to_dict()
    assert data["platform"] == "linux-x86_64"
    assert data["gpus"] == ["NVIDIA H100"]
    assert data["summary"] == host.summary()


# ----------------------------------------------------------------------------- this host
def test_detect_host_on_this_machine():
    start = time.monotonic()
    host = detect_host()
    assert time.monotonic() - start < 30
    assert host.os == normalize_os(sys.platform)
    assert host.arch == normalize_arch(pyplatform.machine(), host.os, is_64bit=sys.maxsize > 2**32)
    assert host.cpu_count >= 1
    if host.os == "linux":
        confstr = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
        if confstr and confstr.startswith("glibc"):
            assert host.libc == "glibc"
            assert host.libc_version == confstr.split()[1]
        cpuinfo = Path("/proc/cpuinfo").read_text()
        assert parse_cpuinfo(cpuinfo) <= host.cpu_features
    if host.arch in ("x86_64", "aarch64", "arm64"):
        assert host.cpu_features, "a 64-bit CPU has SIMD features"


def test_detect_host_is_cached_and_refreshable():
    first = detect_host(gpu_details=False)
    assert detect_host(gpu_details=False) is first
    again = detect_host(gpu_details=False, refresh=True)
    assert again == first
    assert again is not first


# ----------------------------------------------------------------------------- NVIDIA probes
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux probes")


def _no_real_nvidia(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    *,
    driver_file: str | None = None,
    libs: Sequence[str] = (),
    evidence: bool = True,
) -> Path:
    """Point the NVIDIA probes at fakes only (no real libcuda, /proc file or nvidia-smi)."""
    version_file = tmp_path / "nvidia-version"
    if driver_file is not None:
        version_file.write_text(driver_file)
    device = tmp_path / "nvidiactl"
    if evidence:
        device.write_text("")
    monkeypatch.setattr(hostmod, "NVIDIA_EVIDENCE", {"linux": (str(device),)})
    monkeypatch.setattr(hostmod, "DRIVER_VERSION_FILE", str(version_file))
    monkeypatch.setattr(hostmod, "CUDA_LIBRARIES", {"linux": tuple(libs)})
    monkeypatch.setattr(hostmod, "NVIDIA_SMI_FALLBACKS", {})
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return bindir


def _fake_smi(bindir: Path, body: str) -> Path:
    smi = bindir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + body)
    smi.chmod(0o755)
    return smi


@needs_linux
def test_no_nvidia_anywhere(monkeypatch, tmp_path):
    _no_real_nvidia(monkeypatch, tmp_path)
    host = detect_host()
    assert host.nvidia_driver is None
    assert host.cuda_version is None
    assert host.gpus == ()


@needs_linux
def test_nvidia_smi_fallback(monkeypatch, tmp_path):
    bindir = _no_real_nvidia(monkeypatch, tmp_path)
    _fake_smi(
        bindir,
        textwrap.dedent(
            f"""\
            case "$*" in
              *--query-gpu*) printf '{SMI_H100.replace(chr(10), chr(92) + "n")}' ;;
              *) cat <<'EOF'
            {SMI_BANNER}EOF
            ;;
            esac
            """
        ),
    )
    host = detect_host()
    assert host.nvidia_driver == "550.54.15"
    assert host.gpus == ("NVIDIA H100 80GB HBM3",) * 2
    assert host.compute_capabilities == ("9.0", "9.0")
    assert host.cuda_version == "12.4"  # from the plain banner, as libcuda is absent


@needs_linux
def test_old_nvidia_smi_without_compute_cap(monkeypatch, tmp_path):
    bindir = _no_real_nvidia(monkeypatch, tmp_path)
    _fake_smi(
        bindir,
        'case "$*" in\n'
        f"  *compute_cap*) echo '{SMI_BAD_FIELD.strip()}'; exit 2 ;;\n"
        f"  *--query-gpu*) echo '{SMI_OLD.strip()}' ;;\n"
        "  *) echo 'CUDA Version: 11.4' ;;\n"
        "esac\n",
    )
    host = detect_host(gpu_details=False)
    assert host.nvidia_driver == "470.223.02"
    assert host.compute_capabilities == ()


@needs_linux
def test_hanging_nvidia_smi_times_out(monkeypatch, tmp_path):
    bindir = _no_real_nvidia(monkeypatch, tmp_path)
    marker = tmp_path / "smi-pid"
    _fake_smi(bindir, f"echo $$ > {marker}\nexec sleep 60\n")
    monkeypatch.setattr(hostmod, "NVIDIA_SMI_TIMEOUT", 0.5)
    start = time.monotonic()
    host = detect_host()
    assert time.monotonic() - start < 10
    assert host.nvidia_driver is None
    assert any("did not answer" in note for note in host.notes)
    pid = int(marker.read_text())
    time.sleep(0.2)
    assert (
        not Path(f"/proc/{pid}").exists()
        or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    )


@needs_linux
def test_driver_version_file_without_tools(monkeypatch, tmp_path):
    _no_real_nvidia(monkeypatch, tmp_path, driver_file=DRIVER_OPEN)
    host = detect_host(gpu_details=False)
    assert host.nvidia_driver == "560.35.03"
    assert host.cuda_version is None


FAKE_LIBCUDA = r"""
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int cuDriverGetVersion(int *v) { *v = 12040; return 0; }
int cuInit(unsigned int flags) {
    const char *hang = getenv("FAKE_CUDA_HANG");
    const char *rc = getenv("FAKE_CUDA_INIT_RC");
    if (hang) sleep(atoi(hang));
    return rc ? atoi(rc) : 0;
}
int cuDeviceGetCount(int *n) { *n = 2; return 0; }
int cuDeviceGet(int *d, int i) { *d = i; return 0; }
int cuDeviceGetAttribute(int *v, int attr, int dev) {
    *v = attr == 75 ? 9 : attr == 76 ? dev : -1;
    return 0;
}
int cuDeviceGetName(char *name, int len, int dev) {
    strncpy(name, dev == 0 ? "Fake H100 80GB HBM3" : "Fake H100 NVL", len);
    return 0;
}
"""


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler on Linux to make a fake libcuda")
    folder = tmp_path_factory.mktemp("fakecuda")
    src = folder / "fake_cuda.c"
    src.write_text(FAKE_LIBCUDA)
    lib = folder / "libcuda.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def test_libcuda_probe(monkeypatch, tmp_path, fake_libcuda):
    _no_real_nvidia(monkeypatch, tmp_path, driver_file=DRIVER_PROPRIETARY, libs=[str(fake_libcuda)])
    host = detect_host()
    assert host.nvidia_driver == "550.54.15"
    assert host.cuda_version == "12.4"
    assert host.gpus == ("Fake H100 80GB HBM3", "Fake H100 NVL")
    assert host.compute_capabilities == ("9.0", "9.1")
    assert host.notes == ()


def test_libcuda_without_gpu_details_skips_cuinit(monkeypatch, tmp_path, fake_libcuda):
    # cuInit would hang for a minute: gpu_details=False must not call it at all.
    monkeypatch.setenv("FAKE_CUDA_HANG", "60")
    _no_real_nvidia(monkeypatch, tmp_path, driver_file=DRIVER_PROPRIETARY, libs=[str(fake_libcuda)])
    start = time.monotonic()
    host = detect_host(gpu_details=False)
    assert time.monotonic() - start < 5
    assert (host.nvidia_driver, host.cuda_version, host.gpus) == ("550.54.15", "12.4", ())


def test_hanging_cuinit_times_out_and_falls_back(monkeypatch, tmp_path, fake_libcuda):
    monkeypatch.setenv("FAKE_CUDA_HANG", "60")
    monkeypatch.setattr(hostmod, "CUDA_PROBE_TIMEOUT", 1.0)
    bindir = _no_real_nvidia(monkeypatch, tmp_path, libs=[str(fake_libcuda)])
    _fake_smi(bindir, f"echo '{SMI_WINDOWS.strip()}'\n")
    start = time.monotonic()
    host = detect_host()
    assert time.monotonic() - start < 10
    assert any("did not answer" in n for n in host.notes)
    # Driver and GPUs from nvidia-smi, CUDA version from cuDriverGetVersion.
    assert (host.nvidia_driver, host.cuda_version) == ("551.61", "12.4")
    assert host.gpus == ("NVIDIA GeForce RTX 4090",)


def test_failing_cuinit_is_a_note(monkeypatch, tmp_path, fake_libcuda):
    monkeypatch.setenv("FAKE_CUDA_INIT_RC", "100")  # CUDA_ERROR_NO_DEVICE
    _no_real_nvidia(monkeypatch, tmp_path, driver_file=DRIVER_PROPRIETARY, libs=[str(fake_libcuda)])
    host = detect_host()
    assert host.nvidia_driver == "550.54.15"
    assert host.gpus == ()
    assert any("CUresult 100" in n for n in host.notes)


def test_detection_never_raises(monkeypatch):
    def boom(*_a, **_k):
        msg = "probe exploded"
        raise RuntimeError(msg)

    monkeypatch.setattr(hostmod, "_linux_cpu_features", boom)
    monkeypatch.setattr(hostmod, "_nvidia", boom)
    monkeypatch.setattr(hostmod, "_vulkan", boom)
    host = detect_host()
    assert host.os == normalize_os(sys.platform)
    assert host.nvidia_driver is None
    assert host.vulkan is False
    if host.os == "linux":
        assert any("probe exploded" in n for n in host.notes)


def test_without_driver_evidence_libcuda_is_not_even_loaded(monkeypatch, tmp_path, fake_libcuda):
    bindir = _no_real_nvidia(monkeypatch, tmp_path, libs=[str(fake_libcuda)], evidence=False)
    _fake_smi(bindir, f"echo '{SMI_WINDOWS.strip()}'\n")
    loaded: list[object] = []
    real = hostmod._load_library

    def spy(names):
        loaded.append(names)
        return real(names)

    monkeypatch.setattr(hostmod, "_load_library", spy)
    host = detect_host()
    assert (host.nvidia_driver, host.cuda_version, host.gpus) == (None, None, ())
    assert all("cuda" not in str(names) for names in loaded)


@needs_linux
def test_vulkan_loader_from_the_loader_cache(monkeypatch, tmp_path):
    cache = tmp_path / "ld.so.cache"
    cache.write_bytes(b"glibc-ld.so.cache1.1\0libm.so.6\0/usr/lib/libvulkan.so.1\0libvulkan.so.1\0")
    monkeypatch.setattr(hostmod, "LD_SO_CACHE", str(cache))
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    assert detect_host(gpu_details=False).vulkan is True
    cache.write_bytes(b"glibc-ld.so.cache1.1\0libm.so.6\0libvulkan.so.1.3\0")
    assert detect_host(gpu_details=False, refresh=True).vulkan is False


@needs_linux
def test_vulkan_loader_on_ld_library_path(monkeypatch, tmp_path):
    monkeypatch.setattr(hostmod, "LD_SO_CACHE", str(tmp_path / "no-cache"))
    libdir = tmp_path / "sdk" / "lib"
    libdir.mkdir(parents=True)
    (libdir / "libvulkan.so.1").write_bytes(b"not really a library")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent{os.pathsep}{libdir}")
    assert detect_host(gpu_details=False).vulkan is True


# ----------------------------------------------------------------------------- AMD and Vulkan ICDs
@pytest.mark.parametrize(
    ("value", "expected"),
    [(110000, "gfx1100"), (90010, "gfx90a"), (90402, "gfx942"), (110501, "gfx1151"),
     (100300, "gfx1030"), (80003, "gfx803"), (0, None)],
)  # fmt: skip
def test_gfx_from_target_version(value, expected):
    assert gfx_from_target_version(value) == expected


KFD_GPU = """\
cpu_cores_count 0
simd_count 192
gfx_target_version 110000
vendor_id 4098
device_id 29772
"""
KFD_CPU = "cpu_cores_count 16\nsimd_count 0\ngfx_target_version 0\nvendor_id 0\n"

ROCMINFO = """\
*******
Agent 1
*******
  Name:                    AMD Ryzen 9 7950X 16-Core Processor
  Device Type:             CPU
*******
Agent 2
*******
  Name:                    gfx90a
  Marketing Name:          AMD Instinct MI210
  Device Type:             GPU
      Name:                    amdgcn-amd-amdhsa--gfx90a:sramecc+:xnack-
*******
Agent 3
*******
  Name:                    gfx90a
"""
HIPINFO = "device#  0\nName: AMD Radeon RX 7900 XTX\ngcnArchName: gfx1100\n"


def test_parse_kfd_properties():
    assert parse_kfd_properties(KFD_GPU) == "gfx1100"
    assert parse_kfd_properties(KFD_CPU) is None
    assert parse_kfd_properties("") is None


def test_parse_amd_gfx_targets_from_rocminfo_and_hipinfo():
    assert parse_amd_gfx_targets(ROCMINFO) == ("gfx90a",)
    assert parse_amd_gfx_targets(HIPINFO) == ("gfx1100",)
    assert parse_amd_gfx_targets("gcnArchName: gfx942:sramecc+:xnack-\n") == ("gfx942",)
    assert parse_amd_gfx_targets("ROCk module is NOT loaded, possibly no GPU devices") == ()


def _kfd(tmp_path: Path, *nodes: str) -> Path:
    root = tmp_path / "kfd" / "nodes"
    for i, text in enumerate(nodes):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "properties").write_text(text)
    return root


@needs_linux
def test_amd_gpu_from_the_kfd_topology(monkeypatch, tmp_path):
    monkeypatch.setattr(hostmod, "KFD_TOPOLOGY", str(_kfd(tmp_path, KFD_CPU, KFD_GPU)))
    cache = tmp_path / "ld.so.cache"
    cache.write_bytes(b"glibc-ld.so.cache1.1\0libamdhip64.so.7\0/opt/rocm/lib/libamdhip64.so.7\0")
    monkeypatch.setattr(hostmod, "LD_SO_CACHE", str(cache))
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    host = detect_host(gpu_details=False)
    assert (host.amd_driver, host.amd_gpus, host.hip_runtime) == (True, ("gfx1100",), True)
    assert "AMD gfx1100" in host.summary()
    assert host.to_dict()["amd_gpus"] == ["gfx1100"]
    cache.write_bytes(b"glibc-ld.so.cache1.1\0libm.so.6\0")
    assert detect_host(gpu_details=False, refresh=True).hip_runtime is False


@needs_linux
def test_amd_gfx_falls_back_to_rocminfo(monkeypatch, tmp_path):
    monkeypatch.setattr(hostmod, "KFD_TOPOLOGY", str(_kfd(tmp_path, KFD_CPU)))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "rocminfo"
    tool.write_text("#!/bin/sh\ncat <<'EOF'\n" + ROCMINFO + "EOF\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    host = detect_host(gpu_details=False)
    assert (host.amd_driver, host.amd_gpus) == (True, ("gfx90a",))


@needs_linux
def test_no_amd_driver_runs_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(hostmod, "KFD_TOPOLOGY", str(tmp_path / "absent"))
    ran: list[object] = []
    monkeypatch.setattr(hostmod, "_run", lambda *a, **k: ran.append(a))
    host = detect_host(gpu_details=False)
    assert (host.amd_driver, host.amd_gpus, host.hip_runtime) == (False, (), False)
    assert not any("rocminfo" in str(a) for a in ran)


@needs_linux
def test_vulkan_icds_from_folders_and_environment(monkeypatch, tmp_path):
    icd = tmp_path / "icd.d"
    icd.mkdir()
    (icd / "lvp_icd.x86_64.json").write_text("{}")
    (icd / "radeon_icd.x86_64.json").write_text("{}")
    monkeypatch.setattr(hostmod, "VULKAN_ICD_DIRS", (str(icd),))
    monkeypatch.setenv("XDG_DATA_DIRS", str(tmp_path / "none"))
    monkeypatch.setenv("VK_ICD_FILENAMES", "/opt/x/nvidia_icd.json")
    host = detect_host(gpu_details=False)
    assert host.vulkan_icds == ("lvp_icd.x86_64.json", "nvidia_icd.json", "radeon_icd.x86_64.json")
    assert host.vulkan_gpu_icds == ("nvidia_icd.json", "radeon_icd.x86_64.json")
    (icd / "radeon_icd.x86_64.json").unlink()
    monkeypatch.delenv("VK_ICD_FILENAMES")
    again = detect_host(gpu_details=False, refresh=True)
    assert (again.vulkan_icds, again.vulkan_gpu_icds) == (("lvp_icd.x86_64.json",), ())
