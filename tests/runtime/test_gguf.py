"""check_gguf: refuse missing and non-GGUF model files before anything is spawned.

read_gguf: our header reader, checked field by field against ``gguf``'s GGUFReader (llama.cpp's
own), and against hostile headers.
"""

from __future__ import annotations

import contextlib
import random
import struct
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFEndian,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)
from tiny_gguf import write_model

from llama_proc.errors import ModelFileError
from llama_proc.models.ggml_types import FILE_TYPES, GGML_TYPES
from llama_proc.models.gguf import (
    INLINE_ARRAY_MAX,
    MAX_ARRAY_DEPTH,
    MAX_ARRAY_LENGTH,
    MAX_HEADER_BYTES,
    MAX_INLINE_ITEMS,
    MAX_METADATA_COUNT,
    MAX_STRING_LENGTH,
    GgufArray,
    read_gguf,
)
from llama_proc.models.gguf_header import check_gguf

if TYPE_CHECKING:
    from pathlib import Path

READ_TIME_LIMIT = 0.5  # seconds for the smoke model's header; gguf's reader takes 2-4 s


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


# ----------------------------------------------------------------------------- read_gguf
def test_type_tables_agree_with_the_gguf_package() -> None:
    for kind in GGMLQuantizationType:
        ours = GGML_TYPES[kind.value]
        assert (ours.name, ours.block_size, ours.type_size) == (
            kind.name,
            *GGML_QUANT_SIZES[kind],
        )
    for file_type in LlamaFileType:
        assert FILE_TYPES[file_type.value] == file_type.name


def _assert_same_as_gguf_reader(path: Path) -> None:
    ours = read_gguf(path)
    theirs = GGUFReader(path, "r")
    header_keys = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    assert list(ours.metadata) == [k for k in theirs.fields if k not in header_keys]
    for key, value in ours.metadata.items():
        field = theirs.fields[key]
        if isinstance(value, GgufArray):
            assert field.types[0] == GGUFValueType.ARRAY, key
            assert value.item_type == field.types[1], key
            if value.item_type != GGUFValueType.ARRAY:  # gguf counts a nested one's leaves
                assert value.length == len(field.data), key
        elif isinstance(value, tuple):
            assert list(value) == field.contents(), key
        else:
            assert value == field.contents(), key
            assert type(value) is type(field.contents()), key
    assert len(ours.tensors) == len(theirs.tensors)
    for mine, other in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.name == other.name
        assert mine.shape == tuple(int(d) for d in other.shape)
        assert mine.ggml_type == int(other.tensor_type)
        assert mine.type_name == other.tensor_type.name
        assert mine.n_elements == int(other.n_elements)
        assert mine.n_bytes == int(other.n_bytes)
        assert ours.data_offset + mine.offset == other.data_offset
    assert (ours.header.byte_order == "big") == (theirs.endianess == GGUFEndian.BIG)


def test_same_as_gguf_reader_on_the_real_model(smol_model: Path) -> None:
    _assert_same_as_gguf_reader(smol_model)
    tokens = read_gguf(smol_model).metadata["tokenizer.ggml.tokens"]
    assert tokens == GgufArray(item_type=8, length=49152)


def _rich_model(path: Path, endian: GGUFEndian = GGUFEndian.LITTLE) -> Path:
    """Every value type, short and long numeric arrays, a string array, nested arrays."""
    writer = GGUFWriter(path, "llama", endianess=endian)
    writer.add_uint8("t.u8", 250)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -3000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo wörld")
    writer.add_uint64("t.u64", 1 << 60)
    writer.add_int64("t.i64", -(1 << 60))
    writer.add_float64("t.f64", 0.1)
    writer.add_array("t.short", [1, 2, 3])
    writer.add_array("t.long", list(range(INLINE_ARRAY_MAX + 1)))
    writer.add_array("t.strings", ["a", "", "ccc" * 50])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_custom_alignment(64)
    writer.add_tensor("w.f32", np.zeros((4, 64), np.float32))
    q8 = np.zeros((2, 34), np.uint8)  # two rows of one Q8_0 block (32 elements) as raw bytes
    writer.add_tensor("w.q8", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "endian", [pytest.param(GGUFEndian.LITTLE, id="little"), pytest.param(GGUFEndian.BIG, id="big")]
)
def test_same_as_gguf_reader_on_written_models(tmp_path: Path, endian: GGUFEndian) -> None:
    rich = _rich_model(tmp_path / "rich.gguf", endian)
    _assert_same_as_gguf_reader(rich)
    metadata = read_gguf(rich).metadata
    assert metadata["t.short"] == (1, 2, 3)
    assert metadata["t.long"] == GgufArray(item_type=5, length=INLINE_ARRAY_MAX + 1)
    assert metadata["t.nested"] == GgufArray(item_type=9, length=2)
    assert read_gguf(rich).data_offset % 64 == 0
    _assert_same_as_gguf_reader(write_model(tmp_path / "t.gguf", kv_heads=[4, 0, 2], layers=3))


