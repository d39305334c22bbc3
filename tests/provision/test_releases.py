"""Release listings (GitHub API shape) from a local mirror, the cache, and asset matching."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

import pytest
from http_server import FileServer
from release_fixtures import ReleaseFixture, make_release, serve_release

from llama_proc.config import Settings
from llama_proc.errors import (
    DownloadError,
    ManifestError,
    NoMatchingVariantError,
    OfflineError,
    ProvisionError,
)
from llama_proc.provision import download
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.releases import (
    GITHUB_API,
    ReleaseAsset,
    api_base,
    fetch_release_assets,
    listing_cache_path,
    match_assets,
    parse_listing,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

REPO = "ggml-org/llama.cpp"
TAG = "b11434"


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)


@pytest.fixture
def release(tmp_path: Path) -> ReleaseFixture:
    return make_release(tmp_path, TAG, ["ubuntu-x64", "ubuntu-vulkan-x64", "win-cuda-12.4-x64"])


@pytest.fixture
def settings(tmp_path: Path, server: FileServer) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", mirror=server.url, download_timeout=5)


def test_listing_from_mirror_parses_digest_and_rewrites_urls(
    server: FileServer, release: ReleaseFixture, settings: Settings
) -> None:
    mirror = serve_release(server, release)
    assets = fetch_release_assets(REPO, TAG, settings)
    by_name = {a.name: a for a in assets}
    assert set(by_name) == set(release.assets)
    for name, (path, sha) in release.assets.items():
        assert by_name[name].sha256 == sha
        assert by_name[name].size == path.stat().st_size
        assert by_name[name].url == f"{mirror}/{REPO}/releases/download/{TAG}/{name}"
    [hit] = server.requests_for(release.listing_url_path)
    assert hit.header("Accept") == "application/vnd.github+json"
    assert hit.header("X-GitHub-Api-Version") == "2022-11-28"


def test_rewritten_urls_download_from_the_mirror(
    server: FileServer, release: ReleaseFixture, settings: Settings, tmp_path: Path
) -> None:
    serve_release(server, release)
    asset = next(
        a for a in fetch_release_assets(REPO, TAG, settings) if a.name == release.main_asset
    )
    dest = download.download_file(
        asset.url, tmp_path / asset.name, sha256=asset.require_sha256(), settings=settings
    )
    assert dest.read_bytes() == release.assets[asset.name][0].read_bytes()


def test_listing_is_cached_and_used_offline_with_zero_requests(
    server: FileServer, release: ReleaseFixture, settings: Settings
) -> None:
    serve_release(server, release)
    online = fetch_release_assets(REPO, TAG, settings)
    cached = listing_cache_path(settings, REPO, TAG)
    assert cached == settings.cache_dir / "releases" / "ggml-org_llama.cpp" / f"{TAG}.json"
    assert json.loads(cached.read_text())["tag_name"] == TAG
    server.reset()
    offline = fetch_release_assets(REPO, TAG, settings.replace(offline=True))
    assert offline == online  # mirror URLs are applied when reading the cache as well
    assert server.hits() == 0


def test_offline_without_cache_makes_no_request(
    server: FileServer, release: ReleaseFixture, settings: Settings
) -> None:
    serve_release(server, release)
    with pytest.raises(OfflineError, match="never cached"):
        fetch_release_assets(REPO, TAG, settings.replace(offline=True))
    assert server.hits() == 0


def test_unreachable_listing_falls_back_to_the_cache(
    server: FileServer,
    release: ReleaseFixture,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    serve_release(server, release)
    first = fetch_release_assets(REPO, TAG, settings)
    server.route(release.listing_url_path).statuses.extend([503] * 10)
    assert fetch_release_assets(REPO, TAG, settings) == first
    assert "using the cached release listing" in caplog.text


def test_missing_tag_is_a_clear_error(server: FileServer, settings: Settings) -> None:
    with pytest.raises(DownloadError, match=r"HTTP 404.*release b999 not found.*LLAMA_PROC_BUILD"):
        fetch_release_assets(REPO, "b999", settings)
    assert server.hits() == 1


def test_rate_limit_names_the_token_variable(
    server: FileServer, release: ReleaseFixture, settings: Settings
) -> None:
    serve_release(server, release)
    server.route(release.listing_url_path).statuses.append(403)
    with pytest.raises(DownloadError, match="LLAMA_PROC_GITHUB_TOKEN"):
        fetch_release_assets(REPO, TAG, settings)


def test_token_is_not_sent_to_a_mirror(
    server: FileServer, release: ReleaseFixture, settings: Settings
) -> None:
    serve_release(server, release)
    fetch_release_assets(REPO, TAG, settings.replace(github_token="tok"))  # noqa: S106
    assert server.requests_for(release.listing_url_path)[0].header("Authorization") is None


def test_non_json_listing(server: FileServer, settings: Settings) -> None:
    server.add(f"/repos/{REPO}/releases/tags/{TAG}", b"<html>nope</html>", content_type="text/html")
    with pytest.raises(ProvisionError, match="did not return JSON"):
        fetch_release_assets(REPO, TAG, settings)


def test_listing_without_assets(server: FileServer, settings: Settings) -> None:
    server.add_json(f"/repos/{REPO}/releases/tags/{TAG}", {"message": "Not Found"})
    with pytest.raises(ProvisionError, match="no 'assets' list"):
        fetch_release_assets(REPO, TAG, settings)


def test_file_mirror_works_offline(tmp_path: Path, release: ReleaseFixture) -> None:
    mirror = tmp_path / "mirror"
    listing = mirror / "repos" / REPO / "releases" / "tags" / TAG
    listing.parent.mkdir(parents=True)
    listing.write_bytes(release.listing_path.read_bytes())
    settings = Settings(cache_dir=tmp_path / "cache", mirror=mirror.as_uri(), offline=True)
    assets = fetch_release_assets(REPO, TAG, settings)
    assert assets[0].url == f"{mirror.as_uri()}/{REPO}/releases/download/{TAG}/{assets[0].name}"


@pytest.mark.parametrize(
    ("repo", "tag"), [("../etc", TAG), ("a/b/c", TAG), (REPO, "../x"), (REPO, "")]
)
def test_bad_repo_or_tag(tmp_path: Path, repo: str, tag: str) -> None:
    with pytest.raises(ProvisionError):
        fetch_release_assets(repo, tag, Settings(cache_dir=tmp_path, offline=True))


def test_api_base_defaults_to_github(tmp_path: Path) -> None:
    assert api_base(Settings(cache_dir=tmp_path)) == GITHUB_API == "https://api.github.com"
    assert api_base(Settings(cache_dir=tmp_path, mirror="http://m.example/")) == "http://m.example"


def test_parse_listing_without_mirror_keeps_github_urls_and_digests() -> None:
    data = {
        "assets": [
            {"name": "a.zip", "size": 3, "browser_download_url": "https://github.com/x/a.zip",
             "digest": "sha256:" + "AB" * 32},
            {"name": "b.zip", "size": 4, "browser_download_url": "https://github.com/x/b.zip",
             "digest": None},
            {"name": "c.zip", "size": 5, "browser_download_url": "https://github.com/x/c.zip"},
            {"name": "d.zip", "size": 6, "browser_download_url": "https://github.com/x/d.zip",
             "digest": "sha512:" + "ab" * 64},
        ]
    }  # fmt: skip
    a, b, c, d = parse_listing(data, REPO, TAG)
    assert a == ReleaseAsset("a.zip", "https://github.com/x/a.zip", 3, "ab" * 32)
    assert b.sha256 is None
    assert c.sha256 is None
    assert d.sha256 is None
    with pytest.raises(ProvisionError, match=r"no sha256 is known for b\.zip"):
        b.require_sha256()


# ------------------------------------------------------------------------------- matching
UPSTREAM_NAMES = [
    f"llama-{TAG}-bin-{flavor}"
    for flavor in (
        "ubuntu-x64.tar.gz", "ubuntu-vulkan-x64.tar.gz", "ubuntu-arm64.tar.gz",
        "ubuntu-cuda-12.8-x64.tar.gz", "ubuntu-s390x.tar.gz", "macos-arm64.tar.gz",
        "macos-x64.tar.gz", "win-cpu-x64.zip", "win-cpu-arm64.zip", "win-cuda-12.4-x64.zip",
        "win-cuda-13.1-x64.zip", "win-vulkan-x64.zip", "win-hip-radeon-x64.zip",
        "win-sycl-x64.zip", "win-opencl-adreno-arm64.zip",
    )
] + [
    "cudart-llama-bin-win-cuda-12.4-x64.zip",
    "cudart-llama-bin-win-cuda-13.1-x64.zip",
    f"llama-{TAG}-xcframework.zip",
]  # fmt: skip


def _assets(names: list[str] = UPSTREAM_NAMES, *, digest: bool = True) -> list[ReleaseAsset]:
    return [
        ReleaseAsset(n, f"https://example/{n}", 10, f"{i:064x}" if digest else None)
        for i, n in enumerate(names)
    ]


def test_every_prebuilt_variant_matches_exactly_one_upstream_asset() -> None:
    manifest = load_manifest()
    for variant in manifest.variants:
        if not variant.has_prebuilt:
            continue
        main, extras = match_assets(variant, TAG, _assets())
        assert main.name in UPSTREAM_NAMES, variant.id
        assert all(e.name in UPSTREAM_NAMES for e in extras)


def test_linux_cpu_does_not_take_vulkan_or_cuda() -> None:
    variant = load_manifest().get("linux-x86_64-cpu")
    main, extras = match_assets(variant, TAG, _assets())
    assert main.name == f"llama-{TAG}-bin-ubuntu-x64.tar.gz"
    assert extras == []


def test_windows_cuda_matches_archive_and_cudart_separately() -> None:
    variant = load_manifest().get("windows-x86_64-cuda")
    main, extras = match_assets(variant, TAG, _assets())
    assert main.name == f"llama-{TAG}-bin-win-cuda-12.4-x64.zip"
    assert [e.name for e in extras] == ["cudart-llama-bin-win-cuda-12.4-x64.zip"]
    assert not variant.asset_regex(TAG).search("cudart-llama-bin-win-cuda-12.4-x64.zip")


def test_loose_cuda_pattern_matching_cudart_too_is_an_error() -> None:
    variant = dataclasses.replace(
        load_manifest().get("windows-x86_64-cuda"), asset=r"cuda-12\.4-x64\.zip$"
    )
    with pytest.raises(ManifestError, match=r"matches several assets.*cudart-llama-bin"):
        match_assets(variant, TAG, _assets())


def test_zero_matches_names_pattern_and_available_assets() -> None:
    variant = load_manifest().get("linux-x86_64-cpu")
    with pytest.raises(NoMatchingVariantError) as info:
        match_assets(variant, TAG, _assets([f"llama-{TAG}-bin-macos-arm64.tar.gz", "notes.txt"]))
    text = str(info.value)
    assert "ubuntu-x64" in text  # the pattern
    assert f"llama-{TAG}-bin-macos-arm64.tar.gz" in text
    assert "notes.txt" in text


def test_other_build_does_not_match() -> None:
    variant = load_manifest().get("linux-x86_64-cpu")
    with pytest.raises(NoMatchingVariantError):
        match_assets(variant, "b1", _assets())


def test_source_only_variant_has_no_prebuilt() -> None:
    variant = load_manifest().get("linux-aarch64-cuda")
    with pytest.raises(NoMatchingVariantError, match="no prebuilt"):
        match_assets(variant, TAG, _assets())


def test_pinned_sha256_wins_when_listing_has_none() -> None:
    name = f"llama-{TAG}-bin-ubuntu-x64.tar.gz"
    variant = dataclasses.replace(load_manifest().get("linux-x86_64-cpu"), sha256={name: "f" * 64})
    main, _ = match_assets(variant, TAG, _assets(digest=False))
    assert main.sha256 == "f" * 64
    unpinned = load_manifest().get("linux-x86_64-cpu")
    assert match_assets(unpinned, TAG, _assets(digest=False))[0].sha256 is None


def test_pin_equal_to_digest_is_fine_and_conflict_is_refused() -> None:
    name = f"llama-{TAG}-bin-ubuntu-x64.tar.gz"
    assets = _assets()
    digest = next(a.require_sha256() for a in assets if a.name == name)
    base = load_manifest().get("linux-x86_64-cpu")
    same = dataclasses.replace(base, sha256={name: digest})
    assert match_assets(same, TAG, assets)[0].sha256 == digest
    other = dataclasses.replace(base, sha256={name: "e" * 64})
    with pytest.raises(ManifestError) as info:
        match_assets(other, TAG, assets)
    assert "e" * 64 in str(info.value)
    assert digest in str(info.value)
    assert "variants.toml pins" in str(info.value)


def test_pins_apply_to_extra_assets() -> None:
    cudart = "cudart-llama-bin-win-cuda-12.4-x64.zip"
    variant = dataclasses.replace(
        load_manifest().get("windows-x86_64-cuda"), sha256={cudart: "c" * 64}
    )
    _main, [extra] = match_assets(variant, TAG, _assets(digest=False))
    assert extra.sha256 == "c" * 64


def test_cached_listing_path_is_per_repo_and_tag(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    assert listing_cache_path(settings, "a/b", "b1") != listing_cache_path(settings, "a/b", "b2")


# ------------------------------------------------------------------- end to end (this layer)
def test_manifest_fixture_roundtrip_download_extract_run(
    server: FileServer, tmp_path: Path
) -> None:
    """variants.toml written for a fake release -> listing -> match -> download -> extract."""
    import subprocess
    import sys

    from release_fixtures import host_flavor, write_variants_toml

    from llama_proc.provision.archive import extract_archive, find_binaries

    release = make_release(tmp_path, "b4242", ["ubuntu-x64", "win-cuda-12.4-x64"])
    mirror = serve_release(server, release)
    manifest = load_manifest(write_variants_toml(tmp_path / "variants.toml", release, pin=True))
    assert manifest.build == "b4242"
    variant = manifest.get("linux-x86_64-rpc")
    assert variant.sha256 == {release.main_asset: release.sha256(release.main_asset)}
    assert manifest.get("windows-x86_64-cuda").sha256 == {
        n: release.sha256(n) for n in release.assets if "win-cuda" in n
    }
    settings = Settings(cache_dir=tmp_path / "cache", mirror=mirror, progress=False)
    main, extras = match_assets(
        variant, manifest.build, fetch_release_assets(REPO, "b4242", settings)
    )
    assert extras == []
    archive = download.download_file(
        main.url, tmp_path / "dl" / main.name, sha256=main.require_sha256(), settings=settings
    )
    assert server.hits(release.download_path(main.name)) == 1
    root = extract_archive(archive, tmp_path / "install")
    binaries = find_binaries(root, variant.binaries, "linux")
    assert set(binaries) == {"llama-server", "ggml-rpc-server|rpc-server"}
    if sys.platform != "win32" and host_flavor().startswith("ubuntu"):
        out = subprocess.run(
            [binaries["llama-server"], "--version"], capture_output=True, text=True, timeout=10
        )
        assert "version: 4242 (abcdef0)" in out.stderr


def test_wrong_pin_in_written_manifest_is_refused(server: FileServer, tmp_path: Path) -> None:
    from release_fixtures import write_variants_toml

    release = make_release(tmp_path, TAG, ["ubuntu-x64"])
    serve_release(server, release)
    path = write_variants_toml(tmp_path / "v.toml", release, pin={release.main_asset: "d" * 64})
    variant = load_manifest(path).get("linux-x86_64-cpu")
    settings = Settings(cache_dir=tmp_path / "cache", mirror=server.url)
    with pytest.raises(ManifestError, match=r"pins sha256 d{64}"):
        match_assets(variant, TAG, fetch_release_assets(REPO, TAG, settings))


def test_release_without_digests_needs_a_pin(server: FileServer, tmp_path: Path) -> None:
    release = make_release(tmp_path, TAG, ["ubuntu-x64"], digests=False)
    serve_release(server, release)
    settings = Settings(cache_dir=tmp_path / "cache", mirror=server.url)
    variant = load_manifest().get("linux-x86_64-cpu")
    main, _ = match_assets(variant, TAG, fetch_release_assets(REPO, TAG, settings))
    with pytest.raises(ProvisionError, match="no sha256 is known"):
        main.require_sha256()
