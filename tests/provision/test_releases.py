"""Release listings (GitHub API shape) from a local mirror, the cache, and asset matching."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from http_server import FileServer, routed_session
from release_fixtures import ReleaseFixture, make_release, serve_release
from upstream_listings import B11194, B11434_NAMES, listing

from llama_proc.config import Settings
from llama_proc.errors import (
    DownloadError,
    ManifestError,
    NoMatchingVariantError,
    OfflineError,
    ProvisionError,
)
from llama_proc.provision.fetch import download
from llama_proc.provision.fetch.download import is_local_url
from llama_proc.provision.fetch.listing import GITHUB_API, ReleaseAsset, match_assets, parse_listing
from llama_proc.provision.fetch.pins import ReleasePins, pin_manifest_text, pin_release
from llama_proc.provision.fetch.releases import (
    api_base,
    fetch_release_assets,
    listing_cache_path,
)
from llama_proc.provision.manifest import load_manifest, parse_manifest

if TYPE_CHECKING:
    from llama_proc.provision.manifest_records import Manifest

REPO = "ggml-org/llama.cpp"
TAG = "b11434"
REPO_ROOT = Path(__file__).resolve().parents[2]


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
UPSTREAM_NAMES = B11434_NAMES  # the pinned build's real asset names


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

    from llama_proc.provision.fetch.archive import extract_archive
    from llama_proc.provision.fetch.binaries import find_binaries

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


# ------------------------------------------------------------------ plain-http remote mirrors
REMOTE = "http://mirror.example"
"""A plain-http mirror on another machine (its requests reach the loopback server)."""


class _NoNetwork(requests.Session):
    """A session that fails the test on any request."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        pytest.fail(f"unexpected request to {request.url}")


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://127.0.0.1:8080", True),
        ("http://127.9.9.9/m", True),
        ("http://localhost:9/", True),
        ("http://[::1]:9", True),
        ("file:///srv/mirror", True),
        ("https://mirror.example", False),
        ("http://mirror.example", False),
        ("http://10.0.0.1", False),
        ("http://127.0.0.1.evil.example", False),
        ("http://localhost.evil.example", False),
    ],
)
def test_is_local_url(url: str, local: bool) -> None:
    assert is_local_url(url) is local


