"""Reading one HTTP response.

Its body in chunks under a read deadline, its range and length headers, and what to call a
failed request.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from llama_proc.errors import DownloadError
from llama_proc.provision.fetch.part import (
    CHUNK_SIZE,
)
from llama_proc.provision.fetch.retry import (
    HOST_NOT_FOUND,
    NO_ANSWER_ATTEMPTS,
    _RetryableError,
)
from llama_proc.provision.fetch.session import _safe_url

if TYPE_CHECKING:
    from collections.abc import Iterator

    import requests


_CONTENT_RANGE_RE: Final = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


def _too_long(url: str, limit: int) -> DownloadError:
    msg = (
        f"{_safe_url(url)} sent more than the {limit} bytes the release listing announces; the "
        "mirror serves another file or the listing is stale; check LLAMA_PROC_MIRROR"
    )
    return DownloadError(msg)


def _headers_too_slow(host: str, limit: float, started: float) -> _RetryableError:
    elapsed = time.monotonic() - started
    reason = (
        f"{host} did not finish its status line and headers within {limit:g} s "
        f"(timed out after {elapsed:.1f} s)"
    )
    return _RetryableError(reason, attempts=NO_ANSWER_ATTEMPTS)


def _set_read_timeout(response: requests.Response, seconds: float) -> None:
    """Give the rest of the body the stall timeout instead of the first-byte deadline."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(seconds)


def _chunks(response: requests.Response) -> Iterator[bytes]:
    """Body chunks as they arrive.

    urllib3 2's ``read1`` hands over whatever has arrived (up to ``CHUNK_SIZE``), so a broken
    connection loses nothing already received; ``iter_content`` (older urllib3) waits for a
    full chunk and drops a partial one.
    """
    import requests  # noqa: PLC0415 - heavy; a cache hit never needs it
    import urllib3  # noqa: PLC0415 - comes with requests

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
    import requests  # noqa: PLC0415 - heavy; a cache hit never needs it

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
