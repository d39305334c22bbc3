"""download_file / fetch_page against a real loopback HTTP server with injected faults."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3
from http_server import FileServer, HangingServer

from llama_proc._version import __version__
from llama_proc.config import Settings
from llama_proc.errors import ChecksumMismatchError, DownloadError, OfflineError, ProvisionError
from llama_proc.provision.fetch import download, pace, part
from llama_proc.provision.fetch.download import download_file, fetch_page
from llama_proc.provision.fetch.session import make_session

DATA = os.urandom(3_000_000)
SHA = hashlib.sha256(DATA).hexdigest()


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


@pytest.mark.parametrize(
    "target",
    ["http://mirror.example/f.bin", "http://203.0.113.7:8080/f.bin"],
)
def test_a_redirect_to_plain_http_on_another_machine_is_refused(
    server: FileServer, settings: Settings, tmp_path: Path, target: str
) -> None:
    # The mirror (here on loopback) is trusted; a host it redirects to over plain http is not:
    # anyone on that path could swap the bytes and, for a listing, the digests vouching for them.
    server.add("/f.bin", b"", redirect=target)
    dest = _dest(tmp_path)
    with pytest.raises(DownloadError, match="plain http to another machine") as info:
        download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert "\n" not in str(info.value)
    assert not dest.exists()
    with pytest.raises(DownloadError, match="plain http to another machine"):
        fetch_page(server.url_for("/f.bin"), settings=settings)


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


# ------------------------------------------------------------------------------ listing size
def test_size_from_the_listing_is_checked(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA)
    dest = _dest(tmp_path)
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, size=len(DATA), settings=settings)
    assert dest.read_bytes() == DATA


def test_announced_length_other_than_the_listing_size_fails_before_the_body(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA)
    dest = _dest(tmp_path)
    with pytest.raises(DownloadError, match=r"3000000 bytes.*2999999") as info:
        download_file(
            server.url_for("/f.bin"), dest, sha256=SHA, size=len(DATA) - 1, settings=settings
        )
    assert "LLAMA_PROC_MIRROR" in str(info.value)
    assert server.hits("/f.bin") == 1  # not retried: the server serves another file
    assert list(dest.parent.iterdir()) == []


class _SpyFile:
    """A ``.part`` writer that records how many bytes reached it (and can fail like a disk)."""

    def __init__(self, path: Path, fail_after: int | None = None) -> None:
        self._fh = path.open("ab")
        self.fail_after = fail_after
        self.written = 0

    def write(self, data: bytes) -> int:
        if self.fail_after is not None and self.written + len(data) > self.fail_after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self._fh.write(data)

    def close(self) -> None:
        self._fh.close()


@pytest.fixture
def spy_files(monkeypatch: pytest.MonkeyPatch) -> list[_SpyFile]:
    opened: list[_SpyFile] = []

    def open_part(path: Path) -> _SpyFile:
        opened.append(_SpyFile(path))
        return opened[-1]

    monkeypatch.setattr(part, "_open_part", open_part)
    return opened


def test_more_bytes_than_the_listing_size_stops_at_once(
    server: FileServer, settings: Settings, tmp_path: Path, spy_files: list[_SpyFile]
) -> None:
    server.add("/f.bin", DATA, no_length=True)  # nothing announced: only the stream tells
    dest = _dest(tmp_path)
    with pytest.raises(DownloadError, match="more than the 1000000 bytes"):
        download_file(server.url_for("/f.bin"), dest, sha256=SHA, size=1_000_000, settings=settings)
    assert sum(f.written for f in spy_files) <= 1_000_000
    assert list(dest.parent.iterdir()) == []
    assert server.hits("/f.bin") == 1


def test_part_longer_than_the_listing_size_is_discarded(
    server: FileServer, settings: Settings, tmp_path: Path
) -> None:
    server.add("/f.bin", DATA)
    dest = _dest(tmp_path)
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(DATA + b"junk")
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, size=len(DATA), settings=settings)
    assert dest.read_bytes() == DATA
    [hit] = server.requests_for("/f.bin")
    assert hit.header("Range") is None


def test_file_url_longer_than_the_listing_size_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(DATA)
    local = Settings(cache_dir=tmp_path / "cache", offline=True)
    dest = _dest(tmp_path)
    with pytest.raises(DownloadError, match="more than the 1000 bytes"):
        download_file(src.as_uri(), dest, sha256=SHA, size=1000, settings=local)
    assert list(dest.parent.iterdir()) == []


# --------------------------------------------------------------------------------- disk full
class _Usage:
    def __init__(self, free: int) -> None:
        self.total, self.used, self.free = 10 * free, 9 * free, free


def test_too_little_free_space_is_refused_before_connecting(
    server: FileServer, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add("/f.bin", DATA)
    seen: list[Path] = []

    def disk_usage(path: Any) -> _Usage:
        seen.append(Path(path))
        return _Usage(free=1_000_000)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    dest = _dest(tmp_path)
    with pytest.raises(DownloadError) as info:
        download_file(server.url_for("/f.bin"), dest, sha256=SHA, size=len(DATA), settings=settings)
    text = str(info.value)
    assert "3.0 MB" in text  # what is needed
    assert "1.0 MB" in text  # what is free
    assert str(dest.parent) in text  # where
    assert "LLAMA_PROC_CACHE_DIR" in text
    assert server.hits() == 0
    assert seen == [dest.parent]


def test_free_space_counts_the_part_already_downloaded(
    server: FileServer, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add("/f.bin", DATA)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: _Usage(free=2_000_000))
    dest = _dest(tmp_path)
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(DATA[:1_500_000])  # 1.5 MB left to fetch, 2 MB free
    download_file(server.url_for("/f.bin"), dest, sha256=SHA, size=len(DATA), settings=settings)
    assert dest.read_bytes() == DATA


def test_disk_full_while_downloading_leaves_no_part(
    server: FileServer, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add("/f.bin", DATA)
    opened: list[_SpyFile] = []

    def open_part(path: Path) -> _SpyFile:
        opened.append(_SpyFile(path, fail_after=2_000_000))
        return opened[-1]

    monkeypatch.setattr(part, "_open_part", open_part)
    dest = _dest(tmp_path)
    with pytest.raises(DownloadError, match="disk full") as info:
        download_file(server.url_for("/f.bin"), dest, sha256=SHA, size=len(DATA), settings=settings)
    assert str(dest.parent) in str(info.value)
    assert list(dest.parent.iterdir()) == []  # no multi-megabyte .part left filling the disk
    assert server.hits("/f.bin") == 1  # a full disk is not a network hiccup: no retry


def test_disk_full_copying_a_file_url_leaves_no_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(DATA)
    monkeypatch.setattr(part, "_open_part", lambda path: _SpyFile(path, fail_after=1_000_000))
    dest = _dest(tmp_path)
    with pytest.raises(DownloadError, match="disk full"):
        download_file(src.as_uri(), dest, sha256=SHA, settings=Settings(cache_dir=tmp_path))
    assert list(dest.parent.iterdir()) == []


def test_network_failure_keeps_the_part_for_resume(
    server: FileServer, tmp_path: Path, waits: list[float]
) -> None:
    # Every answer breaks after 1 MB and Range is ignored, so no request makes progress.
    server.add("/f.bin", DATA, ranges=False, drop_after=1_000_000, drop_times=99)
    settings = Settings(cache_dir=tmp_path / "cache", progress=False)
    dest = _dest(tmp_path)
    with pytest.raises(DownloadError):
        download_file(server.url_for("/f.bin"), dest, sha256=SHA, settings=settings)
    assert _part(dest).stat().st_size > 0  # resumable next time
    assert not dest.exists()


# ------------------------------------------------------------------- servers that never answer
class _NoAnswerSession:
    """A session whose every GET times out waiting for the answer; records the timeouts."""

    def __init__(self) -> None:
        self.timeouts: list[Any] = []
        self.headers: dict[str, str] = {}

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        self.timeouts.append(kwargs.get("timeout"))
        msg = "read timed out"
        raise requests.ReadTimeout(msg)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("call", ["download", "page"])
def test_default_settings_give_up_on_a_silent_server_well_under_a_minute(
    tmp_path: Path, waits: list[float], call: str
) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", progress=False)  # download_timeout 60
    session: Any = _NoAnswerSession()
    url = "https://mirror.example/f.bin"

    def fetch() -> object:
        if call == "download":
            return download_file(
                url, _dest(tmp_path), sha256=SHA, settings=settings, session=session
            )
        return fetch_page(url, settings, session=session)

    with pytest.raises(DownloadError, match="did not answer") as info:
        fetch()
    assert "timed out" in str(info.value)
    connect = [t[0] for t in session.timeouts]
    first_byte = [t[1] for t in session.timeouts]
    worst = sum(connect) + sum(first_byte) + sum(waits)
    assert worst < 45, session.timeouts  # was 5 x (60 + 60) s plus backoff
    assert all(c < settings.download_timeout for c in connect)


def test_hung_server_fails_fast_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(download, "FIRST_BYTE_TIMEOUT", 0.4)
    monkeypatch.setattr(download, "WAIT_NOTICE_AFTER", 0.1)
    settings = Settings(cache_dir=tmp_path / "cache", progress=False)  # download_timeout 60
    dest = _dest(tmp_path)
    with HangingServer() as hung, caplog.at_level(logging.INFO, logger="llama_proc"):
        start = time.monotonic()
        with pytest.raises(DownloadError, match="did not answer") as info:
            download_file(hung.url + "/f.bin", dest, sha256=SHA, settings=settings)
        elapsed = time.monotonic() - start
        assert hung.wait_connections(download.NO_ANSWER_ATTEMPTS) == download.NO_ANSWER_ATTEMPTS
    assert elapsed < 3
    assert "127.0.0.1" in str(info.value)
    assert "waiting for" in caplog.text  # a line while waiting, even without a progress bar


def test_hung_listing_server_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "FIRST_BYTE_TIMEOUT", 0.3)
    settings = Settings(cache_dir=tmp_path / "cache")
    with HangingServer() as hung:
        start = time.monotonic()
        with pytest.raises(DownloadError, match="did not answer"):
            fetch_page(hung.url + "/repos/x", settings)
        assert time.monotonic() - start < 3


def test_trickling_stream_is_stopped_by_the_total_bound(
    server: FileServer, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = DATA[:200_000]
    server.add("/f.bin", body, delay=0.02, chunk_size=2000)  # 2 s in all, never a stall
    monkeypatch.setattr(pace, "TOTAL_TIME_FLOOR", 0.5)
    monkeypatch.setattr(pace, "MIN_AVERAGE_RATE", 10_000_000)
    dest = _dest(tmp_path)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="too slow") as info:
        download_file(
            server.url_for("/f.bin"),
            dest,
            sha256=hashlib.sha256(body).hexdigest(),
            size=len(body),
            settings=settings,
        )
    assert time.monotonic() - start < 1.5
    assert "of 200000 bytes" in str(info.value)


def test_total_bound_spans_retries(
    server: FileServer, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each request makes a little progress and then breaks: without a total bound this goes on
    # for MAX_REQUESTS requests.
    server.add("/f.bin", DATA, drop_after=50_000, drop_times=1000, delay=0.05, chunk_size=25_000)
    monkeypatch.setattr(pace, "TOTAL_TIME_FLOOR", 0.6)
    monkeypatch.setattr(pace, "MIN_AVERAGE_RATE", 10_000_000)
    with pytest.raises(DownloadError, match="too slow"):
        download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA, settings=settings)
    assert server.hits("/f.bin") < download.MAX_REQUESTS


# --------------------------------------------------------------------- slowly sent headers
@pytest.mark.parametrize("call", ["download", "page"])
def test_trickled_headers_fail_within_the_headers_deadline(
    server: FileServer, tmp_path: Path, waits: list[float], call: str
) -> None:
    # One header byte every 0.5 s: every read gets a byte well within its timeout, so only a
    # deadline for the headers as a whole ends it (the headers alone would take over a minute).
    server.add("/f.bin", DATA, header_trickle=0.5)
    settings = Settings(cache_dir=tmp_path / "cache", download_timeout=2.0, progress=False)
    limit = download._headers_timeout(settings.download_timeout)
    start = time.monotonic()

    def fetch() -> object:
        if call == "download":
            return download_file(
                server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA, settings=settings
            )
        return fetch_page(server.url_for("/f.bin"), settings)

    with pytest.raises(DownloadError, match="status line and headers within 2 s") as info:
        fetch()
    elapsed = time.monotonic() - start
    attempts = download.NO_ANSWER_ATTEMPTS
    assert elapsed < attempts * limit + 1.5, elapsed
    assert server.hits("/f.bin") == attempts
    # The message gives the real figures: attempts, the time they took, the deadline.
    message = str(info.value)
    assert f"after {attempts} attempts in " in message
    stated = float(message.split(" attempts in ")[1].split(" s", maxsplit=1)[0])
    assert abs(stated - elapsed) < 0.5, (stated, elapsed)
    assert not _part(_dest(tmp_path)).exists() or _part(_dest(tmp_path)).stat().st_size == 0


def test_headers_deadline_applies_with_the_default_download_timeout(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "HEADERS_TIMEOUT", 1.0)
    server.add("/f.bin", DATA, header_trickle=0.3)
    settings = Settings(cache_dir=tmp_path / "cache", progress=False)  # download_timeout 60
    start = time.monotonic()
    with pytest.raises(DownloadError, match="within 1 s"):
        download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA, settings=settings)
    assert time.monotonic() - start < download.NO_ANSWER_ATTEMPTS * 1.0 + 1.5


def test_headers_count_against_the_total_budget(
    server: FileServer, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The headers deadline (5 s here) is cut to what is left of the whole transfer's budget.
    monkeypatch.setattr(pace, "TOTAL_TIME_FLOOR", 0.8)
    monkeypatch.setattr(pace, "MIN_AVERAGE_RATE", 10_000_000)
    server.add("/f.bin", DATA, header_trickle=0.2)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"too slow|within 0\.8"):
        download_file(server.url_for("/f.bin"), _dest(tmp_path), sha256=SHA, settings=settings)
    assert time.monotonic() - start < 2.5


def test_trickled_listing_states_the_size_it_was_sent(
    server: FileServer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = b"[" + b" " * 199_998 + b"]"
    server.add("/releases", body, content_type="application/json", delay=0.02, chunk_size=2000)
    monkeypatch.setattr(pace, "TOTAL_TIME_FLOOR", 0.5)
    monkeypatch.setattr(pace, "MIN_AVERAGE_RATE", 10_000_000)
    with pytest.raises(DownloadError, match="too slow") as info:
        fetch_page(server.url_for("/releases"), settings)
    assert "of 200000 bytes" in str(info.value)
    assert "unknown size" not in str(info.value)
