"""HTTP downloads: streaming, sha256 while streaming, resume, bounded retries, progress.

This module knows nothing about the cache layout or locking: callers choose ``dest`` and hold
whatever lock protects it. Bytes land in ``<dest>.part`` beside ``dest`` (same filesystem, so
the final :func:`os.replace` is atomic) and only reach ``dest`` once their sha256 matches.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._version import __version__
from llama_proc.errors import ChecksumMismatchError, DownloadError, OfflineError, ProvisionError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    import requests

    from llama_proc.config import Settings

__all__ = [
    "CHUNK_SIZE",
    "PART_SUFFIX",
    "Page",
    "download_file",
    "fetch_page",
    "file_sha256",
    "make_session",
]

logger = logging.getLogger(__name__)

CHUNK_SIZE: Final = 1 << 20
"""Most bytes taken per read while streaming (large, so hashing dominates the loop)."""
PART_SUFFIX: Final = ".part"
USER_AGENT: Final = f"llama-proc/{__version__}"
GITHUB_API_HOST: Final = "api.github.com"
ATTEMPTS: Final = 5
"""Consecutive failed requests (no new bytes) before giving up."""
DNS_ATTEMPTS: Final = 2
"""Tries for a host name that does not resolve: it rarely starts resolving within seconds, and
an offline host would otherwise wait out the whole backoff before falling back."""
HOST_NOT_FOUND: Final = "host name not found"
MAX_REQUESTS: Final = 30
"""Hard cap on requests for one download, even when each one makes progress."""
BACKOFF_BASE: Final = 0.5
BACKOFF_MAX: Final = 10.0
RETRY_AFTER_MAX: Final = 30.0
"""A server's ``Retry-After`` is honoured up to this many seconds."""
_SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE_RE: Final = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


def _sleep(seconds: float) -> None:
    # One indirection so tests can record (and skip) backoff waits.
    time.sleep(seconds)


def _attempts_for(reason: str) -> int:
    return DNS_ATTEMPTS if reason == HOST_NOT_FOUND else ATTEMPTS


def _retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _backoff(failures: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(max(retry_after, 0.0), RETRY_AFTER_MAX)
    return float(min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_MAX))


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class _GitHubTokenAuth:
    """Adds the token only to requests for the GitHub API, never to downloads or mirrors."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        parts = urllib.parse.urlsplit(request.url or "")
        if parts.scheme == "https" and parts.hostname == GITHUB_API_HOST:
            request.headers["Authorization"] = f"Bearer {self._token}"
        return request


def make_session(settings: Settings) -> requests.Session:
    """A ``requests`` session with llama-proc's User-Agent (and GitHub token, API host only).

    Args:
        settings: provides ``github_token``.
    """
    import requests

    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    if settings.github_token:
        session.auth = _GitHubTokenAuth(settings.github_token)
    return session


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_sha256(sha256: str, url: str) -> str:
    value = (sha256 or "").strip().lower()
    if not _SHA256_RE.match(value):
        msg = (
            f"no valid sha256 to verify {url} against (got {sha256!r}); pin one in variants.toml "
            "— llama-proc never installs unverified bytes"
        )
        raise ProvisionError(msg)
    return value


def _local_path(url: str) -> Path:
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


def _safe_url(url: str) -> str:
    """The URL without credentials or query string, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Part:
    """The ``.part`` file and the running hash of exactly the bytes it holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self.size = 0
        self._fh: Any = None

    def sync(self) -> int:
        """Make the hash cover the file as it is on disk; return its size (the resume offset)."""
        try:
            on_disk = self.path.stat().st_size
        except FileNotFoundError:
            on_disk = 0
        if on_disk != self.size:
            # A part left by an earlier process (or a write we could not finish): re-hash it so
            # the final digest covers every byte, not only the ones fetched this time.
            self.digest = hashlib.sha256()
            self.size = 0
            if on_disk:
                with self.path.open("rb") as fh:
                    while chunk := fh.read(CHUNK_SIZE):
                        self.digest.update(chunk)
                        self.size += len(chunk)
        return self.size

    def reset(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.digest = hashlib.sha256()
        self.size = 0

    def open(self) -> None:
        self._fh = self.path.open("ab")

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _RetryableError(Exception):
    """One request failed in a way worth retrying."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _RestartError(Exception):
    """The part was discarded; start again from byte 0 at once."""


