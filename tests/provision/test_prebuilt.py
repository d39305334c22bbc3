"""Prebuilt installs from upstream's real release listings, served by a loopback mirror.

The listings are upstream's own (names, API order, sizes and digests of the assets not
downloaded, from ``upstream_listings``); the archives a test downloads are small real archives
built here under the real asset names, laid out the way upstream's release workflow packs them
(``llama-<tag>/`` for the binaries, ``cudart-llama-<tag>-bin-ubuntu-cuda-<v>-<arch>/`` for the
Linux runtime twin, files at the root of the Windows zips).
"""

from __future__ import annotations

import json
import sys
import threading
from typing import TYPE_CHECKING, Any

import pytest
from filelock import FileLock
from http_server import FileServer, routed_session
from release_fixtures import (
    ReleaseFixture,
    make_tar,
    make_zip,
    serve_release,
    sha256_of,
    shim_script,
    write_variants_toml,
)
from upstream_listings import listing

from llama_proc import cli
from llama_proc.config import Settings
from llama_proc.errors import (
    ConfigError,
    DownloadError,
    NoMatchingVariantError,
    ProvisionError,
)
from llama_proc.provision import bundle
from llama_proc.provision.cache import installer
from llama_proc.provision.cache.inventory import list_installs
from llama_proc.provision.cache.layout import INSTALL_JSON, downloads_dir, install_dir
from llama_proc.provision.cache.locking import lock_path
from llama_proc.provision.cache.record import Install
from llama_proc.provision.compile import build as build_module
from llama_proc.provision.fetch import archive, download
from llama_proc.provision.fetch.prebuilt import fetch_for_platform, install_prebuilt, parse_platform
from llama_proc.provision.host.host_info import HostInfo
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.resolve import ensure_server, plan

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from llama_proc.provision.manifest_records import Manifest

REPO = "ggml-org/llama.cpp"
TAG = "b11194"
CUDA13 = f"llama-{TAG}-bin-ubuntu-cuda-13.4-x64.tar.gz"
CUDART13 = f"cudart-llama-{TAG}-bin-ubuntu-cuda-13.4-x64.tar.gz"
WIN_CUDA12 = f"llama-{TAG}-bin-win-cuda-12.4-x64.zip"
WIN_CUDART12 = "cudart-llama-bin-win-cuda-12.4-x64.zip"
LINUX_CPU = f"llama-{TAG}-bin-ubuntu-x64.tar.gz"
ARM_CPU = f"llama-{TAG}-bin-ubuntu-arm64.tar.gz"
CUDA_LIBS = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13")
NVIDIA_HOST = HostInfo(
    os="linux",
    arch="x86_64",
    libc="glibc",
    libc_version="2.39",
    cpu_features=frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"}),
    nvidia_driver="590.44",
    cuda_version="13.4",
)
needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="runs the Linux shims (smoke check)"
)


@pytest.fixture(autouse=True)
def _no_backoff_no_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)
    monkeypatch.setattr(bundle, "find_bundled", lambda root=None: None)


@pytest.fixture
def settings(tmp_path: Path, server: FileServer) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", mirror=server.url, progress=False)


