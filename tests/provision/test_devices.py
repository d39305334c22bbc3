"""Never a silent CPU fallback at install time: a GPU build must list its GPU.

The CUDA archives here hold a fake llama-server whose ``--list-devices`` shows the GPU only when
``libcudart.so.12`` lies beside it (else it prints the loader's error, as ggml does), served from
a loopback mirror with the repository's manifest; the host says it has an NVIDIA GPU whose driver
is too old for CUDA 13, so ``auto`` picks the CUDA 12 build first.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from release_fixtures import make_release, make_tar, serve_release, write_variants_toml

from llama_proc import backends
from llama_proc.config import Settings
from llama_proc.errors import DeviceNotFoundError, ProvisionError
from llama_proc.provision import bundle
from llama_proc.provision import manifest as manifest_module
from llama_proc.provision.cache import memo
from llama_proc.provision.cache.layout import INSTALL_JSON, install_dir
from llama_proc.provision.cache.verify import (
    DeviceRequirement,
    check_devices,
    device_requirement,
)
from llama_proc.provision.compile import build as build_module
from llama_proc.provision.explain import Outcome, StepName, steps
from llama_proc.provision.fetch import download
from llama_proc.provision.host import platform as platform_module
from llama_proc.provision.host.host_info import HostInfo
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.resolve import ensure_server, resolve_server

if TYPE_CHECKING:
    from http_server import FileServer

    from llama_proc.provision.cache.record import Install
    from llama_proc.provision.manifest_records import Manifest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="runs Linux shell shims"
)

TAG = "b11434"
CUDA_ASSET = f"llama-{TAG}-bin-ubuntu-cuda-12.8-x64.tar.gz"
TWIN = f"cudart-llama-{TAG}-bin-ubuntu-cuda-12.8-x64.tar.gz"
CUDA12, CPU = "linux-x86_64-cuda", "linux-x86_64-cpu"
FAKE_SERVER = Path(__file__).resolve().parents[1] / "helpers" / "fake_llama_server.py"
NVIDIA_HOST = HostInfo(
    os="linux",
    arch="x86_64",
    libc="glibc",
    libc_version="2.39",
    cpu_features=frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"}),
    nvidia_driver="570.86",
    cuda_version="12.8",
)
NO_GPU_HOST = HostInfo(
    os="linux", arch="x86_64", libc="glibc", libc_version="2.39",
    cpu_features=NVIDIA_HOST.cpu_features,
)  # fmt: skip


def _gpu_shim(backend: str = "cuda") -> bytes:
    return (
        "#!/bin/sh\n"
        f'exec "{sys.executable}" "{FAKE_SERVER}" --fake-gpu {backend} '
        '--fake-lib-dir "$(dirname "$0")" "$@"\n'
    ).encode()


def _release(tmp_path: Path, twin_libs: dict[str, bytes]) -> Any:
    top = f"llama-{TAG}"
    binary = make_tar(
        tmp_path / CUDA_ASSET,
        [
            (f"{top}/", {"dir": True}),
            (f"{top}/llama-server", (_gpu_shim(), 0o755)),
            (f"{top}/LICENSE", b"MIT (fake)\n"),
        ],
    )
    twin_top = TWIN.removesuffix(".tar.gz")
    twin = make_tar(
        tmp_path / TWIN,
        [(f"{twin_top}/", {"dir": True})]
        + [(f"{twin_top}/{name}", data) for name, data in twin_libs.items()],
    )
    # The CPU archive comes from the fixture (its shim lists no device, like upstream's).
    return make_release(
        tmp_path / "mirror",
        TAG,
        ["ubuntu-x64"],
        extra_assets={TWIN: twin.read_bytes(), CUDA_ASSET: binary.read_bytes()},
    )


NO_CUDART = {"libcublas.so.12": b"\x7fELF fake cublas", "libcublasLt.so.12": b"\x7fELF fake"}
WITH_CUDART = {**NO_CUDART, "libcudart.so.12": b"\x7fELF fake cudart"}
OLD_DRIVER = {**NO_CUDART, "libcudart.so.12": b"\x7fELF fake cudart insufficient-driver"}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)
    monkeypatch.setattr(bundle, "find_bundled", lambda root=None: None)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Source builds the ladder asked for (none may run here)."""
    calls: list[str] = []

    def refuse(variant: Any, settings: Settings, **_kw: Any) -> Install:
        calls.append(variant.id)
        msg = "fake build: not building in this test"
        raise ProvisionError(msg)

    monkeypatch.setattr(build_module, "build_variant", refuse)
    return calls


