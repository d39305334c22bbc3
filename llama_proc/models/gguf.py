"""Check that a model file is GGUF before llama-server is spawned.

llama-server reports a missing or foreign model file only after it has started, bound its port
and tried to load it; reading the 24-byte header here turns that into an immediate, clear
:class:`~llama_proc.errors.ModelFileError`.

Header layout (``ggml/include/gguf.h``), little-endian on every common platform::

    magic "GGUF" (4 bytes) | version u32 | tensor count u64 | metadata key/value count u64

Version 1 files used u32 counts; they are still recognised.

:func:`read_gguf` reads the rest of the header: the metadata key/values and the tensor
descriptions, stopping where the tensor data starts. ``gguf``'s ``GGUFReader`` builds a numpy
view of every metadata value and so spends 2-4 s on the 49k-entry vocabulary of a 135M model;
stepping over arrays by their byte lengths takes a few milliseconds (``bench/gguf_read.py``).
Every count and length is bounded, and so is the work of a whole read (counts times sizes,
across the parts of a split model: :class:`ReadBudget`), so a hostile file costs neither memory
nor time: any header is read or refused in well under 0.5 s.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, BinaryIO, Final, NoReturn

from llama_proc._text import printable
from llama_proc.errors import ModelFileError
from llama_proc.models.ggml_types import FILE_TYPES, GGML_TYPES, GgmlType
from llama_proc.models.gguf_header import _HEADER, GGUF_MAGIC, GgufHeader, check_gguf

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "FILE_TYPES",
    "GGML_TYPES",
    "GGUF_MAGIC",
    "GgmlType",
    "GgufArray",
    "GgufFile",
    "GgufHeader",
    "GgufTensor",
    "MetadataValue",
    "ReadBudget",
    "check_gguf",
    "read_gguf",
]


# GGUF metadata value types (``enum gguf_type``).
_STRING: Final = 8
_ARRAY: Final = 9
_SCALAR_FORMATS: Final[Mapping[int, str]] = MappingProxyType(
    {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
)

# Bounds that keep a hostile or corrupt header from costing GBs of memory or minutes of CPU.
# Real models are far inside them: ~50 metadata keys, a few thousand tensors, vocabularies and
# merge lists of a few 100k strings, chat templates of some 10 kB.
MAX_METADATA_COUNT: Final = 1 << 16
MAX_TENSOR_COUNT: Final = 1 << 20
MAX_KEY_LENGTH: Final = 1 << 16
MAX_STRING_LENGTH: Final = 1 << 24
MAX_ARRAY_LENGTH: Final = 1 << 24
MAX_ARRAY_DEPTH: Final = 4
MAX_WORK: Final = 1 << 20
"""Steps one read may take, all fields and all parts of a split model together: an array item
stepped over (a string, a nested array) is one step, a metadata entry :data:`KEY_STEPS`, a
tensor description :data:`TENSOR_STEPS`. A real model takes 0.1-0.6 M (its vocabulary and merge
list are most of it); the whole budget costs 0.2-0.4 s of Python on one core."""
KEY_STEPS: Final = 16
TENSOR_STEPS: Final = 32
"""What a metadata entry and a tensor description cost next to one string stepped over
(measured: ~0.3 us per string, ~11 us per tensor description)."""
MAX_INLINE_ITEMS: Final = 1 << 16
"""Numbers read into tuples, all arrays together (real: per-layer counts, a few thousand);
further short arrays are stepped over like long ones."""
MAX_DIMS: Final = 4
"""``GGML_MAX_DIMS``."""
INLINE_ARRAY_MAX: Final = 4096
"""Numeric arrays up to this length are read (per-layer counts); longer ones are skipped."""
MAX_HEADER_BYTES: Final = 1 << 28
"""Metadata and tensor descriptions together (real ones: 1-20 MiB, mostly the tokenizer)."""
READ_CHUNK: Final = 1 << 20
DEFAULT_ALIGNMENT: Final = 32
"""``GGUF_DEFAULT_ALIGNMENT``: where tensor data starts when ``general.alignment`` is absent."""
_MAX_ELEMENTS: Final = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class GgufArray:
    """A metadata array that was stepped over, not read (tokenizer tokens, scores, merges)."""

    item_type: int
    """The GGUF value type of its items (8 = string, 9 = array, else a number type)."""
    length: int


MetadataValue = int | float | bool | str | tuple[int | float | bool, ...] | GgufArray
"""A metadata value: a scalar, a short numeric array as a tuple, or a skipped array."""


@dataclass(frozen=True, slots=True)
class GgufTensor:
    """One tensor's description from the header (its data is not read)."""

    name: str
    shape: tuple[int, ...]
    """Dimensions as GGUF stores them (innermost first)."""
    ggml_type: int
    """A key of :data:`GGML_TYPES`."""
    offset: int
    """Where its data starts, relative to :attr:`GgufFile.data_offset`."""

    @property
    def type_name(self) -> str:
        """The ggml name of its type (``Q4_K``, ``F16``...)."""
        return GGML_TYPES[self.ggml_type].name

    @property
    def n_elements(self) -> int:
        """Elements it holds."""
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        """Bytes its data takes in the file and, loaded, in memory."""
        kind = GGML_TYPES[self.ggml_type]
        return self.n_elements * kind.type_size // kind.block_size


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file's header, metadata and tensor descriptions."""

    header: GgufHeader
    metadata: Mapping[str, MetadataValue]
    tensors: tuple[GgufTensor, ...]
    data_offset: int
    """Where the tensor data section starts in the file."""