class FakeBuild:
    """Stands in for build_variant: records that the ladder fell to a source build."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, variant: Any, settings: Settings, **_kw: Any) -> Install:
        self.calls.append(variant.id)
        msg = "fake build: not building in this test"
        raise ProvisionError(msg)


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch) -> FakeBuild:
    fake = FakeBuild()
    monkeypatch.setattr(build_module, "build_variant", fake)
    return fake


# ----------------------------------------------------------------------------- archives
def _linux_binary(path: Path, *, failing: bool = False) -> Path:
    top = f"llama-{TAG}"
    shim = (
        "#!/bin/sh\necho 'cannot run here' >&2\nexit 1\n" if failing else shim_script(TAG)
    ).encode()
    return make_tar(
        path,
        [
            (f"{top}/", {"dir": True}),
            (f"{top}/llama-server", (shim, 0o755)),
            (f"{top}/libggml-cuda.so", b"\x7fELF fake cuda backend"),
            (f"{top}/libggml-base.so", b"\x7fELF fake ggml"),
            (f"{top}/LICENSE", b"MIT (fake)\n"),
        ],
    )


def _linux_twin(path: Path, name: str) -> Path:
    # Upstream: tar -C ./cudart . --transform "s,^\.,<name without .tar.gz>,"
    top = name.removesuffix(".tar.gz")
    return make_tar(
        path,
        [(f"{top}/", {"dir": True})]
        + [(f"{top}/{lib}", b"\x7fELF fake " + lib.encode()) for lib in CUDA_LIBS],
    )


def _windows_binary(path: Path) -> Path:
    exe = b"MZ fake windows executable"
    return make_zip(
        path,
        [("llama-server.exe", (exe, 0o755)), ("ggml-cuda.dll", b"MZ"), ("llama.dll", b"MZ")],
    )


def _windows_twin(path: Path) -> Path:
    libs = ("cudart64_12.dll", "cublas64_12.dll", "cublasLt64_12.dll")
    return make_zip(path, [(lib, b"MZ fake " + lib.encode()) for lib in libs])


def _real_release(
    tmp_path: Path, files: Mapping[str, Path], *, drop: tuple[str, ...] = ()
) -> ReleaseFixture:
    """Upstream's real b11194 listing; the assets in ``files`` point at our small archives."""
    root = tmp_path / "release"
    root.mkdir(exist_ok=True)
    doc = listing(TAG, drop=drop)
    assets: dict[str, tuple[Path, str]] = {}
    for entry in doc["assets"]:
        path = files.get(entry["name"])
        if path is not None:
            sha = sha256_of(path)
            entry["size"], entry["digest"] = path.stat().st_size, f"sha256:{sha}"
            assets[entry["name"]] = (path, sha)
    listing_path = root / "listing.json"
    listing_path.write_text(json.dumps(doc), encoding="utf-8")
    return ReleaseFixture(REPO, TAG, root, listing_path, doc, assets)


def _cuda_release(tmp_path: Path, **kw: Any) -> ReleaseFixture:
    files = {
        CUDA13: _linux_binary(tmp_path / CUDA13),
        CUDART13: _linux_twin(tmp_path / CUDART13, CUDART13),
    }
    return _real_release(tmp_path, files, **kw)


def _manifest(tmp_path: Path, release: ReleaseFixture, **kw: Any) -> Manifest:
    return load_manifest(write_variants_toml(tmp_path / "variants.toml", release, **kw))


def _record(install: Install) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((install.path / INSTALL_JSON).read_text())
    return data


# ----------------------------------------------------------------------------- CUDA + twin
@needs_linux
def test_cuda_install_holds_the_binary_and_its_runtime_twin(
    server: FileServer, tmp_path: Path, settings: Settings
) -> None:
    release = _cuda_release(tmp_path)
    # The API lists the twin before the binary: order must not decide which is which.
    names = [a["name"] for a in release.listing["assets"]]
    assert names.index(CUDART13) < names.index(CUDA13)
    serve_release(server, release)
    manifest = _manifest(tmp_path, release)
    install = ensure_server(settings.replace(variant="cuda"), host=NVIDIA_HOST, manifest=manifest)

    assert install.variant_id == "linux-x86_64-cuda13"
    assert install.server_binary == install.path / "llama-server"
    # Both archives are unpacked into the one folder: the runtime loads through $ORIGIN.
    for name in ("libggml-cuda.so", "LICENSE", *CUDA_LIBS):
        assert (install.path / name).is_file(), name
    assert not list(install.path.glob("cudart-*"))
    assert not list(install.path.glob(f"llama-{TAG}*"))
    record = _record(install)
    assert [(a["name"], a["sha256"], a["size"]) for a in record["assets"]] == [
        (CUDA13, release.sha256(CUDA13), release.assets[CUDA13][0].stat().st_size),
        (CUDART13, release.sha256(CUDART13), release.assets[CUDART13][0].stat().st_size),
    ]
    assert record["sha256"] == release.sha256(CUDA13)
    assert server.hits(release.download_path(CUDA13)) == 1
    assert server.hits(release.download_path(CUDART13)) == 1
    # Committed: the verified archives are no longer needed.
    assert not (downloads_dir(settings) / CUDA13).exists()
    assert not (downloads_dir(settings) / CUDART13).exists()