def _progress_bar(total: int | None, initial: int, desc: str, *, enabled: bool | None) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        # None lets tqdm hide itself when stderr is not a terminal.
        disable=None if enabled is None else not enabled,
        leave=False,
    )


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str,
    settings: Settings,
    session: requests.Session | None = None,
    desc: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Download ``url`` to ``dest``, verifying its sha256 before it gets its final name.

    An existing ``<dest>.part`` is resumed with an HTTP Range request (servers that answer 200
    instead are restarted cleanly). Connection errors, timeouts, 408, 429 and 5xx answers are
    retried with backoff; other 4xx answers fail at once. ``file://`` URLs are copied and
    verified the same way, also in offline mode.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        dest: final path; its parent is created.
        sha256: expected lowercase hex digest.
        settings: timeout, offline flag, progress default, GitHub token.
        session: a ``requests`` session to reuse (one is made and closed otherwise).
        desc: label for the progress bar (default: the file name).
        progress: force the progress bar on/off (default: ``settings.progress``).

    Returns:
        ``dest``.

    Raises:
        OfflineError: offline mode and ``url`` is not a ``file://`` URL.
        DownloadError: the transfer failed after the retries, or the server refused it.
        ChecksumMismatchError: the bytes do not match ``sha256`` (nothing is left behind).
        ProvisionError: ``sha256`` is not a valid digest.
    """
    expected = _expected_sha256(sha256, url)
    dest = Path(dest)
    part = _Part(dest.parent / (dest.name + PART_SUFFIX))
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
        _copy_local(url, part)
    else:
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


def _copy_local(url: str, part: _Part) -> None:
    source = _local_path(url)
    part.reset()
    try:
        with source.open("rb") as src:
            part.open()
            while chunk := src.read(CHUNK_SIZE):
                part.write(chunk)
    except OSError as err:
        part.reset()
        msg = f"cannot read {source} (from {url}): {err.strerror or err}"
        raise DownloadError(msg) from err
    finally:
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
                if failures >= _attempts_for(err.reason) or requests_made >= MAX_REQUESTS:
                    msg = (
                        f"download of {url} failed after {requests_made} attempts: "
                        f"{err.reason}; check the network (or LLAMA_PROC_MIRROR) and try again"
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


def _attempt(job: _Job) -> None:
    import requests

    part, url = job.part, _safe_url(job.url)
    offset = part.size
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = job.session.get(
            job.url, headers=headers, stream=True, timeout=(job.timeout, job.timeout)
        )
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _RetryableError(_describe(err)) from err
    except requests.RequestException as err:
        msg = f"cannot download {url}: {_describe(err)}"
        raise DownloadError(msg) from err
    with response:
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
        job.progress(total)
        _stream_body(response, job)
        if total is not None and part.size < total:
            msg = f"connection closed after {part.size} of {total} bytes"
            raise _RetryableError(msg)


def _chunks(response: requests.Response) -> Iterator[bytes]:
    """Body chunks as they arrive.

    urllib3 2's ``read1`` hands over whatever has arrived (up to ``CHUNK_SIZE``), so a broken
    connection loses nothing already received; ``iter_content`` (older urllib3) waits for a
    full chunk and drops a partial one.
    """
    import requests
    import urllib3

    raw = response.raw
    if not hasattr(raw, "read1"):
        try:
            yield from response.iter_content(chunk_size=CHUNK_SIZE)
        except requests.RequestException as err:
            raise _RetryableError(_describe(err)) from err
        return
    while True:
        try:
            chunk = raw.read1(CHUNK_SIZE, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as err:
            msg = "read timed out"
            raise _RetryableError(msg) from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            msg = "connection broken mid-transfer"
            raise _RetryableError(msg) from err
        if not chunk:
            return
        yield chunk


def _stream_body(response: requests.Response, job: _Job) -> None:
    job.part.open()
    try:
        for chunk in _chunks(response):
            try:
                job.part.write(chunk)
            except OSError as err:
                msg = f"cannot write {job.part.path}: {err.strerror}"
                raise DownloadError(msg) from err
            job.bar.update(len(chunk))
    finally:
        job.part.close()


def _content_range(value: str) -> tuple[int, int | None]:
    match = _CONTENT_RANGE_RE.match(value.strip())
    if match is None:
        return -1, None
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _describe(err: BaseException) -> str:
    """A short reason for a requests/urllib3 error (their str() nests several layers)."""
    import requests

    if isinstance(err, requests.ConnectTimeout):
        return "connection timed out"
    if isinstance(err, requests.ReadTimeout):
        return "read timed out"
    if isinstance(err, requests.exceptions.ChunkedEncodingError):
        return "connection broken mid-transfer"
    if isinstance(err, requests.ConnectionError):
        text = str(err)
        if "timed out" in text:  # a read timeout while streaming arrives as ConnectionError
            return "read timed out"
        if "Connection refused" in text:
            return "connection refused"
        if "Name or service not known" in text or "getaddrinfo" in text:
            return HOST_NOT_FOUND
        return "connection error"
    return f"{type(err).__name__}: {err}"


@dataclass(frozen=True)
class Page:
    """A small document fetched whole (a release listing, an index page)."""

    url: str
    """The final URL, after redirects (relative links resolve against it)."""
    content_type: str
    text: str


def fetch_page(
    url: str,
    settings: Settings,
    *,
    session: requests.Session | None = None,
    accept: str | None = None,
    headers: Mapping[str, str] | None = None,
    hints: Mapping[int, str] | None = None,
) -> Page:
    """GET a small document with the same retry policy as :func:`download_file`.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        settings: timeout and offline flag.
        session: a ``requests`` session to reuse.
        accept: the ``Accept`` header.
        headers: further request headers.
        hints: text appended to the error for a given HTTP status (e.g. 404, 403).

    Raises:
        OfflineError: offline mode and ``url`` is not a ``file://`` URL.
        DownloadError: the request failed after the retries, or the server refused it.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        path = _local_path(url)
        try:
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
    import requests

    own = session is None
    sess = make_session(settings) if session is None else session
    request_headers = dict(headers or {})
    if accept:
        request_headers["Accept"] = accept
    timeout = (settings.download_timeout, settings.download_timeout)
    try:
        for attempt in range(1, ATTEMPTS + 1):
            retry_after: float | None = None
            cause: Exception | None = None
            try:
                response = sess.get(url, headers=request_headers, timeout=timeout)
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as err:
                reason, cause = _describe(err), err
            except requests.RequestException as err:
                msg = f"cannot fetch {_safe_url(url)}: {_describe(err)}"
                raise DownloadError(msg) from err
            else:
                status = response.status_code
                if status < 400:
                    content_type = response.headers.get("Content-Type", "")
                    return Page(response.url, content_type, response.text)
                reason = f"HTTP {status} {response.reason}"
                hint = (hints or {}).get(status, "")
                if not _retryable_status(status):
                    msg = f"fetching {_safe_url(url)} failed: {reason}"
                    raise DownloadError(msg + (f"; {hint}" if hint else ""))
                retry_after = _parse_retry_after(response.headers.get("Retry-After"))
            if attempt >= _attempts_for(reason):
                msg = f"fetching {_safe_url(url)} failed after {attempt} attempts: {reason}"
                raise DownloadError(msg + "; check the network and try again") from cause
            delay = _backoff(attempt, retry_after)
            logger.warning(
                "fetching %s failed (%s); retrying in %.1fs", _safe_url(url), reason, delay
            )
            _sleep(delay)
    finally:
        if own:
            sess.close()
    raise AssertionError  # pragma: no cover - the loop always returns or raises
