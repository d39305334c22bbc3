r"""A bounded scan of a tar archive's headers, run before ``tarfile`` parses any of them.

``tarfile`` reads a pax extended header (types ``x``, ``g``) or a GNU long name or link (``L``,
``K``) whole into memory, whatever size its header claims, and before Python 3.11.10 / 3.12.6
parses pax records with backtracking regular expressions (CVE-2024-6232): a malformed record
costs time quadratic in its size (a 16 KiB one 0.17 s, a 1 MiB one minutes). This scan walks the
512-byte headers of the decompressed stream itself and refuses, before ``tarfile`` sees them:

* an extended header larger than :data:`MAX_EXTENDED_HEADER`;
* a pax header whose records are not exactly ``"<length> <keyword>=<value>\\n"`` (checked in
  one pass), or that holds a run of digits longer than :data:`MAX_DIGIT_RUN` (the shape the
  old ``hdrcharset`` search backtracks on, in a well-formed value);
* more headers than ``max_headers``, or data past ``max_offset`` (the extraction's byte cap).

The scan decompresses the archive once more than extraction does; it keeps no data.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ArchiveError

if TYPE_CHECKING:
    import io
    from pathlib import Path

__all__ = ["MAX_DIGIT_RUN", "MAX_EXTENDED_HEADER", "scan_tar_headers"]

MAX_EXTENDED_HEADER: Final = 64 << 10
"""Largest pax header or GNU long name/link accepted (a path is at most 4 KiB; xattrs stay
under a few KiB)."""
MAX_DIGIT_RUN: Final = 1024
"""Longest run of decimal digits accepted inside a pax header."""
BLOCK: Final = 512
_EXTENDED: Final = frozenset(b"xgLK")
_PAX: Final = frozenset(b"xg")
_SKIP_CHUNK: Final = 1 << 20
_MAX_LENGTH_DIGITS: Final = 20
_DIGIT_RUN_RE: Final = re.compile(rb"[0-9]{%d}" % (MAX_DIGIT_RUN + 1))
_ZERO_BLOCK: Final = bytes(BLOCK)


def scan_tar_headers(archive: Path, *, max_headers: int, max_offset: int) -> None:
    """Walk every header of ``archive`` (plain, gzip, bzip2 or xz tar) and refuse bad ones.

    Args:
        archive: the tar file.
        max_headers: the most headers (members and extended headers) accepted.
        max_offset: the furthest into the decompressed stream any member's data may reach.

    Raises:
        ArchiveError: an extended header is too large or malformed, or a cap is passed.
            Damage that is not an extended header (a bad checksum, a truncation) is left
            for ``tarfile`` to report.
        OSError: the archive cannot be read or decompressed.
    """
    with _open(archive) as stream:
        offset = 0
        for _ in range(max_headers):
            block = stream.read(BLOCK)
            if len(block) < BLOCK or block == _ZERO_BLOCK:
                return
            size = _size(block[124:136])
            if size is None:
                return  # not a header tarfile accepts either: it reports the damage
            typeflag = block[156]
            offset += BLOCK
            padded = -(-size // BLOCK) * BLOCK
            if typeflag in _EXTENDED:
                what = "pax header" if typeflag in _PAX else "GNU long name"
                if size > MAX_EXTENDED_HEADER:
                    msg = (
                        f"{archive.name}: a {what} of {size} bytes, larger than "
                        f"{MAX_EXTENDED_HEADER >> 10} KiB; refusing the archive: delete it and "
                        "download it from a trusted source"
                    )
                    raise ArchiveError(msg)
                data = stream.read(padded)
                if len(data) < size:
                    return  # truncated: tarfile says so
                if typeflag in _PAX:
                    _check_pax(data[:size], archive)
            else:
                if offset + size > max_offset:
                    return  # the extraction's byte cap refuses it, naming the member
                _skip(stream, padded)
            offset += padded
        msg = f"{archive.name} holds more than {max_headers} tar headers; refusing the archive"
        raise ArchiveError(msg)


def _open(archive: Path) -> io.BufferedIOBase:
    with archive.open("rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(archive, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(archive, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(archive, "rb")
    return archive.open("rb")


def _size(field: bytes) -> int | None:
    """A header's size field: octal digits, or GNU's base-256 form; None when malformed."""
    if field[0] & 0x80:
        if field[0] == 0xFF:
            return None  # negative
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _skip(stream: io.BufferedIOBase, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(count, _SKIP_CHUNK))
        if not chunk:
            return
        count -= len(chunk)


def _check_pax(data: bytes, archive: Path) -> None:
    r"""Accept only records ``"<length> <keyword>=<value>\\n"`` covering ``data`` exactly.

    One pass: each search is confined to its record, so the cost is linear in ``data``.
    """
    pos, end = 0, len(data)
    while pos < end:
        if not data[pos:].strip(b"\0"):
            return  # trailing padding
        space = data.find(b" ", pos, pos + _MAX_LENGTH_DIGITS + 1)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            _bad_pax(archive, pos, "no length field")
        length = int(digits)
        stop = pos + length
        if stop > end or length < len(digits) + 4 or data[stop - 1] != ord("\n"):
            _bad_pax(archive, pos, f"a record length of {length} that does not fit")
        if data.find(b"=", space + 2, stop - 1) < 0:
            _bad_pax(archive, pos, "a record without keyword=value")
        pos = stop
    if _DIGIT_RUN_RE.search(data):
        _bad_pax(archive, 0, f"a run of more than {MAX_DIGIT_RUN} digits")


def _bad_pax(archive: Path, pos: int, what: str) -> None:
    msg = (
        f"{archive.name}: a malformed pax header ({what} at byte {pos}); refusing the archive "
        "before parsing it: delete it and download it from a trusted source"
    )
    raise ArchiveError(msg)
