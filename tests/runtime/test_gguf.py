"""check_gguf: refuse missing and non-GGUF model files before anything is spawned."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest

from llama_proc.errors import ModelFileError
from llama_proc.runtime.gguf import check_gguf

if TYPE_CHECKING:
    from pathlib import Path


def test_real_model_header(smol_model: Path) -> None:
    header = check_gguf(smol_model)
    assert header.version == 3
    assert header.byte_order == "little"
    assert header.tensor_count > 10
    assert header.metadata_count > 10
    assert header.size == smol_model.stat().st_size


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(b"", "not a GGUF model file", id="empty"),
        pytest.param(b"\x7fELF\x02\x01\x01" + bytes(40), "not a GGUF model file", id="elf"),
        pytest.param(b"version https://git-lfs.github.com/spec/v1\n", "Git LFS pointer", id="lfs"),
        pytest.param(b"GGUF\x03\x00", "truncated", id="truncated"),
        pytest.param(b"GGUF" + struct.pack("<IQ", 3, 1), "truncated", id="truncated-v3"),
        pytest.param(b"GGUF" + struct.pack("<IQQ", 99, 1, 1), "version 99", id="unknown-version"),
        pytest.param(b"GGUF" + struct.pack("<IQQ", 3, 1 << 50, 1), "corrupt", id="absurd-count"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=match):
        check_gguf(path)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        check_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="is a directory"):
        check_gguf(tmp_path)


def test_version_1_and_big_endian(tmp_path: Path) -> None:
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + struct.pack("<III", 1, 2, 3))
    assert (check_gguf(v1).version, check_gguf(v1).tensor_count) == (1, 2)
    be = tmp_path / "be.gguf"
    be.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 5, 6))
    header = check_gguf(be)
    assert (header.byte_order, header.tensor_count, header.metadata_count) == ("big", 5, 6)


def test_model_file_error_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        check_gguf(tmp_path / "nope.gguf")