def test_reads_the_smoke_model_header_fast(smol_model: Path) -> None:
    began = time.perf_counter()
    header = read_gguf(smol_model)
    elapsed = time.perf_counter() - began
    assert len(header.tensors) == 272
    assert elapsed < READ_TIME_LIMIT, f"read_gguf took {elapsed:.3f} s"


def _kv_file(*kvs: bytes, tensors: int = 0, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs)) + b"".join(kvs) + tail


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", kind) + payload


def _tensor(name: str, dims: tuple[int, ...], kind: int = 0, offset: int = 0) -> bytes:
    packed = struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
    return _str(name) + packed + struct.pack("<IQ", kind, offset)


def _array(kind: int, length: int, body: bytes = b"") -> bytes:
    return struct.pack("<IQ", kind, length) + body


HOSTILE = [
    pytest.param(
        b"GGUF" + struct.pack("<IQQ", 3, 0, MAX_METADATA_COUNT + 1) + bytes(64),
        "entries",
        id="kv-count",
    ),
    pytest.param(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1000) + bytes(64), "1000 metadata", id="kv-count-size"
    ),
    pytest.param(
        b"GGUF" + struct.pack("<IQQ", 3, 1 << 30, 0) + bytes(64), "tensors entries", id="tensors"
    ),
    pytest.param(
        _kv_file(struct.pack("<Q", MAX_STRING_LENGTH * 1024) + bytes(64)),
        "metadata key of",
        id="key-length",
    ),
    pytest.param(
        _kv_file(_kv("k", 8, struct.pack("<Q", MAX_STRING_LENGTH + 1))),
        "metadata string of",
        id="string-length",
    ),
    pytest.param(
        _kv_file(_kv("k", 9, _array(8, MAX_ARRAY_LENGTH + 1))), "array of", id="array-length"
    ),
    pytest.param(
        _kv_file(_kv("k", 9, _array(8, MAX_ARRAY_LENGTH))), "truncated", id="strings-past-end"
    ),
    pytest.param(_kv_file(_kv("k", 9, _array(6, 1 << 40))), "array of", id="floats-count"),
    pytest.param(_kv_file(_kv("k", 9, _array(6, 1 << 20))), "truncated", id="floats-past-end"),
    pytest.param(
        _kv_file(_kv("k", 9, _array(9, 1, _array(9, 1, _array(9, 1, _array(9, 1, _array(9, 1))))))),
        f"more than {MAX_ARRAY_DEPTH} deep",
        id="nesting",
    ),
    pytest.param(_kv_file(_kv("k", 13, b"")), "value type 13", id="value-type"),
    pytest.param(_kv_file(_kv("k", 9, _array(42, 1))), "item type 42", id="item-type"),
    pytest.param(
        _kv_file(_kv("k", 4, bytes(4)), _kv("k", 4, bytes(4))), "appears twice", id="dup-key"
    ),
    pytest.param(
        _kv_file(tensors=1, tail=_tensor("t", (1, 1, 1, 1, 1))), "5 dimensions", id="dims"
    ),
    pytest.param(_kv_file(tensors=1, tail=_tensor("t", (4,), kind=77)), "type 77", id="type"),
    pytest.param(
        _kv_file(tensors=1, tail=_tensor("t", (1 << 62, 1 << 10))), "elements", id="elements"
    ),
    pytest.param(
        _kv_file(tensors=1, tail=_tensor("t", (1 << 30,))), "past the end", id="data-past-end"
    ),
    pytest.param(
        _kv_file(tensors=2, tail=_tensor("t", (1,)) + _tensor("t", (1,)) + bytes(64)),
        "appears twice",
        id="dup-tensor",
    ),
    pytest.param(
        _kv_file(_kv("general.alignment", 4, struct.pack("<I", 0))),
        "alignment",
        id="alignment",
    ),
    pytest.param(b"GGUF" + struct.pack("<III", 1, 0, 0), "version 1", id="v1"),
]