def _setup(
    tmp_path: Path, server: FileServer, twin_libs: dict[str, bytes], **settings: Any
) -> tuple[Settings, Manifest]:
    release = _release(tmp_path, twin_libs)
    serve_release(server, release)
    manifest = load_manifest(write_variants_toml(tmp_path / "variants.toml", release))
    return Settings(
        cache_dir=tmp_path / "cache", mirror=server.url, progress=False, **settings
    ), manifest


def _leftovers(settings: Settings) -> list[Path]:
    root = settings.cache_dir / "servers" / TAG
    return sorted(root.glob(f"*{CUDA12}*")) if root.exists() else []


# ----------------------------------------------------------------------------- the install check
def test_cuda_build_without_its_runtime_is_refused_with_the_cause(
    tmp_path: Path, server: FileServer, builds: list[str]
) -> None:
    settings, manifest = _setup(tmp_path, server, NO_CUDART, variant="cuda")
    with pytest.raises(DeviceNotFoundError) as err:
        ensure_server(settings, host=NVIDIA_HOST, manifest=manifest)
    text = str(err.value)
    assert err.value.cause == "missing_library"
    assert err.value.backend == "cuda"
    assert "sees no CUDA device" in text
    assert "NVIDIA GPU (driver 570.86)" in text
    assert "libcudart.so.12: cannot open shared object file" in text
    assert "install is incomplete" in text
    # Nothing recorded, no staging folder left, and no source build tried around it.
    assert not install_dir(settings, TAG, CUDA12).exists()
    assert [p.name for p in _leftovers(settings)] == [f"{CUDA12}.lock"]
    assert builds == []


def test_a_driver_too_old_is_named(tmp_path: Path, server: FileServer, builds: list[str]) -> None:
    settings, manifest = _setup(tmp_path, server, OLD_DRIVER, variant="cuda")
    with pytest.raises(DeviceNotFoundError, match="update the NVIDIA driver") as err:
        ensure_server(settings, host=NVIDIA_HOST, manifest=manifest)
    assert err.value.cause == "gpu_driver_too_old"


def test_auto_falls_to_the_next_variant(
    tmp_path: Path, server: FileServer, builds: list[str]
) -> None:
    settings, manifest = _setup(tmp_path, server, NO_CUDART)
    explain: list[str] = []
    install = ensure_server(settings, host=NVIDIA_HOST, manifest=manifest, explain=explain)
    assert install.variant_id == CPU
    assert not install_dir(settings, TAG, CUDA12).exists()
    notes = [s for s in steps(explain) if s.step == StepName.SELECT]
    assert any(
        f"{CUDA12} refused, it sees no GPU (missing_library); next: {CPU}" in s.reason
        for s in notes
    )
    failed = [s for s in steps(explain) if s.outcome == Outcome.FAILED]
    assert [s.step for s in failed] == [StepName.PREBUILT]
    assert "libcudart.so.12" in failed[0].reason
    assert builds == []


