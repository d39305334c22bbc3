"""The resolution ladder end to end, against a local release mirror with real archives.

Processes are real where it matters: concurrent installs from several interpreters share one
download, and an install killed with SIGKILL mid-download or mid-extraction leaves the cache
recoverable.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from filelock import FileLock
from release_fixtures import (
    LINUX,
    ReleaseFixture,
    make_release,
    make_tar,
    needs_linux,
    serve_release,
    shim_script,
    write_variants_toml,
)

import llama_proc
from llama_proc.config import Settings
from llama_proc.errors import (
    BinaryNotFoundError,
    CacheLockTimeoutError,
    ChecksumMismatchError,
    NoMatchingVariantError,
    OfflineError,
    ProvisionError,
)
from llama_proc.provision import bundle
from llama_proc.provision import manifest as manifest_module
from llama_proc.provision import resolve as resolve_module
from llama_proc.provision.cache import memo
from llama_proc.provision.cache.installer import install_atomically
from llama_proc.provision.cache.inventory import list_installs, remove
from llama_proc.provision.cache.layout import INSTALL_JSON, downloads_dir, install_dir
from llama_proc.provision.compile import build as build_module
from llama_proc.provision.explain import Outcome, Step, StepName, steps
from llama_proc.provision.fetch import download
from llama_proc.provision.host import platform as platform_module
from llama_proc.provision.host.host_info import HostInfo
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.manifest_records import Manifest, Variant
from llama_proc.provision.resolve import ensure_server, resolve_server

if TYPE_CHECKING:
    from http_server import FileServer

    from llama_proc.provision.cache.record import Install

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell shims")

TAG = "b11434"
CPU = "linux-x86_64-cpu"
ASSET = f"llama-{TAG}-bin-ubuntu-x64.tar.gz"
REPO_ROOT = Path(llama_proc.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)


@pytest.fixture(autouse=True)
def _no_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle, "find_bundled", lambda root=None: None)


@pytest.fixture
def release(tmp_path: Path) -> ReleaseFixture:
    return make_release(tmp_path, TAG, ["ubuntu-x64"])


@pytest.fixture
def manifest(tmp_path: Path, release: ReleaseFixture) -> Manifest:
    return load_manifest(write_variants_toml(tmp_path / "variants.toml", release))


@pytest.fixture
def settings(tmp_path: Path, server: FileServer) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", mirror=server.url, progress=False)


@pytest.fixture
def served(server: FileServer, release: ReleaseFixture) -> FileServer:
    serve_release(server, release)
    return server


class FakeBuild:
    """Stands in for build_variant: installs a shim through the real cache code."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self,
        variant: Variant,
        settings: Settings,
        *,
        manifest: Manifest | None = None,
        force: bool = False,
        explain: list[str] | None = None,
        **kw: Any,
    ) -> Install:
        assert manifest is not None
        self.calls.append({"variant": variant.id, "force": force, **kw})
        shim = shim_script(TAG, version_line="version: 0.6.0-dev (build 11434, commit unknown)")

        def populate(staging: Path) -> dict[str, Any]:
            for name in ("llama-server", "ggml-rpc-server"):
                (staging / name).write_text(shim)
                (staging / name).chmod(0o755)
            return {"variant_id": variant.id, "build": manifest.build, "source": "built"}

        if explain is not None:
            explain.append("fake build ran")
        return install_atomically(
            install_dir(settings, manifest.build, variant.id),
            populate,
            settings=settings,
            binaries=variant.binaries,
            os_name=variant.os,
            force=force,
        )


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch) -> FakeBuild:
    fake = FakeBuild()
    monkeypatch.setattr(build_module, "build_variant", fake)
    return fake


