"""Upstream's release scheme since Aug 2026: semver tags name the ``b`` build that has binaries.

``v1.0.0`` carries only ``nightly-tag.txt``; the ``b`` tags carry the binaries and are marked
prerelease, so GitHub's ``/releases/latest`` points at a tag without binaries. Everything is
served by a loopback mirror in GitHub's layout.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest
from release_fixtures import (
    LINUX,
    ReleaseFixture,
    make_release,
    needs_linux,
    serve_release,
    serve_semver_release,
    write_variants_toml,
)

from llama_proc.config import Settings
from llama_proc.errors import ConfigError, OfflineError, ProvisionError
from llama_proc.provision import bundle
from llama_proc.provision.fetch import download
from llama_proc.provision.fetch.nightly import resolve_build
from llama_proc.provision.fetch.pins import pin_release
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.resolve import ensure_server

if TYPE_CHECKING:
    from pathlib import Path

    from http_server import FileServer

    from llama_proc.provision.manifest_records import Manifest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell shims")

REPO = "ggml-org/llama.cpp"
TAG = "b11434"


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)


@pytest.fixture(autouse=True)
def _no_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle, "find_bundled", lambda root=None: None)


@pytest.fixture
def release(tmp_path: Path) -> ReleaseFixture:
    # Upstream marks the b tags prerelease: they must still be used.
    return make_release(tmp_path, TAG, ["ubuntu-x64"], prerelease=True)


@pytest.fixture
def manifest(tmp_path: Path, release: ReleaseFixture) -> Manifest:
    return load_manifest(write_variants_toml(tmp_path / "variants.toml", release))


@pytest.fixture
def settings(tmp_path: Path, server: FileServer) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", mirror=server.url, progress=False)


# --------------------------------------------------------------------------- parsing the setting
@pytest.mark.parametrize(
    ("raw", "parsed"),
    [("v1.0.0", "v1.0.0"), ("V0.2.0", "v0.2.0"), ("latest", "latest"), ("b0042", "b42")],
)
def test_build_setting_accepts_semver_and_latest(raw: str, parsed: str, tmp_path: Path) -> None:
    env = {"LLAMA_PROC_BUILD": raw, "LLAMA_PROC_CACHE_DIR": str(tmp_path)}
    assert Settings.from_env(env=env).build == parsed


@pytest.mark.parametrize("raw", ["1.0", "v1.0", "v1.0.0-rc1", "newest", "../b1"])
def test_build_setting_refuses_other_spellings(raw: str, tmp_path: Path) -> None:
    env = {"LLAMA_PROC_BUILD": raw, "LLAMA_PROC_CACHE_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match="LLAMA_PROC_BUILD") as info:
        Settings.from_env(env=env)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- resolving a tag
def test_b_tag_resolves_to_itself_without_a_request(server: FileServer, settings: Settings) -> None:
    assert resolve_build(TAG, REPO, settings) == TAG
    assert server.hits() == 0


def test_semver_tag_resolves_through_nightly_tag_txt_to_a_prerelease_b_tag(
    server: FileServer, settings: Settings, release: ReleaseFixture
) -> None:
    serve_release(server, release)
    asset = serve_semver_release(server, "v1.0.0", f"{TAG}\n".encode())
    assert resolve_build("v1.0.0", REPO, settings) == TAG
    assert server.hits(asset) == 1
    # The mapping of a semver tag is fixed: a second resolution makes no request, even offline.
    before = server.hits()
    offline = Settings(cache_dir=settings.cache_dir, mirror=settings.mirror, offline=True)
    assert resolve_build("v1.0.0", REPO, offline) == TAG
    assert server.hits() == before


def test_latest_follows_releases_latest_through_its_nightly_tag_txt(
    server: FileServer, settings: Settings, release: ReleaseFixture
) -> None:
    """/releases/latest is the semver tag without binaries; the b build it names is used."""
    serve_release(server, release)
    serve_semver_release(server, "v1.0.0", f"{TAG}\n".encode(), latest=True)
    assert resolve_build("latest", REPO, settings) == TAG


def test_latest_that_is_a_b_tag_with_binaries_is_used_as_is(
    server: FileServer, settings: Settings, release: ReleaseFixture
) -> None:
    serve_release(server, release)
    server.add_json(f"/repos/{REPO}/releases/latest", release.listing)
    assert resolve_build("latest", REPO, settings) == TAG


def test_latest_is_refused_offline_with_a_hint(tmp_path: Path) -> None:
    offline = Settings(cache_dir=tmp_path, offline=True)
    with pytest.raises(OfflineError, match="--build bNNNN"):
        resolve_build("latest", REPO, offline)


def test_nightly_tag_naming_a_missing_release_is_refused(
    server: FileServer, settings: Settings
) -> None:
    serve_semver_release(server, "v1.0.0", b"b99999\n")
    with pytest.raises(ProvisionError) as info:
        resolve_build("v1.0.0", REPO, settings)
    text = str(info.value)
    assert "v1.0.0" in text
    assert "b99999" in text
    assert "\n" not in text


def test_nightly_tag_naming_a_release_without_binaries_is_refused(
    server: FileServer, settings: Settings
) -> None:
    serve_semver_release(server, "v1.0.0", b"v0.9.0\n")
    serve_semver_release(server, "v0.9.0", b"b1\n")
    serve_semver_release(server, "v1.1.0", b"b7\n")
    server.add_json(
        f"/repos/{REPO}/releases/tags/b7",
        {"tag_name": "b7", "prerelease": True, "assets": []},
    )
    with pytest.raises(ProvisionError, match="b<digits>"):
        resolve_build("v1.0.0", REPO, settings)  # names a semver tag: not followed
    with pytest.raises(ProvisionError, match="no binaries"):
        resolve_build("v1.1.0", REPO, settings)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"b11434\nb11435\n", id="two-lines"),
        pytest.param(b"../b11434", id="dot-dot"),
        pytest.param(b"b11434/../../x", id="path"),
        pytest.param(b"master", id="not-b-digits"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe", id="not-text"),
        pytest.param(b" b11434", id="leading-space"),
    ],
)
def test_hostile_nightly_tag_txt_is_refused(
    server: FileServer, settings: Settings, release: ReleaseFixture, body: bytes
) -> None:
    serve_release(server, release)
    serve_semver_release(server, "v1.0.0", body)
    with pytest.raises(ProvisionError) as info:
        resolve_build("v1.0.0", REPO, settings)
    assert "nightly-tag.txt" in str(info.value)
    assert "\n" not in str(info.value)
    # Nothing was resolved, so nothing is remembered.
    assert not list(settings.cache_dir.rglob("*.nightly.json"))


@pytest.mark.parametrize("claimed", [None, 7], ids=["honest-size", "lying-size"])
def test_huge_nightly_tag_txt_is_refused_after_a_few_bytes(
    server: FileServer, settings: Settings, claimed: int | None
) -> None:
    huge = b"b1" + b"1" * (32 << 20)
    path = serve_semver_release(server, "v1.0.0", huge, size=claimed)
    with pytest.raises(ProvisionError, match=r"nightly-tag\.txt"):
        resolve_build("v1.0.0", REPO, settings)
    # An honest listing is refused before the download; a lying one is cut off early.
    if claimed is None:
        assert server.hits(path) == 0
    else:
        assert server.bytes_sent(path) < len(huge) // 2


# --------------------------------------------------------------------------- end to end
@needs_linux
def test_ensure_server_with_semver_build_installs_the_b_build(
    server: FileServer, settings: Settings, release: ReleaseFixture, manifest: Manifest
) -> None:
    serve_release(server, release)
    serve_semver_release(server, "v1.0.0", f"{TAG}\n".encode())
    wanted = Settings(cache_dir=settings.cache_dir, mirror=settings.mirror, build="v1.0.0")
    explain: list[str] = []
    install = ensure_server(wanted, host=LINUX, manifest=manifest, explain=explain)
    assert install.build == TAG
    assert install.version == "version: 11434 (abcdef0)"
    assert any("v1.0.0" in line and TAG in line for line in explain)


@needs_linux
def test_ensure_server_latest_installs_the_b_build(
    server: FileServer, settings: Settings, release: ReleaseFixture, manifest: Manifest
) -> None:
    serve_release(server, release)
    serve_semver_release(server, "v1.0.0", f"{TAG}\n".encode(), latest=True)
    wanted = Settings(cache_dir=settings.cache_dir, mirror=settings.mirror, build="latest")
    install = ensure_server(wanted, host=LINUX, manifest=manifest)
    assert install.build == TAG


def test_pin_resolves_a_semver_build(
    server: FileServer, settings: Settings, release: ReleaseFixture, manifest: Manifest
) -> None:
    serve_release(server, release)
    serve_semver_release(server, "v1.0.0", f"{TAG}\n".encode())
    server.add_json(f"/repos/{REPO}/commits/{TAG}", {"sha": "c" * 40})
    pins = pin_release("v1.0.0", settings, manifest=manifest)
    assert pins.build == TAG
    assert pins.commit == "c" * 40