@pytest.mark.parametrize(("content", "match"), HOSTILE)
def test_hostile_headers_are_refused_at_once(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(content)
    began = time.perf_counter()
    with pytest.raises(ModelFileError, match=match) as info:
        read_gguf(path)
    assert time.perf_counter() - began < READ_TIME_LIMIT
    assert "\n" not in str(info.value)


def test_every_truncation_and_corruption_is_a_model_file_error(tmp_path: Path) -> None:
    whole = _rich_model(tmp_path / "rich.gguf").read_bytes()
    header = read_gguf(tmp_path / "rich.gguf")
    end_of_header = header.data_offset
    end_of_data = end_of_header + max(t.offset + t.n_bytes for t in header.tensors)
    cut = tmp_path / "cut.gguf"
    # Every cut in the first kilobyte (the small values), then a stride through the long array.
    for size in [*range(1024), *range(1024, end_of_data, 101)]:
        cut.write_bytes(whole[:size])
        with pytest.raises(ModelFileError):
            read_gguf(cut)
    rng = random.Random(13)  # noqa: S311 - reproducible damage, not cryptography
    damaged = tmp_path / "damaged.gguf"
    for _ in range(300):
        data = bytearray(whole)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(24, end_of_header)] = rng.randrange(256)
        damaged.write_bytes(bytes(data))
        with contextlib.suppress(ModelFileError):  # a damaged value may still parse
            read_gguf(damaged)


def test_arrays_and_strings_are_skipped_not_built(tmp_path: Path) -> None:
    # A vocabulary-sized string array costs a pass over lengths, not 100k Python strings.
    path = tmp_path / "vocab.gguf"
    count = 100_000
    strings = b"".join(_str(f"tok{i}") for i in range(count))
    path.write_bytes(_kv_file(_kv("tokenizer.ggml.tokens", 9, _array(8, count, strings))))
    assert read_gguf(path).metadata["tokenizer.ggml.tokens"] == GgufArray(8, count)


def test_a_header_larger_than_the_bound_is_refused_without_reading_it(tmp_path: Path) -> None:
    # A sparse file: an array string claims 300 MiB, which the file does hold (as zeros).
    path = tmp_path / "sparse.gguf"
    huge = 300 << 20
    path.write_bytes(_kv_file(_kv("k", 9, _array(8, 2, struct.pack("<Q", huge)))))
    with path.open("r+b") as fh:
        fh.truncate(huge + (64 << 20))
    began = time.perf_counter()
    with pytest.raises(ModelFileError, match=f"larger than {MAX_HEADER_BYTES >> 20} MiB"):
        read_gguf(path)
    assert time.perf_counter() - began < READ_TIME_LIMIT


# -- total work: counts times sizes, not each field alone ---------------------------------------


def _timed_refusal(path: Path, match: str) -> float:
    began = time.perf_counter()
    with pytest.raises(ModelFileError, match=match) as info:
        read_gguf(path)
    elapsed = time.perf_counter() - began
    assert "\n" not in str(info.value)
    return elapsed


def test_many_small_tensors_are_bounded_in_total(tmp_path: Path) -> None:
    # Each tensor is tiny and the count is under the per-field bound; together they would
    # cost seconds of Python.
    count = 200_000
    body = b"".join(_tensor(f"t{i}", (1,)) for i in range(count))
    path = tmp_path / "tensors.gguf"
    path.write_bytes(_kv_file(tensors=count, tail=body + bytes(64)))
    assert _timed_refusal(path, "too much work") < READ_TIME_LIMIT


def test_many_string_arrays_are_bounded_in_total(tmp_path: Path) -> None:
    # 64 arrays of 64k empty strings: each array is far inside MAX_ARRAY_LENGTH.
    arrays = [_kv(f"k{i}", 9, _array(8, 1 << 16, bytes(8 << 16))) for i in range(64)]
    path = tmp_path / "strings.gguf"
    path.write_bytes(_kv_file(*arrays))
    assert _timed_refusal(path, "too much work") < READ_TIME_LIMIT


def test_short_numeric_arrays_are_not_all_built(tmp_path: Path) -> None:
    # 2,048 keys of 4,096 u8 each (8 MiB): read inline one by one they make 8M Python ints.
    keys = 2048
    arrays = [
        _kv(f"k{i}", 9, _array(0, INLINE_ARRAY_MAX, bytes(INLINE_ARRAY_MAX))) for i in range(keys)
    ]
    path = tmp_path / "inline.gguf"
    path.write_bytes(_kv_file(*arrays))
    began = time.perf_counter()
    metadata = read_gguf(path).metadata
    assert time.perf_counter() - began < READ_TIME_LIMIT
    built = sum(len(v) for v in metadata.values() if isinstance(v, tuple))
    assert built <= MAX_INLINE_ITEMS
    assert metadata[f"k{keys - 1}"] == GgufArray(0, INLINE_ARRAY_MAX)