def _custom_release(tmp_path: Path, *, failing: bool = False, padding: int = 0) -> ReleaseFixture:
    """An ubuntu-x64 release whose archive we shape: a failing shim, or a big library."""
    top = f"llama-{TAG}"
    shim = (
        "#!/bin/sh\necho 'fake llama-server: cannot run here' >&2\nexit 1\n"
        if failing
        else shim_script(TAG)
    ).encode()
    entries: list[tuple[str, Any]] = [
        (f"{top}/", {"dir": True}),
        (f"{top}/llama-server", (shim, 0o755)),
        (f"{top}/ggml-rpc-server", (shim, 0o755)),
    ]
    if padding:
        entries.append((f"{top}/libggml-pad.so", os.urandom(padding)))
    archive = make_tar(tmp_path / ASSET, entries)
    return make_release(
        tmp_path / "custom", TAG, variants=[], extra_assets={ASSET: archive.read_bytes()}
    )


def _record(install: Install) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((install.path / INSTALL_JSON).read_text())
    return data


def _staging_leftovers(settings: Settings) -> list[Path]:
    root = settings.cache_dir / "servers" / TAG
    return sorted(p for p in root.glob(".*incoming*")) if root.exists() else []


# ----------------------------------------------------------------------------- the ladder
@needs_linux
def test_prebuilt_install_then_cache_hit(
    served: FileServer, release: ReleaseFixture, manifest: Manifest, settings: Settings
) -> None:
    explain: list[str] = []
    install = ensure_server(settings, host=LINUX, manifest=manifest, explain=explain)
    assert install.path == install_dir(settings, TAG, CPU)
    assert install.server_binary == install.path / "llama-server"
    assert install.source == "prebuilt"
    assert install.version == "version: 11434 (abcdef0)"
    steps = [line.split(":")[0] for line in explain]
    assert steps == ["explicit", "select", "select", "select", "bundled", "cache", "prebuilt"]
    assert explain[-1] == f"prebuilt: installed {TAG}/{CPU} (version: 11434 (abcdef0))"
    assert served.hits(release.download_path(ASSET)) == 1
    assert served.hits(release.listing_url_path) == 1

    record = _record(install)
    sha = release.sha256(ASSET)
    assert record["variant_id"] == CPU
    assert record["build"] == TAG
    assert record["source"] == "prebuilt"
    assert record["url"] == f"{served.url}/ggml-org/llama.cpp/releases/download/{TAG}/{ASSET}"
    assert record["sha256"] == sha
    assert record["assets"] == [
        {
            "name": ASSET,
            "url": record["url"],
            "sha256": sha,
            "size": release.assets[ASSET][0].stat().st_size,
        }
    ]
    assert record["version_output"].startswith("version: 11434 (abcdef0)")
    assert record["llama_proc_version"] == llama_proc.__version__
    assert record["host"]["summary"] == LINUX.summary()
    assert record["size"] > 0
    assert record["created"]
    # The archive's libllama symlink chain survived; the download itself was not kept.
    assert (install.path / "libllama.so").is_symlink()
    assert (install.path / "libllama.so").resolve().name == "libllama.so.0.0.1"
    assert not (downloads_dir(settings) / ASSET).exists()

    before = served.hits()
    explain2: list[str] = []
    again = ensure_server(settings, host=LINUX, manifest=manifest, explain=explain2)
    assert again == install
    assert served.hits() == before
    assert explain2[-1] == f"cache: hit {TAG}/{CPU} (prebuilt, version: 11434 (abcdef0))"


@needs_linux
def test_offline_uses_the_cache(served: FileServer, manifest: Manifest, settings: Settings) -> None:
    install = ensure_server(settings, host=LINUX, manifest=manifest)
    before = served.hits()
    offline = settings.replace(offline=True)
    assert ensure_server(offline, host=LINUX, manifest=manifest) == install
    assert served.hits() == before


def test_offline_without_cache_makes_no_request(
    served: FileServer, manifest: Manifest, settings: Settings, fake_build: FakeBuild
) -> None:
    explain: list[str] = []
    with pytest.raises(OfflineError, match="llama-proc fetch"):
        ensure_server(
            settings.replace(offline=True), host=LINUX, manifest=manifest, explain=explain
        )
    assert served.hits() == 0
    assert fake_build.calls == []
    assert "prebuilt: skipped (offline)" in explain
    assert list_installs(settings) == []