def test_listing_without_the_twin_falls_to_the_next_step(
    server: FileServer, tmp_path: Path, settings: Settings, fake_build: FakeBuild
) -> None:
    release = _cuda_release(tmp_path, drop=(CUDART13,))
    serve_release(server, release)
    manifest = _manifest(tmp_path, release)
    cuda = settings.replace(variant="cuda")
    explain: list[str] = []
    with pytest.raises(ProvisionError, match="fake build"):
        ensure_server(cuda, host=NVIDIA_HOST, manifest=manifest, explain=explain)
    assert fake_build.calls == ["linux-x86_64-cuda13"]
    failed = [line for line in explain if line.startswith("prebuilt: failed")]
    assert len(failed) == 1
    assert "not the runtime archive" in failed[0]
    assert "falling back to a source build" in failed[0]
    # Nothing was downloaded for an install that could not be complete.
    assert server.hits(release.download_path(CUDA13)) == 0

    with pytest.raises(NoMatchingVariantError, match=r"cudart-llama-\{build\}|runtime archive"):
        ensure_server(cuda.replace(no_build=True), host=NVIDIA_HOST, manifest=manifest)
    assert server.hits(release.download_path(CUDA13)) == 0
    assert list_installs(settings) == []


def test_listing_size_is_checked_not_only_the_digest(
    server: FileServer, tmp_path: Path, settings: Settings
) -> None:
    release = _cuda_release(tmp_path)
    for entry in release.listing["assets"]:
        if entry["name"] == CUDART13:
            entry["size"] += 1  # the digest still matches the bytes served
    release.listing_path.write_text(json.dumps(release.listing), encoding="utf-8")
    serve_release(server, release)
    manifest = _manifest(tmp_path, release)
    with pytest.raises(DownloadError, match=CUDART13.replace(".", r"\.")):
        ensure_server(
            settings.replace(variant="cuda", no_build=True), host=NVIDIA_HOST, manifest=manifest
        )
    assert list_installs(settings) == []


@needs_linux
def test_plain_http_remote_mirror_with_every_asset_pinned_installs(
    server: FileServer, tmp_path: Path
) -> None:
    release = _cuda_release(tmp_path)
    serve_release(server, release)
    mirror = "http://mirror.example.internal:8080"
    pins = {n: release.sha256(n) for n in (CUDA13, CUDART13)}
    manifest = _manifest(tmp_path, release, pin=pins)
    settings = Settings(cache_dir=tmp_path / "cache", mirror=mirror, variant="cuda", progress=False)
    res = plan(settings, host=NVIDIA_HOST, manifest=manifest)
    with routed_session(server, mirror) as session:
        done = install_prebuilt(res, settings, session=session)
    assert done.made
    assert (done.install.path / "libcudart.so.13").is_file()
    # Without the pins the same mirror is refused before any connection.
    unpinned = _manifest(tmp_path, release)
    res = plan(settings, host=NVIDIA_HOST, manifest=unpinned)
    before = server.hits()
    with routed_session(server, mirror) as session, pytest.raises(ProvisionError, match="plain"):
        install_prebuilt(res, settings, session=session, force=True)
    assert server.hits() == before


# ----------------------------------------------------------------------------- crash after unpack
class Killed(BaseException):
    """Stands in for the process dying (not an error anybody catches)."""