class ReadBudget:
    """The work left to one read: :data:`MAX_WORK` steps and :data:`MAX_INLINE_ITEMS` numbers.

    Pass one budget to :func:`read_gguf` for every part of a split model so the parts share it.
    """

    def __init__(self, steps: int = MAX_WORK, inline_items: int = MAX_INLINE_ITEMS) -> None:
        self.steps = steps
        self.inline_items = inline_items


def read_gguf(path: str | os.PathLike[str], *, budget: ReadBudget | None = None) -> GgufFile:
    """Read a GGUF file's metadata and tensor descriptions without loading its data.

    String arrays and long numeric arrays (the tokenizer's vocabulary, scores and merges) are
    stepped over by their byte lengths and come back as :class:`GgufArray`; every count and
    length is checked against the file's size and the ``MAX_*`` bounds first.

    Args:
        path: the model file (GGUF version 2 or 3, either byte order).
        budget: the work this read may take; None = a fresh :class:`ReadBudget`.

    Returns:
        The header, the metadata by key and the tensors in file order.

    Raises:
        ModelFileError: the file is missing or not GGUF (see :func:`check_gguf`), is GGUF
            version 1, is truncated, or its header is corrupt or exceeds a bound.
    """
    header = check_gguf(path)
    if header.version == 1:
        msg = (
            f"{printable(str(header.path))} is a GGUF version 1 file, which llama.cpp no longer loads; "
            "convert the model again with a current convert_hf_to_gguf.py"
        )
        raise ModelFileError(msg)
    try:
        with header.path.open("rb") as fh:
            return _Parser(fh, header, budget or ReadBudget()).parse()
    except OSError as err:
        msg = f"cannot read model file {printable(str(header.path))}: {err.strerror or err}"
        raise ModelFileError(msg) from None