def test_the_fall_is_remembered(
    tmp_path: Path, server: FileServer, builds: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, manifest = _setup(tmp_path, server, NO_CUDART)
    monkeypatch.setattr(platform_module, "detect_host", lambda **_kw: NVIDIA_HOST)
    monkeypatch.setattr(manifest_module, "load_manifest", lambda *_a, **_k: manifest)
    monkeypatch.setattr(memo, "host_fingerprint", lambda: "a host with an NVIDIA GPU")
    first = ensure_server(settings)
    assert first.variant_id == CPU
    cuda_hits = server.hits(f"/ggml-org/llama.cpp/releases/download/{TAG}/{CUDA_ASSET}")
    assert cuda_hits == 1
    # The next call goes straight to the CPU build: no CUDA download, no device check.
    again: list[str] = []
    assert resolve_server(settings, explain=again) == first
    assert server.hits(f"/ggml-org/llama.cpp/releases/download/{TAG}/{CUDA_ASSET}") == 1
    assert any("refused, it sees no GPU" in line for line in again)


def test_a_gpu_build_that_sees_its_gpu_records_it(
    tmp_path: Path, server: FileServer, builds: list[str]
) -> None:
    settings, manifest = _setup(tmp_path, server, WITH_CUDART)
    install = ensure_server(settings, host=NVIDIA_HOST, manifest=manifest)
    assert install.variant_id == CUDA12
    record = json.loads((install.path / INSTALL_JSON).read_text())
    assert record["devices"] == [
        {
            "name": "CUDA0",
            "backend": "cuda",
            "description": "NVIDIA H100 80GB HBM3",
            "total_mib": 81079,
            "free_mib": 80500,
        }
    ]


# ----------------------------------------------------------------------------- pieces
def test_which_hosts_get_the_check(tmp_path: Path, server: FileServer) -> None:
    _settings, manifest = _setup(tmp_path, server, NO_CUDART)
    cuda, cpu, vulkan = (manifest.get(i) for i in (CUDA12, CPU, "linux-x86_64-vulkan"))
    need = device_requirement(cuda, NVIDIA_HOST)
    assert need is not None
    assert (need.backend, need.label, need.gpu) == ("cuda", "CUDA", "an NVIDIA GPU (driver 570.86)")
    assert device_requirement(cuda, NO_GPU_HOST) is None
    assert device_requirement(cpu, NVIDIA_HOST) is None
    # Vulkan on an NVIDIA host with the loader but no GPU ICD: checked, and the hint says why.
    vk_host = HostInfo(os="linux", arch="x86_64", nvidia_driver="570.86", vulkan=True)
    vk_need = device_requirement(vulkan, vk_host)
    assert vk_need is not None
    assert "no Vulkan driver (ICD)" in " ".join(vk_need.hints)
    assert device_requirement(vulkan, HostInfo(os="linux", arch="x86_64", vulkan=True)) is None


def _silent_gpu_build(folder: Path, library: bytes) -> Path:
    """A release build: lists "(none)" and says nothing of its backend library failing."""
    folder.mkdir()
    binary = folder / "llama-server"
    binary.write_text("#!/bin/sh\necho 'Available devices:'\necho '  (none)'\n")
    binary.chmod(0o755)
    (folder / "libggml-cuda.so").write_bytes(library)
    return binary


def test_a_silent_build_is_diagnosed_by_loading_its_backend(tmp_path: Path) -> None:
    binary = _silent_gpu_build(tmp_path / "silent", b"not a shared library " * 8)
    need = DeviceRequirement("cuda", "an NVIDIA GPU")
    with pytest.raises(DeviceNotFoundError) as err:
        check_devices(binary, need)
    assert err.value.cause == "missing_library"
    assert "libggml-cuda.so" in str(err.value)
    assert "invalid ELF header" in str(err.value)  # the dynamic loader's own words


def test_hints_explain_what_the_output_does_not(tmp_path: Path) -> None:
    binary = _silent_gpu_build(tmp_path / "silent", b"")
    binary.parent.joinpath("libggml-cuda.so").unlink()
    need = DeviceRequirement("vulkan", "an NVIDIA GPU", ("no Vulkan driver (ICD) for a GPU",))
    with pytest.raises(DeviceNotFoundError, match=r"no Vulkan driver \(ICD\)") as err:
        check_devices(binary, need)
    assert err.value.cause == "no_gpu_device"


def test_a_build_without_a_device_list_is_refused(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\necho 'error: invalid argument: --list-devices' >&2\nexit 1\n")
    binary.chmod(0o755)
    with pytest.raises(ProvisionError, match="printed no device list"):
        check_devices(binary, DeviceRequirement("cuda", "an NVIDIA GPU"))


def test_the_real_cpu_server_is_no_cuda_build(llama_server_bin: Path) -> None:
    with pytest.raises(DeviceNotFoundError, match=r"devices listed: none") as err:
        check_devices(llama_server_bin, DeviceRequirement("cuda", "an NVIDIA GPU"))
    assert err.value.backend == "cuda"


def _listing_build(folder: Path, *lines: str) -> Path:
    """A build whose ``--list-devices`` prints ``lines`` under llama-server's header."""
    folder.mkdir()
    binary = folder / "llama-server"
    echoes = "".join(f"echo '{line}'\n" for line in ("Available devices:", *lines))
    binary.write_text(f"#!/bin/sh\n{echoes}")
    binary.chmod(0o755)
    return binary


def test_a_backend_added_to_the_table_alone_gets_its_gpu_device_check(
    tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _settings, manifest = _setup(tmp_path, server, NO_CUDART)
    sycl = backends.Backend(
        "sycl", "SYCL", library="sycl", device_prefix="SYCL", host_gpu=lambda _host: "an Arc GPU"
    )
    monkeypatch.setattr(backends, "TABLE", (*backends.TABLE, sycl))
    variant = dataclasses.replace(manifest.get(CPU), backend="sycl")
    need = device_requirement(variant, NO_GPU_HOST)
    assert need is not None
    assert (need.backend, need.label, need.gpu) == ("sycl", "SYCL", "an Arc GPU")
    seen = _listing_build(tmp_path / "seen", "  SYCL0: Intel Arc A770 (16032 MiB, 15000 MiB free)")
    assert [(d.name, d.backend, d.is_gpu) for d in check_devices(seen, need)] == [
        ("SYCL0", "sycl", True)
    ]
    blind = _listing_build(tmp_path / "blind", "  (none)")
    with pytest.raises(DeviceNotFoundError, match="sees no SYCL device") as err:
        check_devices(blind, need)
    assert err.value.backend == "sycl"