@needs_linux
def test_crash_after_extraction_keeps_the_verified_archives(
    server: FileServer, tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = _cuda_release(tmp_path)
    serve_release(server, release)
    manifest = _manifest(tmp_path, release)
    cuda = settings.replace(variant="cuda", no_build=True)

    def die(*args: Any, **kw: Any) -> Any:
        raise Killed

    monkeypatch.setattr(installer, "find_binaries", die)  # runs right after the unpacking
    with pytest.raises(Killed):
        ensure_server(cuda, host=NVIDIA_HOST, manifest=manifest)
    assert list_installs(settings) == []
    for name in (CUDA13, CUDART13):
        kept = downloads_dir(settings) / name
        assert kept.is_file(), name
        assert sha256_of(kept) == release.sha256(name)

    monkeypatch.setattr(installer, "find_binaries", archive.find_binaries)
    install = ensure_server(cuda, host=NVIDIA_HOST, manifest=manifest)
    assert (install.path / "libcudart.so.13").is_file()
    # The next run unpacked the kept archives: nothing was downloaded twice.
    assert server.hits(release.download_path(CUDA13)) == 1
    assert server.hits(release.download_path(CUDART13)) == 1
    assert not (downloads_dir(settings) / CUDA13).exists()
    assert not (downloads_dir(settings) / CUDART13).exists()


# ----------------------------------------------------------------------------- lock wait
@needs_linux
def test_waiting_on_the_lock_reports_another_process_installed(
    server: FileServer, tmp_path: Path, settings: Settings
) -> None:
    release = _cuda_release(tmp_path)
    serve_release(server, release)
    manifest = _manifest(tmp_path, release)
    cuda = settings.replace(variant="cuda", no_build=True)
    # "Another process": the same install made in another cache, to be moved in under the lock.
    other = ensure_server(
        cuda.replace(cache_dir=tmp_path / "other"), host=NVIDIA_HOST, manifest=manifest
    )
    downloads = server.hits(release.download_path(CUDA13))
    target = install_dir(settings, TAG, "linux-x86_64-cuda13")
    target.parent.mkdir(parents=True)
    explain: list[str] = []
    result: list[Install] = []
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            result.append(ensure_server(cuda, host=NVIDIA_HOST, manifest=manifest, explain=explain))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    thread = threading.Thread(target=waiter)
    with FileLock(str(lock_path(target))):
        thread.start()
        deadline = 200
        while not any(line.startswith("cache: miss") for line in explain) and deadline:
            thread.join(0.05)
            deadline -= 1
        other.path.rename(target)
    thread.join(60)
    assert not errors, errors
    assert result[0].path == target
    assert explain[-1] == (
        f"prebuilt: already installed by another process: {TAG}/linux-x86_64-cuda13 "
        f"({result[0].version})"
    )
    assert server.hits(release.download_path(CUDA13)) == downloads


# ----------------------------------------------------------------------------- --platform
@pytest.mark.parametrize(
    ("text", "os_name", "arch"),
    [
        pytest.param("linux-x86_64", "linux", "x86_64", id="linux-x86_64"),
        pytest.param("linux-arm64", "linux", "aarch64", id="linux-arm64-is-aarch64"),
        pytest.param("linux-aarch64", "linux", "aarch64", id="linux-aarch64"),
        pytest.param("macos-arm64", "macos", "arm64", id="macos-arm64"),
        pytest.param("Windows-AMD64", "windows", "x86_64", id="windows-amd64"),
        pytest.param("windows-arm64", "windows", "arm64", id="windows-arm64"),
    ],
)
def test_parse_platform(text: str, os_name: str, arch: str) -> None:
    host = parse_platform(text)
    assert (host.os, host.arch) == (os_name, arch)
    assert host.nvidia_driver is None
    assert host.libc is None


@pytest.mark.parametrize("text", ["linux", "freebsd-x86_64", "linux-riscv64", "", "-x86_64"])
def test_parse_platform_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="OS-ARCH"):
        parse_platform(text)


def _windows_release(tmp_path: Path) -> ReleaseFixture:
    files = {
        WIN_CUDA12: _windows_binary(tmp_path / WIN_CUDA12),
        WIN_CUDART12: _windows_twin(tmp_path / WIN_CUDART12),
    }
    return _real_release(tmp_path, files)


