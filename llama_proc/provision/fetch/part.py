"""The .part file a download writes into, and the checks around it.

Bytes land in ``<dest>.part`` with a running sha256 of exactly what it holds; a write that fails
(a full disk) removes it; a transfer that cannot fit is refused before it starts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Final, Protocol

from llama_proc.errors import DownloadError, ProvisionError

CHUNK_SIZE: Final = 1 << 20
"""Most bytes taken per read while streaming (large, so hashing dominates the loop)."""

PART_SUFFIX: Final = ".part"

_DISK_FULL: Final = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})

_SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


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


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...
    def close(self) -> None: ...


def _open_part(path: Path) -> _Sink:
    # One indirection so tests can put a writer that fails like a full disk in its place.
    return path.open("ab")


class _Part:
    """The ``.part`` file and the running hash of exactly the bytes it holds.

    A write that fails removes the file: a ``.part`` is kept for resuming only after network
    failures, never after a full disk (where keeping it would keep the disk full).
    """

    def __init__(self, path: Path, expected_size: int | None = None) -> None:
        self.path = path
        self.expected_size = expected_size
        self.digest = hashlib.sha256()
        self.size = 0
        self._fh: _Sink | None = None

    def sync(self) -> int:
        """Make the hash cover the file as it is on disk; return its size (the resume offset).

        A file longer than the expected size cannot be a prefix of it and is discarded.
        """
        try:
            on_disk = self.path.stat().st_size
        except FileNotFoundError:
            on_disk = 0
        if self.expected_size is not None and on_disk > self.expected_size:
            self.reset()
            return 0
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
        if self._fh is not None:
            with contextlib.suppress(OSError):  # flushing may fail again on a full disk
                self._fh.close()
            self._fh = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.digest = hashlib.sha256()
        self.size = 0

    def open(self) -> None:
        try:
            self._fh = _open_part(self.path)
        except OSError as err:
            raise self._failed(err) from err

    def write(self, chunk: bytes) -> None:
        assert self._fh is not None  # noqa: S101 - opened by the caller
        try:
            self._fh.write(chunk)
        except OSError as err:
            raise self._failed(err) from err
        self.digest.update(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()  # flushes: a full disk may only show here
            except OSError as err:
                raise self._failed(err) from err

    def _failed(self, err: OSError) -> DownloadError:
        written = self.size
        self.reset()
        folder = self.path.parent
        if err.errno in _DISK_FULL:
            need = (
                f"{_mb(self.expected_size)} for {self.path.name[: -len(PART_SUFFIX)]}"
                if self.expected_size is not None
                else "more space"
            )
            msg = (
                f"disk full in {folder} after writing {_mb(written)}; the partial download was "
                f"removed; it needs {need}: free space there or set LLAMA_PROC_CACHE_DIR to a "
                "bigger disk"
            )
        else:
            msg = (
                f"cannot write {self.path}: {err.strerror or err}; the partial download was "
                "removed; check the folder's permissions or set LLAMA_PROC_CACHE_DIR"
            )
        return DownloadError(msg)


def _require_space(folder: Path, needed: int, name: str) -> None:
    """Refuse to start a transfer that cannot fit on ``folder``'s filesystem."""
    if needed <= 0:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: the write itself will say if the disk fills up
    if free < needed:
        msg = (
            f"not enough free space in {folder} for {name}: it needs {_mb(needed)} and "
            f"{_mb(free)} is free; free space there or set LLAMA_PROC_CACHE_DIR to a bigger disk"
        )
        raise DownloadError(msg)
