"""download_file / fetch_page against a real loopback HTTP server with injected faults."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import TYPE_CHECKING

import pytest
import requests
import urllib3
from http_server import FileServer

from llama_proc._version import __version__
from llama_proc.config import Settings
from llama_proc.errors import ChecksumMismatchError, DownloadError, OfflineError, ProvisionError
from llama_proc.provision import download
from llama_proc.provision.download import download_file, fetch_page, make_session

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

DATA = os.urandom(3_000_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record backoff waits instead of sleeping."""
    recorded: list[float] = []
    monkeypatch.setattr(download, "_sleep", recorded.append)
    return recorded


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", download_timeout=5.0, progress=False)


def _dest(tmp_path: Path) -> Path:
    return tmp_path / "out" / "file.bin"


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def test_downloads_and_verifies(server: FileServer, settings: Settings, tmp_path: Path) -> None:
    server.add("/f.bin", DATA)
    dest = _dest(tmp_path)
    assert download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings) == dest
    assert dest.read_bytes() == DATA
    assert not _part(dest).exists()
    [hit] = server.requests_for("/f.bin")
    assert hit.header("User-Agent") == f"llama-proc/{__version__}"
    assert hit.header("Range") is None
    assert hit.header("Accept-Encoding") == "identity"


def test_uppercase_sha256_is_accepted(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA)
    download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA.upper(), settings=settings)


def test_checksum_mismatch_deletes_bytes_and_raises(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA, wrong_bytes=True)
    dest = _dest(tmp_path)
    with pytest.raises(ChecksumMismatchError) as info:
        download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert info.value.expected == SHA
    assert info.value.actual != SHA
    assert "/f.bin" in info.value.url
    assert not dest.exists()
    assert not _part(dest).exists()
    assert list(dest.parent.iterdir()) == []
    assert server.hits("/f.bin") == 1  # a full, clean transfer that fails its hash is not retried


def test_resume_after_dropped_connection(
    server: FileServer, settings: Settings, tmp_path: Path, waits: list[float]
) -> None:
    server.add("/f.bin", DATA, drop_after=1_000_000)
    dest = _dest(tmp_path)
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA
    first, second = server.requests_for("/f.bin")
    assert first.header("Range") is None
    assert first.bytes_sent == 1_000_000
    assert second.status == 206
    sent_range = second.header("Range")
    assert sent_range is not None
    offset = int(sent_range.removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= 1_000_000
    if hasattr(urllib3.response.HTTPResponse, "read1"):
        assert offset == 1_000_000  # urllib3 2 hands over partial chunks: nothing received is lost
    assert second.bytes_sent == len(DATA) - offset
    assert server.bytes_sent("/f.bin") < 2 * len(DATA)
    assert waits == [0.0]  # progress was made, so no backoff


def test_resume_survives_repeated_drops(
    server: FileServer, settings: Settings, tmp_path: Path, waits: list[float]
) -> None:
    server.add("/f.bin", DATA, drop_after=400_000, drop_times=5)
    dest = _dest(tmp_path)
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA
    assert server.hits("/f.bin") == 6  # more than ATTEMPTS: each drop still made progress
    assert all(h.status == 206 for h in server.requests_for("/f.bin")[1:])
    assert server.bytes_sent("/f.bin") < 2 * len(DATA)
    assert all(w == 0.0 for w in waits)


def test_resumes_part_left_by_earlier_process(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA)
    dest = _dest(tmp_path)
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(DATA[:1_234_567])
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA
    [hit] = server.requests_for("/f.bin")
    assert hit.header("Range") == "bytes=1234567-"
    assert hit.bytes_sent == len(DATA) - 1_234_567


def test_server_ignoring_range_restarts_cleanly(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA, ranges=False)
    dest = _dest(tmp_path)
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(DATA[:1_000_000])
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA  # not 1 MB of prefix + the whole file
    [hit] = server.requests_for("/f.bin")
    assert hit.header("Range") == "bytes=1000000-"
    assert hit.status == 200


def test_drop_on_server_without_ranges_restarts_from_zero(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA, ranges=False, drop_after=1_000_000)
    dest = _dest(tmp_path)
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA
    assert [h.status for h in server.requests_for("/f.bin")] == [200, 200]


def test_stale_part_of_another_file_is_redownloaded_whole(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA)
    dest = _dest(tmp_path)
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(b"x" * 1_000_000)  # same length as a real prefix, wrong bytes
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA
    first, second = server.requests_for("/f.bin")
    assert first.header("Range") == "bytes=1000000-"
    assert second.header("Range") is None


def test_416_with_complete_part_finishes_without_body(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA)
    dest = _dest(tmp_path)
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(DATA)
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA
    [hit] = server.requests_for("/f.bin")
    assert hit.status == 416


def test_416_with_oversized_part_restarts(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA)
    dest = _dest(tmp_path)
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(DATA + b"trailing junk")
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA
    assert [h.status for h in server.requests_for("/f.bin")] == [416, 200]


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
def test_retries_transient_statuses_then_succeeds(
    server: FileServer, settings: Settings, tmp_path: Path, waits: list[float], status: int
) -> None:
    server.add("/f.bin", DATA, statuses=[status, status])
    dest = _dest(tmp_path)
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA
    assert [h.status for h in server.requests_for("/f.bin")] == [status, status, 200]
    assert waits == [download.BACKOFF_BASE, 2 * download.BACKOFF_BASE]


def test_retry_after_is_honoured(
    server: FileServer, settings: Settings, tmp_path: Path, waits: list[float]
) -> None:
    server.add("/f.bin", DATA, statuses=[429], retry_after="3")
    download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA, settings=settings)
    assert waits == [3.0]