def test_cli_fetch_for_windows_writes_the_zip_and_its_twin(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release = _windows_release(tmp_path)
    serve_release(server, release)
    dest = tmp_path / "for-windows"
    argv = ["fetch", "--variant", "cuda", "--platform", "windows-x86_64", "--dest", str(dest)]
    argv += ["--build", TAG, "--mirror", server.url]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(dest / "llama-server.exe")
    assert f"fetched windows-x86_64-cuda {TAG} for windows-x86_64 into {dest}" in err
    files = sorted(p.name for p in dest.iterdir())
    assert files == sorted(
        [
            "llama-server.exe", "ggml-cuda.dll", "llama.dll", "cudart64_12.dll",
            "cublas64_12.dll", "cublasLt64_12.dll", INSTALL_JSON,
        ]
    )  # fmt: skip
    record = json.loads((dest / INSTALL_JSON).read_text())
    assert record["platform"] == "windows-x86_64"
    assert record["variant_id"] == "windows-x86_64-cuda"
    assert [a["name"] for a in record["assets"]] == [WIN_CUDA12, WIN_CUDART12]
    assert record["smoke_check"].startswith("skipped")
    # Into the destination, not the cache; the archives are gone once it is committed.
    assert list_installs(Settings(cache_dir=tmp_path / "cache")) == []
    assert not list(downloads_dir(Settings(cache_dir=tmp_path / "cache")).glob("*.zip"))

    # Again: nothing is downloaded, and it says the folder already holds it.
    assert cli.main(argv) == 0
    _out, err = capsys.readouterr()
    assert "already there" in err
    assert server.hits(release.download_path(WIN_CUDA12)) == 1


@needs_linux
def test_fetch_for_platform_never_runs_the_binary(server: FileServer, tmp_path: Path) -> None:
    # A linux-x86_64 binary on a linux-x86_64 host could run, but it is meant for another
    # machine: its --version (which fails here) is never called.
    files = {LINUX_CPU: _linux_binary(tmp_path / LINUX_CPU, failing=True)}
    release = _real_release(tmp_path, files)
    serve_release(server, release)
    settings = Settings(cache_dir=tmp_path / "cache", mirror=server.url, variant="cpu")
    dest = tmp_path / "out"
    done = fetch_for_platform(settings, "linux-x86_64", dest, manifest=_manifest(tmp_path, release))
    assert done.made
    assert done.install.server_binary == dest / "llama-server"
    assert _record(done.install)["smoke_check"].startswith("skipped: not run here")


def test_fetch_for_platform_protects_the_destination(server: FileServer, tmp_path: Path) -> None:
    files = {
        LINUX_CPU: _linux_binary(tmp_path / LINUX_CPU),
        ARM_CPU: _linux_binary(tmp_path / ARM_CPU),
    }
    release = _real_release(tmp_path, files)
    serve_release(server, release)
    manifest = _manifest(tmp_path, release)
    settings = Settings(cache_dir=tmp_path / "cache", mirror=server.url, variant="cpu")

    with pytest.raises(ConfigError, match="--variant"):
        fetch_for_platform(settings.replace(variant="auto"), "linux-aarch64", tmp_path / "x")

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ProvisionError, match="not empty"):
        fetch_for_platform(settings, "linux-aarch64", mine, manifest=manifest)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert server.hits() == 0

    dest = tmp_path / "out"
    first = fetch_for_platform(settings, "linux-aarch64", dest, manifest=manifest)
    assert first.install.variant_id == "linux-aarch64-cpu"
    assert server.hits(release.download_path(ARM_CPU)) == 1
    with pytest.raises(ProvisionError, match="--force"):
        fetch_for_platform(settings, "linux-x86_64", dest, manifest=manifest)
    assert Install.from_dir(dest).variant_id == "linux-aarch64-cpu"
    replaced = fetch_for_platform(settings, "linux-x86_64", dest, force=True, manifest=manifest)
    assert replaced.made
    assert Install.from_dir(dest).variant_id == "linux-x86_64-cpu"


def test_cli_platform_needs_dest_and_a_valid_platform(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["fetch", "--variant", "cpu", "--platform", "linux-x86_64"]) == 1
    assert "--platform and --dest go together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["fetch", "--variant", "cpu", "--platform", "plan9-mips", "--dest", "x"])
    assert exc.value.code == 2
    assert "OS-ARCH" in capsys.readouterr().err