@needs_linux
def test_offline_with_a_file_mirror_installs(
    tmp_path: Path, release: ReleaseFixture, manifest: Manifest
) -> None:
    mirror = tmp_path / "mirror"
    listing = mirror / "repos" / release.repo / "releases" / "tags" / TAG
    listing.parent.mkdir(parents=True)
    listing.write_text(release.listing_path.read_text())
    asset = mirror / release.repo / "releases" / "download" / TAG / ASSET
    asset.parent.mkdir(parents=True)
    asset.write_bytes(release.assets[ASSET][0].read_bytes())
    settings = Settings(
        cache_dir=tmp_path / "cache", mirror=mirror.as_uri(), offline=True, progress=False
    )
    install = ensure_server(settings, host=LINUX, manifest=manifest)
    assert install.source == "prebuilt"
    assert (
        _record(install)["url"]
        == f"{mirror.as_uri()}/{release.repo}/releases/download/{TAG}/{ASSET}"
    )


def test_explicit_binary_wins_without_any_lookup(
    served: FileServer, tmp_path: Path, settings: Settings
) -> None:
    binary = tmp_path / "my-llama-server"
    binary.write_text(shim_script(TAG))
    binary.chmod(0o755)
    broken = Manifest(
        schema=1, repo="x/y", build="b1", commit="", source=None,  # type: ignore[arg-type]
        cmake_flags=(), smoke_model=None, variants=(),
    )  # fmt: skip
    explain: list[str] = []
    install = ensure_server(
        settings.replace(server_binary=binary), manifest=broken, explain=explain
    )
    assert install.source == "explicit"
    assert install.server_binary == binary.resolve()
    assert explain == [f"explicit: using {binary.resolve()} (LLAMA_PROC_SERVER_BIN)"]
    assert served.hits() == 0
    with pytest.raises(BinaryNotFoundError, match="LLAMA_PROC_SERVER_BIN"):
        ensure_server(settings.replace(server_binary=tmp_path / "missing"))


@needs_linux
def test_force_reinstalls(
    served: FileServer, release: ReleaseFixture, manifest: Manifest, settings: Settings
) -> None:
    first = ensure_server(settings, host=LINUX, manifest=manifest)
    (first.path / "marker").write_text("old install")
    explain: list[str] = []
    second = ensure_server(settings, host=LINUX, manifest=manifest, force=True, explain=explain)
    assert second.path == first.path
    assert not (second.path / "marker").exists()
    assert "cache: skipped (--force)" in explain
    assert served.hits(release.download_path(ASSET)) == 2
    assert _staging_leftovers(settings) == []
    assert not list(second.path.parent.glob(".*old*"))


@needs_linux
def test_rpc_variant_provides_the_worker(
    served: FileServer, manifest: Manifest, settings: Settings
) -> None:
    install = ensure_server(settings.replace(variant="rpc"), host=LINUX, manifest=manifest)
    assert install.variant_id == "linux-x86_64-rpc"
    assert install.binary("rpc-server").name == "ggml-rpc-server"
    assert install.binary("rpc-server").parent == install.path


def test_windows_cuda_runtime_lands_beside_the_server(
    server: FileServer, tmp_path: Path, settings: Settings
) -> None:
    release = make_release(tmp_path, TAG, ["win-cuda-12.4-x64"])
    serve_release(server, release)
    manifest = load_manifest(write_variants_toml(tmp_path / "variants.toml", release))
    host = HostInfo(
        os="windows",
        arch="x86_64",
        os_version="10.0.22631",
        cpu_features=frozenset({"avx2"}),
        nvidia_driver="551.61",
        cuda_version="12.4",
    )
    install = ensure_server(settings, host=host, manifest=manifest)
    assert install.variant_id == "windows-x86_64-cuda"
    assert install.server_binary == install.path / "llama-server.exe"
    assert (install.path / "cudart64_12.dll").is_file()
    assert (install.path / "cublas64_12.dll").is_file()
    record = _record(install)
    assert [a["name"] for a in record["assets"]] == [
        f"llama-{TAG}-bin-win-cuda-12.4-x64.zip",
        "cudart-llama-bin-win-cuda-12.4-x64.zip",
    ]
    assert record["smoke_check"].startswith("skipped")  # Windows binaries do not run here