class _Parser:
    """Reads one file's header; every read is checked against the end of the file."""

    # Plain reads, not mmap: a file truncated in place while it is mapped would kill the whole
    # process with SIGBUS. The header is read from the start in growing chunks.
    def __init__(self, fh: BinaryIO, header: GgufHeader, budget: ReadBudget) -> None:
        self._fh = fh
        self._buf = bytearray()
        self._header = header
        self._shown = printable(str(header.path))
        self._end = os.fstat(fh.fileno()).st_size
        self._pos = _HEADER.size
        self._budget = budget
        order = "<" if header.byte_order == "little" else ">"
        self._order = order
        self._u32 = struct.Struct(order + "I")
        self._u64 = struct.Struct(order + "Q")
        self._scalars = {k: struct.Struct(order + f) for k, f in _SCALAR_FORMATS.items()}

    def parse(self) -> GgufFile:
        header = self._header
        self._bound("metadata", header.metadata_count, MAX_METADATA_COUNT, 12)
        self._bound("tensors", header.tensor_count, MAX_TENSOR_COUNT, 24)
        metadata: dict[str, MetadataValue] = {}
        for _ in range(header.metadata_count):
            self._spend(KEY_STEPS)
            key = self._string(MAX_KEY_LENGTH, "metadata key")
            if key in metadata:
                self._corrupt(f"metadata key {key!r} appears twice")
            metadata[key] = self._value(self._u32_at(), 0)
        tensors: list[GgufTensor] = []
        names: set[str] = set()
        for _ in range(header.tensor_count):
            self._spend(TENSOR_STEPS)
            tensor = self._tensor()
            if tensor.name in names:
                self._corrupt(f"tensor {tensor.name!r} appears twice")
            names.add(tensor.name)
            tensors.append(tensor)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
            self._corrupt(f"general.alignment {alignment!r} is not a positive integer")
        data_offset = -(-self._pos // alignment) * alignment
        for tensor in tensors:
            if data_offset + tensor.offset + tensor.n_bytes > self._end:
                self._truncated(f"the data of tensor {tensor.name!r} ends past the end of the file")
        return GgufFile(header, MappingProxyType(metadata), tuple(tensors), data_offset)

    # -- primitives
    def _load(self, stop: int) -> None:
        """Make the buffer hold the file's bytes up to ``stop``."""
        have = len(self._buf)
        if stop <= have:
            return
        if stop > self._end:
            self._truncated("the header ends past the end of the file")
        if stop > MAX_HEADER_BYTES:
            self._corrupt(f"a header larger than {MAX_HEADER_BYTES >> 20} MiB")
        want = min(max(stop, 2 * have, READ_CHUNK), self._end, MAX_HEADER_BYTES)
        self._fh.seek(have)
        more = self._fh.read(want - have)
        if len(more) < stop - have:
            self._truncated("the file got shorter while it was read")
        self._buf += more

    def _take(self, size: int) -> int:
        start = self._pos
        if size > self._end - start:
            self._truncated("the header ends past the end of the file")
        self._load(start + size)
        self._pos = start + size
        return start

    def _u32_at(self) -> int:
        value: int = self._u32.unpack_from(self._buf, self._take(4))[0]
        return value

    def _u64_at(self) -> int:
        value: int = self._u64.unpack_from(self._buf, self._take(8))[0]
        return value

    def _string(self, limit: int, what: str) -> str:
        length = self._u64_at()
        if length > limit:
            self._corrupt(f"a {what} of {length} bytes (at most {limit} accepted)")
        start = self._take(length)
        return self._buf[start : start + length].decode("utf-8", "replace")

    def _value(self, kind: int, depth: int) -> MetadataValue:
        scalar = self._scalars.get(kind)
        if scalar is not None:
            value: int | float | bool = scalar.unpack_from(self._buf, self._take(scalar.size))[0]
            return value
        if kind == _STRING:
            return self._string(MAX_STRING_LENGTH, "metadata string")
        if kind != _ARRAY:
            self._corrupt(f"unknown metadata value type {kind}")
        return self._array(depth)

    def _array(self, depth: int) -> MetadataValue:
        if depth >= MAX_ARRAY_DEPTH:
            self._corrupt(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
        kind = self._u32_at()
        length = self._u64_at()
        if length > MAX_ARRAY_LENGTH:
            self._corrupt(f"an array of {length} items (at most {MAX_ARRAY_LENGTH} accepted)")
        scalar = self._scalars.get(kind)
        if scalar is not None:
            start = self._take(scalar.size * length)
            budget = self._budget
            if length > INLINE_ARRAY_MAX or length > budget.inline_items:
                return GgufArray(kind, length)
            budget.inline_items -= length
            fmt = f"{self._order}{length}{_SCALAR_FORMATS[kind]}"
            return tuple(struct.unpack_from(fmt, self._buf, start))
        if kind not in (_STRING, _ARRAY):
            self._corrupt(f"unknown array item type {kind}")
        # A string takes 8 bytes at least, a nested array 12: a count the file cannot hold is
        # refused before any step is spent on it.
        if length * (8 if kind == _STRING else 12) > self._end - self._pos:
            self._truncated("an array ends past the end of the file")
        self._spend(length)
        if kind == _ARRAY:
            for _ in range(length):
                self._array(depth + 1)
        else:
            self._skip_strings(length)
        return GgufArray(kind, length)

    def _skip_strings(self, count: int) -> None:
        # The hot loop of a header read (a vocabulary is 30k-260k strings): locals only.
        # The buffer grows in place (a bytearray), so ``buf`` stays valid after _load.
        buf, pos, end, unpack = self._buf, self._pos, self._end, self._u64.unpack_from
        for _ in range(count):
            if pos + 8 > len(buf):
                if pos + 8 > end:
                    break
                self._load(pos + 8)
            pos += 8 + unpack(buf, pos)[0]
        else:
            if pos <= end:
                self._pos = pos
                return
        self._truncated("a string array ends past the end of the file")

    def _tensor(self) -> GgufTensor:
        name = self._string(MAX_KEY_LENGTH, "tensor name")
        n_dims = self._u32_at()
        if n_dims > MAX_DIMS:
            self._corrupt(f"tensor {name!r} has {n_dims} dimensions (ggml has at most {MAX_DIMS})")
        shape = tuple(self._u64_at() for _ in range(n_dims))
        kind = self._u32_at()
        offset = self._u64_at()
        if kind not in GGML_TYPES:
            msg = (
                f"{self._shown}: tensor {name!r} has ggml type {kind}, which this reader "
                "does not know; update llama-proc, or the file is corrupt"
            )
            raise ModelFileError(msg)
        if math.prod(shape) > _MAX_ELEMENTS:
            self._corrupt(f"tensor {name!r} has more elements than ggml can address")
        return GgufTensor(name, shape, kind, offset)

    def _spend(self, steps: int) -> None:
        budget = self._budget
        budget.steps -= steps
        if budget.steps < 0:
            self._corrupt(
                f"too much work to read (more than {MAX_WORK} steps: entries, tensors and array "
                "items together)"
            )

    def _bound(self, what: str, count: int, limit: int, least_bytes: int) -> None:
        # Each entry takes some bytes at least: a count the file cannot hold is corrupt.
        if count > limit or count * least_bytes > self._end - self._pos:
            self._corrupt(f"{count} {what} entries")

    def _corrupt(self, detail: str) -> NoReturn:
        msg = f"{self._shown} has a corrupt GGUF header: {detail}; the file is not usable"
        raise ModelFileError(msg)

    def _truncated(self, detail: str) -> NoReturn:
        msg = f"{self._shown} is truncated ({self._end} bytes): {detail}; download it again"
        raise ModelFileError(msg)
