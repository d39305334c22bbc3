"""HTTP downloads: streaming, sha256 while streaming, resume, bounded retries, progress.

This module knows nothing about the cache layout or locking: callers choose ``dest`` and hold
whatever lock protects it. Bytes land in ``<dest>.part`` beside ``dest`` (same filesystem, so
the final :func:`os.replace` is atomic) and only reach ``dest`` once their sha256 matches.

Every wait is bounded: connecting (:data:`CONNECT_TIMEOUT`), the server's first byte
(:data:`FIRST_BYTE_TIMEOUT`), connecting, status line and headers together
(:data:`HEADERS_TIMEOUT`; these three are tried :data:`NO_ANSWER_ATTEMPTS` times), a stall
mid-transfer (``settings.download_timeout``) and the whole transfer, headers and body of every
request (:data:`TOTAL_TIME_FLOOR` plus the size at :data:`MIN_AVERAGE_RATE`), so a server that
accepts and never answers fails in seconds and one that trickles, headers or body, cannot hold
a download forever. Given the release listing's size, a file is
refused when the server announces or sends another length, and when its filesystem lacks the
room; a write that fails (a full disk) removes the ``.part`` instead of leaving it to fill it.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ChecksumMismatchError, DownloadError, OfflineError, ProvisionError
from llama_proc.provision.fetch._headers_deadline import headers_deadline
from llama_proc.provision.fetch.pace import _Pace, _progress_bar
from llama_proc.provision.fetch.part import (
    CHUNK_SIZE,
    PART_SUFFIX,
    _expected_sha256,
    _local_path,
    _mb,
    _Part,
    _require_space,
    file_sha256,
)
from llama_proc.provision.fetch.response import (
    Page,
    _chunks,
    _content_range,
    _describe,
    _headers_too_slow,
    _int_header,
    _set_read_timeout,
    _too_long,
)
from llama_proc.provision.fetch.retry import (
    ATTEMPTS,
    BACKOFF_BASE,
    DNS_ATTEMPTS,
    MAX_REQUESTS,
    NO_ANSWER_ATTEMPTS,
    _backoff,
    _parse_retry_after,
    _RestartError,
    _retryable_status,
    _RetryableError,
)
from llama_proc.provision.fetch.session import _safe_url, is_local_url, make_session, plain_remote

if TYPE_CHECKING:
    from collections.abc import Mapping

    import requests

    from llama_proc.provision.views import NetView

__all__ = [
    "ATTEMPTS",
    "BACKOFF_BASE",
    "CHUNK_SIZE",
    "DNS_ATTEMPTS",
    "MAX_REQUESTS",
    "NO_ANSWER_ATTEMPTS",
    "PART_SUFFIX",
    "Page",
    "download_file",
    "fetch_page",
    "file_sha256",
    "is_local_url",
    "make_session",
    "plain_remote",
]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 10.0
"""Most seconds to wait for a connection (``download_timeout`` when that is smaller)."""
FIRST_BYTE_TIMEOUT: Final = 10.0
"""Most seconds to wait for the answer's first byte, headers and then body
(``download_timeout`` when that is smaller). After it, ``download_timeout`` bounds stalls."""
HEADERS_TIMEOUT: Final = 20.0
"""Most seconds from the start of a request to its last header byte: connecting, the status
line and every header together (``download_timeout`` when that is smaller). The per-read
timeouts alone let a server that sends a header byte every few seconds hold a request forever."""
WAIT_NOTICE_AFTER: Final = 5.0
"""A server silent this long gets a log line, so a wait is never silent without a terminal."""
MAX_PAGE_BYTES: Final = 64 * 1024 * 1024
"""Largest document :func:`fetch_page` reads (a release listing is a few hundred kB)."""


def _sleep(seconds: float) -> None:
    # One indirection so tests can record (and skip) backoff waits.
    time.sleep(seconds)


def _timeouts(download_timeout: float) -> tuple[float, float]:
    """``(connect, first byte)`` deadlines for one request."""
    return min(download_timeout, CONNECT_TIMEOUT), min(download_timeout, FIRST_BYTE_TIMEOUT)


def _headers_timeout(download_timeout: float) -> float:
    return min(download_timeout, HEADERS_TIMEOUT)


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str,
    settings: NetView,
    size: int | None = None,
    session: requests.Session | None = None,
    desc: str | None = None,
    progress: bool | None = None,
    came_from: list[str] | None = None,
) -> Path:
    """Download ``url`` to ``dest``, verifying its sha256 (and size) before it gets its name.

    An existing ``<dest>.part`` is resumed with an HTTP Range request (servers that answer 200
    instead are restarted cleanly). Connection errors, timeouts, 408, 429 and 5xx answers are
    retried with backoff; other 4xx answers fail at once. ``file://`` URLs are copied and
    verified the same way, also in offline mode. See the module docstring for the deadlines.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        dest: final path; its parent is created.
        sha256: expected lowercase hex digest.
        settings: timeout, offline flag, progress default, GitHub token.
        size: expected length in bytes (the release listing's); checked against the free space
            before anything is fetched, against the length the server announces, and against
            every byte that arrives.
        session: a ``requests`` session to reuse (one is made and closed otherwise).
        desc: label for the progress bar (default: the file name).
        progress: force the progress bar on/off (default: ``settings.progress``).
        came_from: gets the URL the bytes finally came from, after redirects (for records).

    Returns:
        ``dest``.

    Raises:
        OfflineError: offline mode and ``url`` is not a ``file://`` URL.
        DownloadError: the transfer failed after the retries or took too long, the server
            refused it, the length is not ``size``, or the disk has no room (a ``.part`` is
            kept for resuming only after network failures).
        ChecksumMismatchError: the bytes do not match ``sha256`` (nothing is left behind).
        ProvisionError: ``sha256`` is not a valid digest or ``size`` is negative.
    """
    expected = _expected_sha256(sha256, url)
    if size is not None and (isinstance(size, bool) or size < 0):
        msg = f"invalid expected size {size!r} for {_safe_url(url)}; it must be a byte count"
        raise ProvisionError(msg)
    dest = Path(dest)
    part = _Part(dest.parent / (dest.name + PART_SUFFIX), size)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        msg = f"cannot download {url!r}: only http(s):// and file:// URLs are supported"
        raise DownloadError(msg)
    if settings.offline and scheme != "file":
        msg = f"offline mode (LLAMA_PROC_OFFLINE): not downloading {_safe_url(url)}"
        raise OfflineError(msg)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        msg = f"cannot create {dest.parent}: {err.strerror}; check LLAMA_PROC_CACHE_DIR"
        raise DownloadError(msg) from err
    if scheme == "file":
        _copy_local(url, part, dest.name)
        if came_from is not None:
            came_from.append(_safe_url(url))
    else:
        if size is not None:
            _require_space(dest.parent, size - part.sync(), dest.name)
        show = settings.progress if progress is None else progress
        own = session is None
        sess = make_session(settings) if session is None else session
        job = _Job(sess, url, part, expected, settings.download_timeout, desc or dest.name, show)
        try:
            _stream_with_retries(job)
        finally:
            part.close()
            if own:
                sess.close()
        if came_from is not None:
            came_from.append(_safe_url(job.final_url or url))
    actual = part.digest.hexdigest()
    if actual != expected:
        part.reset()
        raise ChecksumMismatchError(_safe_url(url), expected, actual)
    try:
        part.path.replace(dest)
    except OSError as err:
        msg = f"cannot move the verified download into place at {dest}: {err.strerror}"
        raise DownloadError(msg) from err
    logger.debug("downloaded %s -> %s (sha256 ok)", _safe_url(url), dest)
    return dest


def _copy_local(url: str, part: _Part, name: str) -> None:
    source = _local_path(url)
    part.reset()
    try:
        src = source.open("rb")
        needed = source.stat().st_size if part.expected_size is None else part.expected_size
    except OSError as err:
        msg = f"cannot read {source} (from {url}): {err.strerror or err}"
        raise DownloadError(msg) from err
    with src:
        _require_space(part.path.parent, needed, name)
        part.open()
        while True:
            try:
                chunk = src.read(CHUNK_SIZE)
            except OSError as err:
                part.reset()
                msg = f"cannot read {source} (from {url}): {err.strerror or err}"
                raise DownloadError(msg) from err
            if not chunk:
                break
            if part.expected_size is not None and part.size + len(chunk) > part.expected_size:
                part.reset()
                raise _too_long(url, part.expected_size)
            part.write(chunk)
        part.close()


@dataclass
class _Job:
    """One download: what to fetch, where the bytes go, how to report progress."""

    session: requests.Session
    url: str
    part: _Part
    expected: str
    timeout: float
    desc: str
    show: bool | None
    bar: Any = None
    pace: _Pace = field(init=False)
    final_url: str = ""
    """Where the bytes came from in the end, after redirects (the last answer's URL)."""

    def __post_init__(self) -> None:
        self.pace = _Pace(_safe_url(self.url))

    def progress(self, total: int | None) -> None:
        if self.bar is None:
            self.bar = _progress_bar(total, self.part.size, self.desc, enabled=self.show)
        else:
            self.bar.reset(total=total)
            self.bar.update(self.part.size)


def _stream_with_retries(job: _Job) -> None:
    failures = 0
    requests_made = 0
    redo_from_scratch = True  # one clean retry if a resumed download fails its checksum
    part, url = job.part, _safe_url(job.url)
    try:
        while True:
            requests_made += 1
            before = part.sync()
            job.pace.check(part.size, part.expected_size)
            try:
                _attempt(job)
            except _RestartError:
                if requests_made >= MAX_REQUESTS:
                    msg = f"download of {url} kept restarting; the server's Range support is broken"
                    raise DownloadError(msg) from None
                failures = 0
                continue
            except _RetryableError as err:
                progressed = part.size > before
                failures = 1 if progressed else failures + 1
                # A wait cut short by the whole transfer's budget is that budget running out:
                # say so, rather than blame the last request's own deadline.
                job.pace.check(part.size, part.expected_size)
                if failures >= err.attempts or requests_made >= MAX_REQUESTS:
                    msg = (
                        f"download of {url} failed after {requests_made} attempts in "
                        f"{job.pace.elapsed:.1f} s: {err.reason}; check the network (or "
                        "LLAMA_PROC_MIRROR) and try again"
                    )
                    raise DownloadError(msg) from err.__cause__
                # A transfer that moved forward resumes at once; a dead end backs off.
                delay = 0.0 if progressed else _backoff(failures, err.retry_after)
                logger.warning("download of %s: %s; retrying in %.1fs", url, err.reason, delay)
                _sleep(delay)
                continue
            if before and redo_from_scratch and part.digest.hexdigest() != job.expected:
                # The old part may hold bytes of a different file (the server's copy changed,
                # or a part left by another download): fetch the whole file once more.
                logger.warning("resumed download of %s failed its checksum; restarting", url)
                redo_from_scratch = False
                part.reset()
                continue
            return
    finally:
        if job.bar is not None:
            job.bar.close()


def _get(
    session: requests.Session,
    url: str,
    headers: Mapping[str, str],
    download_timeout: float,
    budget_left: float,
) -> requests.Response:
    """One streamed GET under the connect, first-byte and headers deadlines.

    The headers deadline is cut to ``budget_left`` (what remains of the whole transfer's
    budget). A long silence gets a log line.

    Raises:
        _RetryableError: a network failure or a deadline passed.
        DownloadError: the request cannot be made at all (a malformed URL...).
    """
    import requests  # noqa: PLC0415 - heavy; a cache hit never needs it

    connect, first_byte = _timeouts(download_timeout)
    limit = max(min(_headers_timeout(download_timeout), budget_left), 0.0)
    safe = _safe_url(url)
    host = urllib.parse.urlsplit(url).hostname or safe
    notice = threading.Timer(
        WAIT_NOTICE_AFTER,
        logger.warning,
        ("waiting for %s to answer (giving up within %g s)", safe, limit),
    )
    notice.daemon = True
    notice.start()
    started = time.monotonic()
    try:
        with headers_deadline(limit) as watch:
            try:
                response = session.get(
                    url, headers=dict(headers), stream=True, timeout=(connect, first_byte)
                )
            except requests.RequestException as err:
                if watch.fired:
                    raise _headers_too_slow(host, limit, started) from err
                raise
        if watch.fired:  # the cut came as the last header arrived, or ended them early
            response.close()
            raise _headers_too_slow(host, limit, started)
    except requests.ConnectTimeout as err:
        reason = f"could not connect to {host} within {connect:g} s (timed out)"
        raise _RetryableError(reason, attempts=NO_ANSWER_ATTEMPTS) from err
    except requests.ReadTimeout as err:
        reason = f"{host} did not answer within {first_byte:g} s (timed out)"
        raise _RetryableError(reason, attempts=NO_ANSWER_ATTEMPTS) from err
    except (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
    ) as err:
        raise _RetryableError(_describe(err)) from err
    except requests.RequestException as err:
        msg = f"cannot fetch {safe}: {_describe(err)}"
        raise DownloadError(msg) from err
    else:
        return response
    finally:
        notice.cancel()


def _attempt(job: _Job) -> None:
    part, url = job.part, _safe_url(job.url)
    offset = part.size
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    response = _get(job.session, job.url, headers, job.timeout, job.pace.left(part.size))
    with response:
        job.final_url = response.url or job.url
        status = response.status_code
        if status == 416 and offset:
            # The part may already be the whole file (a crash right after the last byte).
            if part.digest.hexdigest() == job.expected:
                return
            logger.info("server refused to resume %s (416); restarting", url)
            part.reset()
            raise _RestartError
        if _retryable_status(status):
            reason = f"HTTP {status} {response.reason}"
            raise _RetryableError(reason, _parse_retry_after(response.headers.get("Retry-After")))
        if status >= 400:
            msg = (
                f"download of {url} failed: HTTP {status} {response.reason}; "
                "check the URL, the release tag or LLAMA_PROC_MIRROR"
            )
            raise DownloadError(msg)
        total: int | None
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                logger.info("server resumed %s at the wrong offset; restarting", url)
                part.reset()
                raise _RestartError
        elif status == 200:
            if offset:
                logger.info("server ignored the Range request for %s; restarting", url)
                part.reset()
            total = _int_header(response.headers.get("Content-Length"))
        else:
            msg = f"download of {url} failed: unexpected HTTP {status}"
            raise DownloadError(msg)
        expected_size = part.expected_size
        if expected_size is not None and total is not None and total != expected_size:
            part.reset()
            msg = (
                f"the server announces {total} bytes for {url} but the release listing says "
                f"{expected_size}; the mirror serves another file or the listing is stale; "
                "check LLAMA_PROC_MIRROR"
            )
            raise DownloadError(msg)
        if expected_size is None and total is not None:
            _require_space(part.path.parent, total - part.size, job.desc)
        total = expected_size if expected_size is not None else total
        job.progress(total)
        _stream_body(response, job, total)
        if total is not None and part.size < total:
            msg = f"connection closed after {part.size} of {total} bytes"
            raise _RetryableError(msg)


def _stream_body(response: requests.Response, job: _Job, total: int | None) -> None:
    part, limit = job.part, job.part.expected_size
    part.open()
    first = True
    try:
        for chunk in _chunks(response):
            if first:
                _set_read_timeout(response, job.timeout)
                first = False
            if limit is not None and part.size + len(chunk) > limit:
                # Never write past the listing's size: a server that sends more is not serving
                # the file the listing describes (or is trying to fill the disk).
                part.reset()
                raise _too_long(job.url, limit)
            part.write(chunk)
            job.bar.update(len(chunk))
            job.pace.check(part.size, total)
    finally:
        part.close()


def fetch_page(
    url: str,
    settings: NetView,
    *,
    session: requests.Session | None = None,
    accept: str | None = None,
    headers: Mapping[str, str] | None = None,
    hints: Mapping[int, str] | None = None,
    max_bytes: int = MAX_PAGE_BYTES,
) -> Page:
    """GET a small document with the same retry policy as :func:`download_file`.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        settings: timeout and offline flag.
        session: a ``requests`` session to reuse.
        accept: the ``Accept`` header.
        headers: further request headers.
        hints: text appended to the error for a given HTTP status (e.g. 404, 403).
        max_bytes: the most the document may hold; more is refused (reading stops there).

    Raises:
        OfflineError: offline mode and ``url`` is not a ``file://`` URL.
        DownloadError: the request failed after the retries, or the server refused it.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        path = _local_path(url)
        try:
            if path.stat().st_size > max_bytes:
                msg = f"{path} (from {url}) holds more than {max_bytes} bytes; refusing it"
                raise DownloadError(msg)
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            msg = f"cannot read {path} (from {url}): {getattr(err, 'strerror', None) or err}"
            raise DownloadError(msg) from err
        kind = "application/json" if text.lstrip().startswith(("{", "[")) else "text/html"
        return Page(url, kind, text)
    if scheme not in ("http", "https"):
        msg = f"cannot fetch {url!r}: only http(s):// and file:// URLs are supported"
        raise DownloadError(msg)
    if settings.offline:
        msg = f"offline mode (LLAMA_PROC_OFFLINE): not fetching {_safe_url(url)}"
        raise OfflineError(msg)
    own = session is None
    sess = make_session(settings) if session is None else session
    request_headers = dict(headers or {})
    if accept:
        request_headers["Accept"] = accept
    safe = _safe_url(url)
    pace = _Pace(safe)
    try:
        for attempt in range(1, ATTEMPTS + 1):
            pace.check(0, None)
            try:
                return _fetch_once(
                    sess, url, request_headers, settings.download_timeout, pace, hints, max_bytes
                )
            except _RetryableError as err:
                if attempt >= err.attempts:
                    msg = (
                        f"fetching {safe} failed after {attempt} attempts in "
                        f"{pace.elapsed:.1f} s: {err.reason}"
                    )
                    raise DownloadError(msg + "; check the network and try again") from (
                        err.__cause__
                    )
                delay = _backoff(attempt, err.retry_after)
                logger.warning(
                    "fetching %s failed (%s); retrying in %.1fs", safe, err.reason, delay
                )
                _sleep(delay)
    finally:
        if own:
            sess.close()
    raise AssertionError  # pragma: no cover - the loop always returns or raises


def _fetch_once(
    session: requests.Session,
    url: str,
    headers: Mapping[str, str],
    download_timeout: float,
    pace: _Pace,
    hints: Mapping[int, str] | None,
    max_bytes: int = MAX_PAGE_BYTES,
) -> Page:
    safe = _safe_url(url)
    response = _get(session, url, headers, download_timeout, pace.left(0))
    with response:
        status = response.status_code
        if status >= 400:
            reason = f"HTTP {status} {response.reason}"
            if _retryable_status(status):
                raise _RetryableError(
                    reason, _parse_retry_after(response.headers.get("Retry-After"))
                )
            hint = (hints or {}).get(status, "")
            msg = f"fetching {safe} failed: {reason}"
            raise DownloadError(msg + (f"; {hint}" if hint else ""))
        body = bytearray()
        size = _int_header(response.headers.get("Content-Length"))
        for chunk in _chunks(response):
            if not body:
                _set_read_timeout(response, download_timeout)
            body += chunk
            if len(body) > max_bytes:
                msg = (
                    f"{safe} sent more than {_mb(MAX_PAGE_BYTES)}; that is no release listing "
                    "or index page (check LLAMA_PROC_MIRROR and LLAMA_PROC_INDEX_URL)"
                    if max_bytes == MAX_PAGE_BYTES
                    else f"{safe} sent more than {max_bytes} bytes, the most expected; refusing it"
                )
                raise DownloadError(msg)
            pace.check(len(body), size)
        # requests' own choice for a declared charset; JSON (and an undeclared one) is UTF-8.
        text = bytes(body).decode(response.encoding or "utf-8", errors="replace")
        return Page(response.url, response.headers.get("Content-Type", ""), text)