def test_checksum_mismatch_does_not_fall_back(
    server: FileServer,
    release: ReleaseFixture,
    manifest: Manifest,
    settings: Settings,
    fake_build: FakeBuild,
) -> None:
    serve_release(server, release, wrong_bytes=True)
    with pytest.raises(ChecksumMismatchError):
        ensure_server(settings, host=LINUX, manifest=manifest)
    assert fake_build.calls == []
    assert list_installs(settings) == []
    assert _staging_leftovers(settings) == []
    assert not list(downloads_dir(settings).glob("*.part"))


def test_missing_asset_falls_back_to_a_build(
    server: FileServer,
    tmp_path: Path,
    settings: Settings,
    fake_build: FakeBuild,
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = make_release(tmp_path, TAG, ["macos-arm64"])
    serve_release(server, release)
    manifest = load_manifest(write_variants_toml(tmp_path / "variants.toml", release))
    explain: list[str] = []
    with caplog.at_level(logging.WARNING, logger="llama_proc"):
        install = ensure_server(settings, host=LINUX, manifest=manifest, explain=explain)
    assert install.source == "built"
    assert [c["variant"] for c in fake_build.calls] == [CPU]
    assert any("falling back to a source build" in line for line in explain)
    assert "fake build ran" in explain
    assert any("building from source" in r.getMessage() for r in caplog.records)


def test_missing_asset_without_builds_names_the_assets(
    server: FileServer, tmp_path: Path, settings: Settings, fake_build: FakeBuild
) -> None:
    release = make_release(tmp_path, TAG, ["macos-arm64"])
    serve_release(server, release)
    manifest = load_manifest(write_variants_toml(tmp_path / "variants.toml", release))
    with pytest.raises(NoMatchingVariantError, match="macos-arm64"):
        ensure_server(settings.replace(no_build=True), host=LINUX, manifest=manifest)
    assert fake_build.calls == []


def test_host_blockers_skip_the_prebuilt(
    served: FileServer, manifest: Manifest, settings: Settings, fake_build: FakeBuild
) -> None:
    old = HostInfo(os="linux", arch="x86_64", libc="glibc", libc_version="2.31")
    explain: list[str] = []
    install = ensure_server(settings, host=old, manifest=manifest, explain=explain)
    assert install.source == "built"
    assert "prebuilt: skipped, the prebuilt needs glibc >= 2.35; this host has 2.31" in explain
    assert served.hits() == 0
    with pytest.raises(BinaryNotFoundError, match=r"glibc >= 2\.35.*LLAMA_PROC_NO_BUILD"):
        ensure_server(
            settings.replace(no_build=True, variant="vulkan"),
            host=old,
            manifest=manifest,
        )


def test_prefer_source_builds_first(
    served: FileServer, manifest: Manifest, settings: Settings, fake_build: FakeBuild
) -> None:
    explain: list[str] = []
    install = ensure_server(
        settings.replace(prefer="source"), host=LINUX, manifest=manifest, explain=explain
    )
    assert install.source == "built"
    assert served.hits() == 0
    assert not any(line.startswith("prebuilt") for line in explain)


@needs_linux
def test_no_prebuilt_replaces_a_cached_prebuilt(
    served: FileServer, manifest: Manifest, settings: Settings, fake_build: FakeBuild
) -> None:
    prebuilt = ensure_server(settings, host=LINUX, manifest=manifest)
    assert prebuilt.source == "prebuilt"
    explain: list[str] = []
    no_prebuilt = settings.replace(no_prebuilt=True)
    built = ensure_server(no_prebuilt, host=LINUX, manifest=manifest, explain=explain)
    assert built.source == "built"
    assert built.path == prebuilt.path
    assert fake_build.calls[0]["force"] is True
    assert any("is a prebuilt and LLAMA_PROC_NO_PREBUILT is set" in line for line in explain)
    assert "prebuilt: skipped, LLAMA_PROC_NO_PREBUILT is set" in explain
    # Now the built one is a cache hit, with or without the setting.
    assert ensure_server(no_prebuilt, host=LINUX, manifest=manifest) == built
    assert len(fake_build.calls) == 1


@needs_linux
def test_smoke_check_failure_installs_nothing(
    server: FileServer, tmp_path: Path, settings: Settings, fake_build: FakeBuild
) -> None:
    release = _custom_release(tmp_path, failing=True)
    serve_release(server, release)
    manifest = load_manifest(write_variants_toml(tmp_path / "variants.toml", release))
    with pytest.raises(ProvisionError, match=r"--version failed.*cannot run here"):
        ensure_server(settings.replace(no_build=True), host=LINUX, manifest=manifest)
    assert list_installs(settings) == []
    assert not install_dir(settings, TAG, CPU).exists()
    assert _staging_leftovers(settings) == []
    # With builds allowed, a prebuilt that cannot run here is a reason to compile.
    install = ensure_server(settings, host=LINUX, manifest=manifest)
    assert install.source == "built"


def test_which_does_not_provision(
    served: FileServer, manifest: Manifest, settings: Settings, fake_build: FakeBuild
) -> None:
    explain: list[str] = []
    with pytest.raises(BinaryNotFoundError, match="llama-proc fetch"):
        resolve_server(settings, explain=explain, provision=False, host=LINUX, manifest=manifest)
    assert served.hits() == 0
    assert fake_build.calls == []
    assert explain[-1].startswith("cache: miss")


def test_bundled_install_is_used_when_it_fits(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    served: FileServer,
    manifest: Manifest,
    settings: Settings,
) -> None:
    def populate(staging: Path) -> dict[str, Any]:
        (staging / "llama-server").write_text(shim_script(TAG))
        (staging / "llama-server").chmod(0o755)
        return {"variant_id": CPU, "build": TAG, "source": "bundled"}

    bundled = install_atomically(
        tmp_path / "site" / "_bundled",
        populate,
        settings=settings,
        binaries=["llama-server"],
        os_name="linux",
    )
    monkeypatch.setattr(bundle, "find_bundled", lambda root=None: bundled)
    explain: list[str] = []
    assert ensure_server(settings, host=LINUX, manifest=manifest, explain=explain) == bundled
    assert explain[-1] == f"bundled: using {CPU} {TAG} at {bundled.path}"
    assert served.hits() == 0
    explain.clear()
    with pytest.raises(BinaryNotFoundError):
        resolve_server(
            settings.replace(variant="rpc"),
            explain=explain,
            provision=False,
            host=LINUX,
            manifest=manifest,
        )
    assert f"bundled: skipped, it is {CPU} {TAG} and linux-x86_64-rpc is wanted" in explain


def test_lock_timeout_is_not_a_reason_to_build(
    served: FileServer, manifest: Manifest, settings: Settings, fake_build: FakeBuild
) -> None:
    target = install_dir(settings, TAG, CPU)
    target.parent.mkdir(parents=True)
    with FileLock(str(target.parent / f"{target.name}.lock")), pytest.raises(CacheLockTimeoutError):
        ensure_server(settings.replace(lock_timeout=0.3), host=LINUX, manifest=manifest)
    assert fake_build.calls == []
    assert served.hits() == 0


# ----------------------------------------------------------------------------- processes
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from llama_proc.config import Settings
    from llama_proc.provision.manifest import load_manifest
    from llama_proc.provision.host.platform import HostInfo
    from llama_proc.provision.resolve import ensure_server

    cache, mirror, manifest_path, mode, marker = sys.argv[1:6]
    if mode == "slow-extract":
        from llama_proc.provision.fetch import archive

        real = archive.extract_archive

        def slow(path, dest, **kw):
            root = real(path, dest, **kw)
            Path(marker).write_text("extracted")
            time.sleep(120)
            return root

        archive.extract_archive = slow
    host = HostInfo(os="linux", arch="x86_64", libc="glibc", libc_version="2.39",
                    cpu_features=frozenset({"avx2"}))
    settings = Settings(cache_dir=Path(cache), mirror=mirror, no_build=True, progress=False,
                        compute_check=False)  # the shims only print --version
    explain = []
    install = ensure_server(settings, host=host, manifest=load_manifest(manifest_path),
                            explain=explain)
    print(json.dumps({"path": str(install.server_binary), "explain": explain}))
    """
)


def _child(
    tmp_path: Path, settings: Settings, manifest: Manifest, mode: str = "plain"
) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    if not script.exists():  # rewriting it while a sibling starts would hand it an empty file
        script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_PROC_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(settings.cache_dir),
            str(settings.mirror),
            manifest.path,
            mode,
            str(tmp_path / "marker"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@needs_linux
def test_concurrent_processes_download_once(
    server: FileServer,
    release: ReleaseFixture,
    manifest: Manifest,
    settings: Settings,
    tmp_path: Path,
) -> None:
    # A slow asset keeps the first installer inside the lock while the others arrive.
    serve_release(server, release, delay=0.25, chunk_size=64)
    children = [_child(tmp_path, settings, manifest) for _ in range(4)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        results.append(json.loads(out))
    assert server.hits(release.download_path(ASSET)) == 1
    assert server.hits(release.listing_url_path) == 1
    assert len({r["path"] for r in results}) == 1
    assert results[0]["path"] == str(install_dir(settings, TAG, CPU) / "llama-server")
    # They really raced: more than one missed the cache and then waited on the lock.
    missed = [r for r in results if any(l.startswith("cache: miss") for l in r["explain"])]
    assert len(missed) >= 2
    # One installed; the others that missed found it done after waiting, and say so.
    last = [r["explain"][-1] for r in missed]
    assert sum(line.startswith("prebuilt: installed ") for line in last) == 1
    waited = [line for line in last if not line.startswith("prebuilt: installed ")]
    line = f"prebuilt: already installed by another process: {TAG}/{CPU} (version: 11434 (abcdef0))"
    assert waited == [line] * (len(missed) - 1)
    assert [i.id for i in list_installs(settings)] == [f"{TAG}/{CPU}"]


def _kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL


@needs_linux
def test_kill_during_download_then_resume(
    server: FileServer, manifest: Manifest, settings: Settings, tmp_path: Path
) -> None:
    release = _custom_release(tmp_path, padding=1_500_000)
    size = release.assets[ASSET][0].stat().st_size
    manifest = load_manifest(write_variants_toml(tmp_path / "variants.toml", release))
    serve_release(server, release, delay=0.2, chunk_size=64 * 1024)
    part = downloads_dir(settings) / f"{ASSET}.part"
    child = _child(tmp_path, settings, manifest)
    _wait_for(lambda: part.is_file() and part.stat().st_size > 0, 60, "a partial download")
    _kill(child)
    target = install_dir(settings, TAG, CPU)
    assert not target.exists()
    assert list_installs(settings) == []
    kept = part.stat().st_size
    assert 0 < kept < size

    server.route(release.download_path(ASSET)).delay = 0
    install = ensure_server(settings.replace(no_build=True), host=LINUX, manifest=manifest)
    assert install.path == target
    assert (target / INSTALL_JSON).is_file()
    hits = server.requests_for(release.download_path(ASSET))
    assert hits[-1].header("Range") == f"bytes={kept}-"
    assert _staging_leftovers(settings) == []
    assert not part.exists()


@needs_linux
def test_kill_during_extraction_then_recover(
    served: FileServer,
    release: ReleaseFixture,
    manifest: Manifest,
    settings: Settings,
    tmp_path: Path,
) -> None:
    marker = tmp_path / "marker"
    child = _child(tmp_path, settings, manifest, mode="slow-extract")
    _wait_for(marker.exists, 60, "the extraction")
    _kill(child)
    target = install_dir(settings, TAG, CPU)
    assert not target.exists()
    assert list_installs(settings) == []
    assert len(_staging_leftovers(settings)) == 1  # half an install, under its hidden name

    explain: list[str] = []
    install = ensure_server(
        settings.replace(no_build=True), host=LINUX, manifest=manifest, explain=explain
    )
    assert install.path == target
    assert _staging_leftovers(settings) == []
    assert install.server_binary.is_file()
    # The verified archive survived the crash, so recovery needed no second download.
    assert served.hits(release.download_path(ASSET)) == 1


# ----------------------------------------------------------------------------- remembered plans
@pytest.fixture
def host_install(tmp_path: Path) -> tuple[Settings, Install]:
    """An install of the variant this host would pick from the shipped manifest (a shim)."""
    settings = Settings(cache_dir=tmp_path / "cache", progress=False)
    res = resolve_module.plan(settings)
    shim = shim_script(res.build)

    def populate(staging: Path) -> dict[str, Any]:
        for name in ("llama-server", "ggml-rpc-server"):
            (staging / name).write_text(shim)
            (staging / name).chmod(0o755)
        return {"variant_id": res.variant.id, "build": res.build, "source": "prebuilt"}

    install = install_atomically(
        install_dir(settings, res.build, res.variant.id),
        populate,
        settings=settings,
        binaries=res.variant.binaries,
        os_name=res.variant.os,
    )
    return settings, install


def _no_planning(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: Any, **_k: Any) -> Any:
        pytest.fail("a remembered plan must not parse the manifest or probe the host")

    monkeypatch.setattr(platform_module, "detect_host", refuse)
    monkeypatch.setattr(manifest_module, "load_manifest", refuse)


@needs_linux
def test_cache_hit_uses_the_remembered_plan(
    host_install: tuple[Settings, Install], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, install = host_install
    first: list[str] = []
    assert resolve_server(settings, explain=first, provision=False) == install
    assert (settings.cache_dir / "servers" / memo.MEMO_FILE).is_file()
    _no_planning(monkeypatch)
    again: list[str] = []
    assert resolve_server(settings, explain=again, provision=False) == install
    assert again == first  # the same lines, select steps included
    assert [(s.step, s.outcome) for s in steps(again)][-2:] == [
        (StepName.BUNDLED, Outcome.SKIPPED),
        (StepName.CACHE, Outcome.USED),
    ]


@needs_linux
def test_remembered_plan_never_answers_for_a_removed_install(
    host_install: tuple[Settings, Install], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, install = host_install
    resolve_server(settings, provision=False)
    remove(settings, install)
    _no_planning(monkeypatch)
    with pytest.raises(BinaryNotFoundError, match="llama-proc fetch"):
        resolve_server(settings, provision=False)


@needs_linux
def test_remembered_plan_is_keyed_by_host_and_settings(
    host_install: tuple[Settings, Install], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _install = host_install
    resolve_server(settings, provision=False)
    calls: list[dict[str, Any]] = []
    real = platform_module.detect_host

    def counting(**kw: Any) -> HostInfo:
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(platform_module, "detect_host", counting)
    resolve_server(settings, provision=False)
    assert calls == []
    monkeypatch.setattr(memo, "host_fingerprint", lambda: "another host")
    resolve_server(settings, provision=False)
    assert len(calls) == 1  # a new driver, boot or library set: detect again
    with pytest.raises(BinaryNotFoundError):
        resolve_server(settings.replace(build="b1"), provision=False)
    assert len(calls) == 2


def test_given_host_or_manifest_is_never_remembered(
    manifest: Manifest, settings: Settings, tmp_path: Path
) -> None:
    (settings.cache_dir / "servers").mkdir(parents=True)
    with pytest.raises(BinaryNotFoundError):
        resolve_server(settings, provision=False, host=LINUX, manifest=manifest)
    assert not (settings.cache_dir / "servers" / memo.MEMO_FILE).exists()


def test_no_fingerprint_means_no_memo(
    host_install: tuple[Settings, Install], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, install = host_install
    monkeypatch.setattr(memo, "host_fingerprint", lambda: None)
    assert resolve_server(settings, provision=False) == install
    assert not (settings.cache_dir / "servers" / memo.MEMO_FILE).exists()


@needs_linux
def test_cache_hit_imports_no_download_manifest_or_probe_code(
    host_install: tuple[Settings, Install],
) -> None:
    settings, install = host_install
    code = textwrap.dedent(
        """
        import sys
        from llama_proc import cli
        assert cli.main(["which"]) == 0
        heavy = ("requests", "tqdm", "filelock", "tomllib", "packaging", "ctypes", "subprocess",
                 "tarfile", "zipfile", "llama_proc.provision.manifest",
                 "llama_proc.provision.host.platform", "llama_proc.provision.fetch.download")
        print(sorted(m for m in sys.modules if m.startswith(heavy)))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_PROC_")}
    env["LLAMA_PROC_CACHE_DIR"] = str(settings.cache_dir)
    env["PYTHONPATH"] = str(REPO_ROOT)
    for _ in range(2):  # the first run plans and remembers; the second is the hit path
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        )
        assert out.returncode == 0, out.stderr
    first_line, modules = out.stdout.splitlines()
    assert first_line == str(install.server_binary)
    assert modules == "[]"