def test_gives_up_after_bounded_attempts(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA, statuses=[503] * 50)
    with pytest.raises(DownloadError, match="HTTP 503") as info:
        download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA, settings=settings)
    assert server.hits("/f.bin") == download.ATTEMPTS
    assert "after 5 attempts" in str(info.value)


@pytest.mark.parametrize("status", [404, 403, 401, 410])
def test_no_retry_on_client_errors(
    server: FileServer, settings: Settings, tmp_path: Path, waits: list[float], status: int
) -> None:
    server.add("/f.bin", DATA, statuses=[status])
    with pytest.raises(DownloadError, match=f"HTTP {status}"):
        download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA, settings=settings)
    assert server.hits("/f.bin") == 1
    assert waits == []


def test_missing_path_is_one_404(server: FileServer, settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404"):
        download_file(server.url_for("/nope"), _dest(tmp_path), sha256=SHA, settings=settings)
    assert server.hits() == 1


def test_offline_makes_zero_requests(server: FileServer, tmp_path: Path) -> None:
    server.add("/f.bin", DATA)
    offline = Settings(cache_dir=tmp_path / "cache", offline=True)
    dest = _dest(tmp_path)
    with pytest.raises(OfflineError, match="offline"):
        download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=offline)
    with pytest.raises(OfflineError):
        fetch_page(server.url_for("/f.bin"), offline)
    assert server.hits() == 0
    assert not dest.parent.exists()


def test_read_timeout_on_slow_body_raises_quickly(server: FileServer, tmp_path: Path) -> None:
    server.add("/f.bin", DATA, delay=3.0, chunk_size=1024)
    fast = Settings(cache_dir=tmp_path / "cache", download_timeout=0.2, progress=False)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA, settings=fast)
    assert time.monotonic() - start < 2.5
    assert server.hits("/f.bin") == download.ATTEMPTS


def test_read_timeout_waiting_for_headers(server: FileServer, tmp_path: Path) -> None:
    server.add("/f.bin", DATA, header_delay=3.0)
    fast = Settings(cache_dir=tmp_path / "cache", download_timeout=0.2, progress=False)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="timed out") as info:
        download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA, settings=fast)
    assert time.monotonic() - start < 2.5
    assert isinstance(info.value.__cause__, requests.RequestException)


def test_connection_refused_is_a_download_error(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="connection refused"):
        download_file(f"http://127.0.0.1:{port}/f", _dest(tmp_path), sha256=SHA, settings=settings)


def test_file_url_mirror_copies_and_verifies(tmp_path: Path) -> None:
    src = tmp_path / "mirror" / "f.bin"
    src.parent.mkdir()
    src.write_bytes(DATA)
    offline = Settings(cache_dir=tmp_path / "cache", offline=True)  # local files stay usable
    dest = _dest(tmp_path)
    download_file(src.as_uri(), dest, sha256=SHA, settings=offline)
    assert dest.read_bytes() == DATA
    with pytest.raises(ChecksumMismatchError):
        download_file(src.as_uri(), tmp_path / "other.bin", sha256="0" * 64, settings=offline)
    assert not (tmp_path / "other.bin").exists()
    assert not (tmp_path / "other.bin.part").exists()
    with pytest.raises(DownloadError, match="cannot read"):
        download_file((tmp_path / "missing").as_uri(), dest, sha256=SHA, settings=offline)


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, SHA[:-1]])
def test_invalid_expected_sha256_is_refused_before_any_request(
    server: FileServer, settings: Settings, tmp_path: Path, bad: str
) -> None:
    server.add("/f.bin", DATA)
    with pytest.raises(ProvisionError, match="sha256"):
        download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=bad, settings=settings)
    assert server.hits() == 0


def test_unsupported_scheme(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="only http"):
        download_file("ftp://example.com/x", _dest(tmp_path), sha256=SHA, settings=settings)


def test_redirect_is_followed(server: FileServer, settings: Settings, tmp_path: Path) -> None:
    server.add("/f.bin", b"", redirect="/real/f.bin")
    server.add("/real/f.bin", DATA)
    dest = _dest(tmp_path)
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA


def test_serves_large_file_from_disk(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(DATA * 3)
    server.add("/blob", blob)
    dest = _dest(tmp_path)
    sha = hashlib.sha256(DATA * 3).hexdigest()
    download_file(server.url_for("/blob"), dest, sha256=sha, settings=settings)
    assert dest.read_bytes() == DATA * 3


def test_progress_bar_goes_to_stderr_only_when_asked(
    server: FileServer, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.add("/f.bin", DATA)
    url = server.url_for("/f.bin")
    download_file(url, tmp_path / "a", sha256=SHA, settings=settings, progress=True, desc="model")
    captured = capsys.readouterr()
    assert "model" in captured.err
    assert captured.out == ""
    download_file(url, tmp_path / "b", sha256=SHA, settings=settings.replace(progress=False))
    assert capsys.readouterr().err == ""


def test_reuses_a_given_session(server: FileServer, settings: Settings, tmp_path: Path) -> None:
    server.add("/f.bin", DATA)
    with requests.Session() as session:
        session.headers["X-Test"] = "yes"
        download_file(
            server.url_for("/f.bin"),
            _dest(tmp_path),
            sha256=SHA,
            settings=settings,
            session=session,
        )
    assert server.requests_for("/f.bin")[0].header("X-Test") == "yes"


def test_github_token_only_sent_to_the_github_api(server: FileServer, tmp_path: Path) -> None:
    server.add("/f.bin", DATA)
    settings = Settings(cache_dir=tmp_path, github_token="secret-token", progress=False)  # noqa: S106
    download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA, settings=settings)
    assert server.requests_for("/f.bin")[0].header("Authorization") is None
    session = make_session(settings)
    assert session.headers["User-Agent"] == f"llama-proc/{__version__}"
    api = session.prepare_request(requests.Request("GET", "https://api.github.com/repos/a/b"))
    assert api.headers["Authorization"] == "Bearer secret-token"
    for other in (
        "https://github.com/a/b/releases/download/x/y",
        "http://api.github.com/repos/a/b",  # never over plain HTTP
        "https://api.github.com.evil.example/x",
    ):
        prepared = session.prepare_request(requests.Request("GET", other))
        assert "Authorization" not in prepared.headers, other
    assert "secret-token" not in repr(settings)


def test_no_token_no_auth(tmp_path: Path) -> None:
    session = make_session(Settings(cache_dir=tmp_path))
    prepared = session.prepare_request(requests.Request("GET", "https://api.github.com/x"))
    assert "Authorization" not in prepared.headers


# ------------------------------------------------------------------------------- fetch_page
def test_fetch_page_retries_then_returns_text(
    server: FileServer, settings: Settings, waits: list[float]
) -> None:
    server.add_json("/api/x", {"ok": True}, statuses=[502])
    page = fetch_page(server.url_for("/api/x"), settings, accept="application/json")
    assert page.text == '{"ok": true}'
    assert page.content_type == "application/json"
    assert [h.status for h in server.requests_for("/api/x")] == [502, 200]
    assert server.requests_for("/api/x")[0].header("Accept") == "application/json"
    assert waits == [download.BACKOFF_BASE]


def test_fetch_page_404_names_the_hint(server: FileServer, settings: Settings) -> None:
    with pytest.raises(DownloadError, match=r"HTTP 404.*tag not found"):
        fetch_page(server.url_for("/missing"), settings, hints={404: "tag not found"})
    assert server.hits() == 1


def test_fetch_page_reports_final_url_after_redirect(
    server: FileServer, settings: Settings
) -> None:
    server.add("/a/", b"", redirect="/b/page")
    server.add_json("/b/page", [])
    page = fetch_page(server.url_for("/a/"), settings)
    assert page.url == server.url_for("/b/page")


def test_fetch_page_file_url(tmp_path: Path, settings: Settings) -> None:
    doc = tmp_path / "doc"
    doc.write_text('{"a": 1}', encoding="utf-8")
    page = fetch_page(doc.as_uri(), settings.replace(offline=True))
    assert page.text == '{"a": 1}'
    assert page.content_type == "application/json"
    with pytest.raises(DownloadError):
        fetch_page((tmp_path / "nope").as_uri(), settings)


# ------------------------------------------------------------------------- unresolvable hosts
UNRESOLVABLE = "http://llama-proc-test.invalid/f.bin"  # .invalid never resolves (RFC 2606)


def test_unresolvable_host_gives_up_after_two_tries(
    settings: Settings, tmp_path: Path, waits: list[float]
) -> None:
    with pytest.raises(DownloadError, match="host name not found"):
        fetch_page(UNRESOLVABLE, settings)
    assert len(waits) == download.DNS_ATTEMPTS - 1
    with pytest.raises(DownloadError, match="host name not found"):
        download_file(UNRESOLVABLE, _dest(tmp_path), sha256=SHA, settings=settings)
    assert len(waits) == 2 * (download.DNS_ATTEMPTS - 1)
