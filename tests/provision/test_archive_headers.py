"""tar's extended headers are checked by our own bounded scan before tarfile parses them.

tarfile reads a pax header or a GNU long name whole into memory, and before Python 3.11.10 /
3.12.6 parses pax records with backtracking regular expressions (CVE-2024-6232): a malformed
header costs time quadratic in its size. The archives here are written byte by byte, because
tarfile's writer never produces these shapes.
"""

from __future__ import annotations

import gzip
import time
from typing import TYPE_CHECKING

import pytest

from llama_proc.errors import ArchiveError
from llama_proc.provision.fetch.archive import MAX_EXTENDED_HEADER, extract_archive

if TYPE_CHECKING:
    from pathlib import Path

QUICK = 0.5
"""Seconds a refusal may take."""


def _header(name: bytes, typeflag: bytes, size: int) -> bytes:
    block = bytearray(512)
    block[: len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = typeflag
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _archive(path: Path, typeflag: bytes, payload: bytes) -> Path:
    """A tar.gz of one extended header (``typeflag``, ``payload``) and one small file."""
    body = b"hello\n"
    raw = (
        _header(b"././@Extended", typeflag, len(payload))
        + _padded(payload)
        + _header(b"llama-b1/llama-server", b"0", len(body))
        + _padded(body)
        + bytes(1024)
    )
    path.write_bytes(gzip.compress(raw, compresslevel=1))
    return path


def _refused(archive: Path, dest: Path, match: str) -> float:
    began = time.perf_counter()
    with pytest.raises(ArchiveError, match=match) as info:
        extract_archive(archive, dest)
    took = time.perf_counter() - began
    assert "\n" not in str(info.value)
    assert not dest.exists() or not any(dest.iterdir())
    return took


@pytest.mark.parametrize(
    "payload",
    [
        # The CVE-2024-6232 shape: length fields and spaces with no "=", on which the old
        # regular expressions backtrack.
        pytest.param((b"2 " * 138)[:275], id="cve-2024-6232-shape"),
        pytest.param(b"1" * 275, id="digits"),
        pytest.param(b"99 path=a\n", id="length-past-end"),
        pytest.param(b"10 noequal\n", id="no-keyword"),
        pytest.param(b"0 a=b\n", id="zero-length"),
    ],
)
def test_a_malformed_pax_header_is_refused_before_tarfile_reads_it(
    tmp_path: Path, payload: bytes
) -> None:
    archive = _archive(tmp_path / "a.tar.gz", b"x", payload)
    assert _refused(archive, tmp_path / "x", "pax") < QUICK


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param((b"2 " * (32 << 10))[: MAX_EXTENDED_HEADER - 101] + b"=", id="records"),
        pytest.param(b"1" * (MAX_EXTENDED_HEADER - 100), id="digits"),
    ],
)
def test_a_quadratic_pax_header_under_the_size_cap_is_refused_at_once(
    tmp_path: Path, payload: bytes
) -> None:
    # Measured with Python 3.11.7's tarfile: 1.9 s and 6.8 s of CPU for these 64 KiB.
    archive = _archive(tmp_path / "a.tar.gz", b"x", payload)
    assert _refused(archive, tmp_path / "x", "pax") < QUICK


@pytest.mark.parametrize("typeflag", [b"x", b"g", b"L", b"K"])
def test_an_extended_header_over_the_cap_is_refused_unread(tmp_path: Path, typeflag: bytes) -> None:
    # 8 MiB of 'a': a GNU long name tarfile would read whole (a 512 MiB one cost 1.5 GiB).
    payload = b"a" * (8 << 20)
    archive = _archive(tmp_path / "a.tar.gz", typeflag, payload)
    assert _refused(archive, tmp_path / "x", f"larger than {MAX_EXTENDED_HEADER >> 10} KiB") < QUICK


def test_well_formed_pax_and_long_names_still_extract(tmp_path: Path) -> None:
    long_dir = "d" * 200
    records = b""
    for key, value in (("path", f"llama-b1/{long_dir}/llama-server"), ("mtime", "1.5")):
        text = f" {key}={value}\n".encode()
        size = len(text) + len(str(len(text)))
        size = len(text) + len(str(size))
        records += str(size).encode() + text
    archive = _archive(tmp_path / "a.tar.gz", b"x", records)
    root = extract_archive(archive, tmp_path / "x")
    assert (root / long_dir / "llama-server").read_bytes() == b"hello\n"

    deep = f"{'n' * 120}/{'m' * 120}"
    archive = _archive(tmp_path / "b.tar.gz", b"L", f"llama-b1/{deep}".encode() + b"\0")
    root = extract_archive(archive, tmp_path / "y")
    assert (root / deep).read_bytes() == b"hello\n"