def test_plain_http_remote_mirror_is_refused_before_any_connection(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", mirror=REMOTE)
    variant = load_manifest().get("linux-x86_64-cpu")
    for kwargs in ({}, {"variant": variant}):
        with pytest.raises(ProvisionError) as info:
            fetch_release_assets(REPO, TAG, settings, _NoNetwork(), **kwargs)
        text = str(info.value)
        assert REMOTE in text
        assert "swap" in text  # why
        assert "https" in text
        assert "file://" in text
        assert "sha256" in text  # what to do


def test_plain_http_remote_mirror_needs_a_pin_for_every_asset(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", mirror=REMOTE)
    base = load_manifest().get("windows-x86_64-cuda")
    main_only = dataclasses.replace(
        base, sha256={f"llama-{TAG}-bin-win-cuda-12.4-x64.zip": "a" * 64}
    )
    with pytest.raises(ProvisionError, match="plain http"):
        fetch_release_assets(REPO, TAG, settings, _NoNetwork(), variant=main_only)


def _remote_mirror(server: FileServer, release: ReleaseFixture) -> requests.Session:
    serve_release(server, release)
    return routed_session(server, REMOTE)


def test_plain_http_remote_mirror_with_every_asset_pinned_is_used(
    server: FileServer, tmp_path: Path
) -> None:
    release = make_release(tmp_path, TAG, ["win-cuda-12.4-x64"])
    session = _remote_mirror(server, release)
    pins = {name: release.sha256(name) for name in release.assets}
    variant = dataclasses.replace(load_manifest().get("windows-x86_64-cuda"), sha256=pins)
    settings = Settings(cache_dir=tmp_path / "cache", mirror=REMOTE, progress=False)
    assets = fetch_release_assets(REPO, TAG, settings, session, variant=variant)
    main, [extra] = match_assets(variant, TAG, assets)
    assert main.url == f"{REMOTE}/{REPO}/releases/download/{TAG}/{main.name}"
    assert (main.sha256, extra.sha256) == (pins[main.name], pins[extra.name])
    dest = download.download_file(
        main.url, tmp_path / main.name, sha256=main.require_sha256(), size=main.size,
        settings=settings, session=session,
    )  # fmt: skip
    assert dest.read_bytes() == release.assets[main.name][0].read_bytes()
    session.close()


def test_digests_from_a_plain_http_remote_mirror_are_never_trusted(
    server: FileServer, tmp_path: Path
) -> None:
    # Anyone on the path could have rewritten them along with the archives.
    release = make_release(tmp_path, TAG, ["ubuntu-x64", "ubuntu-vulkan-x64"])
    session = _remote_mirror(server, release)
    cpu = load_manifest().get("linux-x86_64-cpu")
    pinned = dataclasses.replace(
        cpu, sha256={release.main_asset: release.sha256(release.main_asset)}
    )
    settings = Settings(cache_dir=tmp_path / "cache", mirror=REMOTE)
    assets = fetch_release_assets(REPO, TAG, settings, session, variant=pinned)
    assert {a.sha256 for a in assets} == {None}
    assert match_assets(pinned, TAG, assets)[0].sha256 == release.sha256(release.main_asset)
    vulkan = load_manifest().get("linux-x86_64-vulkan")
    with pytest.raises(ProvisionError, match="no sha256 is known"):
        match_assets(vulkan, TAG, assets)[0].require_sha256()
    session.close()


def test_https_and_local_mirrors_need_no_pins(
    server: FileServer, release: ReleaseFixture, tmp_path: Path
) -> None:
    serve_release(server, release)
    https = "https://mirror.example"
    with routed_session(server, https) as session:
        settings = Settings(cache_dir=tmp_path / "c1", mirror=https)
        assets = fetch_release_assets(REPO, TAG, settings, session)
    assert all(a.sha256 for a in assets)
    local = Settings(cache_dir=tmp_path / "c2", mirror=server.url.replace("127.0.0.1", "localhost"))
    assert all(a.sha256 for a in fetch_release_assets(REPO, TAG, local))


# -------------------------------------------------------------------- the listing's origin
def _github(server: FileServer) -> requests.Session:
    """A session on which the GitHub API (and github.com) are the loopback server."""
    return routed_session(server, GITHUB_API, "https://github.com")


def test_cached_listing_from_a_mirror_is_not_used_without_it(
    server: FileServer, release: ReleaseFixture, settings: Settings
) -> None:
    serve_release(server, release)
    fetch_release_assets(REPO, TAG, settings)
    github = settings.replace(mirror=None)
    with pytest.raises(OfflineError, match=r"came from .*127\.0\.0\.1") as info:
        fetch_release_assets(REPO, TAG, github.replace(offline=True))
    assert "LLAMA_PROC_MIRROR" in str(info.value)
    # Online, a GitHub outage does not fall back to the mirror's listing either.
    with _github(server) as session:
        server.reset()
        with pytest.raises(DownloadError, match="404"):
            fetch_release_assets(REPO, TAG, github, session)


def test_cached_listing_from_github_is_not_used_for_a_mirror(
    server: FileServer, release: ReleaseFixture, tmp_path: Path
) -> None:
    server.add(release.listing_url_path, release.listing_path, content_type="application/json")
    github = Settings(cache_dir=tmp_path / "cache")
    with _github(server) as session:
        assets = fetch_release_assets(REPO, TAG, github, session)
    assert assets[0].url.startswith(f"https://github.com/{REPO}/releases/download/{TAG}/")
    assert fetch_release_assets(REPO, TAG, github.replace(offline=True)) == assets
    other = github.replace(mirror="http://127.0.0.1:9", offline=True)
    with pytest.raises(OfflineError, match=r"came from https://api\.github\.com"):
        fetch_release_assets(REPO, TAG, other)
    server.reset()  # the mirror is down: its own fetch fails, the GitHub listing is not used
    with pytest.raises(DownloadError, match="404"):
        fetch_release_assets(REPO, TAG, github.replace(mirror=server.url))


def test_listing_naming_a_download_on_another_host_is_refused(
    server: FileServer, release: ReleaseFixture, tmp_path: Path
) -> None:
    listing = json.loads(release.listing_path.read_text())
    listing["assets"][0]["browser_download_url"] = "https://evil.example/llama.tar.gz"
    server.add_json(release.listing_url_path, listing)
    settings = Settings(cache_dir=tmp_path / "cache")
    with _github(server) as session, pytest.raises(ProvisionError, match=r"evil\.example"):
        fetch_release_assets(REPO, TAG, settings, session)
    assert not listing_cache_path(settings, REPO, TAG).exists()


def test_tampered_cached_listing_cannot_send_a_download_elsewhere(
    server: FileServer, release: ReleaseFixture, tmp_path: Path
) -> None:
    server.add(release.listing_url_path, release.listing_path, content_type="application/json")
    settings = Settings(cache_dir=tmp_path / "cache")
    with _github(server) as session:
        fetch_release_assets(REPO, TAG, settings, session)
    cached = listing_cache_path(settings, REPO, TAG)
    data = json.loads(cached.read_text())
    data["assets"][0]["browser_download_url"] = "http://evil.example/x.tar.gz"
    cached.write_text(json.dumps(data))
    with pytest.raises(ProvisionError, match=r"evil\.example"):
        fetch_release_assets(REPO, TAG, settings.replace(offline=True))


@pytest.mark.parametrize(
    "url",
    [
        "http://github.com/ggml-org/llama.cpp/releases/download/b11434/a.zip",  # not https
        "https://github.com.evil.example/a.zip",
        "https://user@evil.example/a.zip",
        "https://objects.example/a.zip",
    ],
)
def test_parse_listing_refuses_urls_off_the_origin(url: str) -> None:
    data = {"assets": [{"name": "a.zip", "size": 1, "browser_download_url": url}]}
    with pytest.raises(ProvisionError, match=r"another host|not https"):
        parse_listing(data, REPO, TAG)


@pytest.mark.parametrize("name", ["../../evil.tar.gz", "a/b.zip", "a\\b.zip", "..", "", "x\n.zip"])
def test_asset_names_that_are_not_plain_file_names_are_refused(name: str) -> None:
    data = {"assets": [{"name": name, "size": 1, "browser_download_url": "https://github.com/x"}]}
    with pytest.raises(ProvisionError, match="asset name"):
        parse_listing(data, REPO, TAG, "http://127.0.0.1:1")


def test_listing_for_another_tag_is_refused() -> None:
    data = {"tag_name": "b1", "assets": []}
    with pytest.raises(ProvisionError, match="b1"):
        parse_listing(data, REPO, TAG)


@pytest.mark.parametrize("size", [None, "12", -1, True])
def test_listing_size_must_be_a_byte_count(size: object) -> None:
    entry: dict[str, object] = {
        "name": "a.zip",
        "browser_download_url": "https://github.com/x/a.zip",
    }
    if size is not None:
        entry["size"] = size
    with pytest.raises(ProvisionError, match="size"):
        parse_listing({"assets": [entry]}, REPO, TAG)


# ------------------------------------------------------------------------------- pin_release
RECORDED = "b11194"
RECORDED_COMMIT = "9f70b2cecd1a9a3f73ac525c47ca22a6ee9a7b69"


def _serve_recorded(server: FileServer, commit: str = RECORDED_COMMIT) -> None:
    server.add_json(f"/repos/{REPO}/releases/tags/{RECORDED}", listing(RECORDED))
    server.add_json(f"/repos/{REPO}/commits/{RECORDED}", {"sha": commit, "commit": {}})


@pytest.fixture
def recorded_manifest(tmp_path: Path) -> Manifest:
    """The shipped manifest with its build set to the recorded release."""
    return load_manifest(_manifest_for(tmp_path, RECORDED))


def _manifest_for(tmp_path: Path, build: str) -> Path:
    text = (REPO_ROOT / "variants.toml").read_text(encoding="utf-8")
    path = tmp_path / "variants.toml"
    path.write_text(re.sub(r'(?m)^build = "b\d+"$', f'build = "{build}"', text, count=1))
    return path


def test_pin_release_pins_every_asset_with_size_and_commit(
    server: FileServer, tmp_path: Path, recorded_manifest: Manifest
) -> None:
    _serve_recorded(server)
    settings = Settings(cache_dir=tmp_path / "cache")
    with _github(server) as session:
        pins = pin_release(None, settings, manifest=recorded_manifest, session=session)
    assert isinstance(pins, ReleasePins)
    assert (pins.repo, pins.build, pins.commit) == (REPO, RECORDED, RECORDED_COMMIT)
    assert pins.origin == GITHUB_API
    assert {a.name: (a.size, a.sha256) for a in pins.assets} == B11194
    assert [a.name for a in pins.assets] == sorted(B11194)
    # The CUDA 12 variant installs the binary archive and its cudart- twin.
    assert pins.variants["linux-x86_64-cuda"] == (
        f"llama-{RECORDED}-bin-ubuntu-cuda-12.8-x64.tar.gz",
        f"cudart-llama-{RECORDED}-bin-ubuntu-cuda-12.8-x64.tar.gz",
    )
    assert set(pins.variants) | set(pins.unmatched) == {
        v.id for v in recorded_manifest.variants if v.has_prebuilt
    }
    table = tomllib.loads(pins.to_toml())["pins"]
    assert (table["build"], table["commit"]) == (RECORDED, RECORDED_COMMIT)
    assert table["assets"] == {n: {"size": s, "sha256": h} for n, (s, h) in B11194.items()}
    hit = server.requests_for(f"/repos/{REPO}/releases/tags/{RECORDED}")[0]
    assert hit.header("Accept") == "application/vnd.github+json"


def test_pinned_manifest_reads_back_with_the_pins(
    server: FileServer, tmp_path: Path, recorded_manifest: Manifest
) -> None:
    _serve_recorded(server)
    settings = Settings(cache_dir=tmp_path / "cache", mirror=server.url)
    pins = pin_release(RECORDED, settings, manifest=recorded_manifest)
    text = pin_manifest_text(Path(recorded_manifest.path).read_text(encoding="utf-8"), pins)
    pinned = parse_manifest(text)
    assert pinned.commit == RECORDED_COMMIT
    cuda = pinned.get("linux-x86_64-cuda")
    for name in pins.variants["linux-x86_64-cuda"]:
        assert cuda.sha256[name] == B11194[name][1]
        assert cuda.size[name] == B11194[name][0]
    # A pinned variant matches the real listing with its pins (and the pins hold the sizes).
    main, [twin] = match_assets(cuda, RECORDED, parse_listing(listing(RECORDED), REPO, RECORDED))
    assert (main.size, main.sha256) == B11194[main.name]
    assert twin.name.startswith("cudart-")
    # Pinning again changes nothing; comments and the rest of the file stay as written.
    assert pin_manifest_text(text, pins) == text
    assert text.count("\n#") == Path(recorded_manifest.path).read_text().count("\n#")


def test_pin_manifest_text_refuses_another_build(
    server: FileServer, tmp_path: Path, recorded_manifest: Manifest
) -> None:
    _serve_recorded(server)
    pins = pin_release(
        RECORDED, Settings(cache_dir=tmp_path, mirror=server.url), manifest=recorded_manifest
    )
    other = (REPO_ROOT / "variants.toml").read_text(encoding="utf-8")
    with pytest.raises(ManifestError, match=RECORDED):
        pin_manifest_text(other, pins)


def test_size_pin_contradicting_the_listing_is_refused() -> None:
    name = f"llama-{TAG}-bin-ubuntu-x64.tar.gz"
    variant = dataclasses.replace(load_manifest().get("linux-x86_64-cpu"), size={name: 11})
    with pytest.raises(ManifestError, match=r"pins size 11 .* says 10 bytes"):
        match_assets(variant, TAG, _assets())
    same = dataclasses.replace(variant, size={name: 10})
    assert match_assets(same, TAG, _assets())[0].size == 10


def test_pin_release_refuses_an_asset_without_a_digest(
    server: FileServer, tmp_path: Path, recorded_manifest: Manifest
) -> None:
    doc = listing(RECORDED)
    doc["assets"][3]["digest"] = None
    _serve_recorded(server)
    server.add_json(f"/repos/{REPO}/releases/tags/{RECORDED}", doc)
    with pytest.raises(ProvisionError, match=re.escape(doc["assets"][3]["name"])):
        pin_release(
            RECORDED, Settings(cache_dir=tmp_path, mirror=server.url), manifest=recorded_manifest
        )


def test_pin_release_refuses_a_tag_without_a_commit(
    server: FileServer, tmp_path: Path, recorded_manifest: Manifest
) -> None:
    _serve_recorded(server, commit="master")
    with pytest.raises(ProvisionError, match="no commit id"):
        pin_release(
            RECORDED, Settings(cache_dir=tmp_path, mirror=server.url), manifest=recorded_manifest
        )


def test_pin_release_never_trusts_a_plain_http_remote_mirror(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, mirror=REMOTE)
    with pytest.raises(ProvisionError, match="plain http"):
        pin_release(RECORDED, settings, session=_NoNetwork())