def test_step_is_its_line_and_carries_its_fields() -> None:
    step = Step(StepName.CACHE, Outcome.USED, "hit b1/x (prebuilt, ?)")
    assert step == "cache: hit b1/x (prebuilt, ?)"
    assert f"  {step}" == "  cache: hit b1/x (prebuilt, ?)"
    assert (step.step, step.outcome, step.reason) == ("cache", "used", "hit b1/x (prebuilt, ?)")
    assert type(step.text) is str
    assert json.loads(json.dumps([step])) == [step.text]
    again = pickle.loads(pickle.dumps(step))
    assert isinstance(again, Step)
    assert (again.step, again.outcome, again.reason) == (step.step, step.outcome, step.reason)
    with pytest.raises(AttributeError):
        step.reason = "changed"
    assert steps([step, "a plain line"]) == [step]


# ----------------------------------------------------------------------------- cache ownership
def _plant(install: Install, tmp_path: Path) -> Path:
    """Replace the installed llama-server with a program that leaves a mark when run."""
    mark = tmp_path / "planted-ran"
    install.server_binary.write_text(f"#!/bin/sh\ntouch {mark}\n")
    return mark


@needs_linux
@pytest.mark.parametrize("folder", ["cache", "servers", "build", "install"])
def test_a_cache_folder_writable_by_others_is_refused(
    served: FileServer,
    manifest: Manifest,
    settings: Settings,
    tmp_path: Path,
    folder: str,
) -> None:
    install = ensure_server(settings, host=LINUX, manifest=manifest)
    mark = _plant(install, tmp_path)
    target = {
        "cache": settings.cache_dir,
        "servers": settings.cache_dir / "servers",
        "build": install.path.parent,
        "install": install.path,
    }[folder]
    target.chmod(0o777)

    with pytest.raises(ProvisionError) as info:
        ensure_server(settings, host=LINUX, manifest=manifest)

    message = str(info.value)
    assert "\n" not in message
    assert str(target) in message
    assert "chmod go-w" in message
    assert "LLAMA_PROC_CACHE_DIR" in message
    assert not mark.exists()


@needs_linux
def test_a_cache_of_another_user_is_refused(
    served: FileServer, manifest: Manifest, settings: Settings, tmp_path: Path
) -> None:
    install = ensure_server(settings, host=LINUX, manifest=manifest)
    mark = _plant(install, tmp_path)
    other = os.geteuid() + 4242
    os.chown(install.path, other, -1)

    with pytest.raises(ProvisionError, match=f"owned by uid {other}") as info:
        ensure_server(settings, host=LINUX, manifest=manifest)

    assert "\n" not in str(info.value)
    assert "chown" in str(info.value)
    assert not mark.exists()


@needs_linux
def test_a_private_cache_is_accepted(
    served: FileServer, manifest: Manifest, settings: Settings
) -> None:
    install = ensure_server(settings, host=LINUX, manifest=manifest)
    settings.cache_dir.chmod(0o700)
    install.path.chmod(0o755)
    assert ensure_server(settings, host=LINUX, manifest=manifest) == install
