"""What a GGUF model's header says, and how much memory llama-server needs to serve it.

:func:`read_model_info` reads the header (:func:`~llama_proc.models.gguf.read_gguf`):
architecture, parameter count, layers, trained context, quantization, attention and KV heads,
head sizes, and the bytes of its tensors. The ``gguf`` package (llama.cpp's own reader) parses
every metadata value, the tokenizer's vocabulary too: 2-4 s for SmolLM2-135M's 49k tokens,
where our reader steps over arrays and takes about 10 ms (``bench/gguf_read.py``). The tests
check that both readers give the same :class:`ModelInfo`.

:func:`estimate_memory` adds up what a CPU llama-server holds once it serves the model:

* the weights: the bytes of every tensor (memory-mapped, so counted in RSS once touched);
* the KV cache: ``ctx_size * sum over layers of n_kv_heads * (key_length + value_length)``
  elements of ``kv_type`` (``2 * n_layer * ctx * n_kv_heads * head_dim`` when the layers are
  alike). llama-server shares ``--ctx-size`` among its ``--parallel`` slots, so slots do not
  multiply it;
* per slot, the float32 logits of one token (``n_vocab * 4`` bytes) and the slot's state;
* a measured constant for the process itself (binary, libraries, compute buffers, HTTP threads).

Measured on the b11434 CPU build with SmolLM2-135M Q4_1 (see ``tests/runtime/test_gguf_info.py``,
which checks the bound against the real server's RSS): the estimate is within
:data:`ESTIMATE_ERROR_BOUND` of VmRSS at ctx 512, 2048 and 8192, both idle and after a prompt
that fills most of the context. Models with sliding-window attention get a full-size KV cache
here (an upper bound); larger models have larger compute buffers than the constant allows for.
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._text import printable
from llama_proc.errors import InvalidArgumentError, ModelFileError
from llama_proc.models.ggml_types import FILE_TYPES, GGML_TYPES
from llama_proc.models.gguf import GgufArray, ReadBudget, read_gguf
from llama_proc.vocab import MAX_SPLIT_PARTS

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence

    from llama_proc.models.gguf import GgufTensor, MetadataValue

__all__ = [
    "ESTIMATE_ERROR_BOUND",
    "INFO_CACHE_SIZE",
    "KV_CACHE_TYPES",
    "PROCESS_OVERHEAD",
    "SLOT_STATE_BYTES",
    "MemoryEstimate",
    "ModelInfo",
    "cached_model_info",
    "estimate_memory",
    "read_model_info",
]

_MIB: Final = 1 << 20
PROCESS_OVERHEAD: Final = 48 * _MIB
"""What a serving llama-server holds beside weights, KV cache and slots: binary and libraries
(~15 MiB mapped), compute and output buffers, threads. Measured: 37 MiB idle and 42-55 MiB after
a prompt filling most of the context (b11434 CPU build, SmolLM2-135M, ctx 512-8192)."""
SLOT_STATE_BYTES: Final = 64 * 1024
"""Per slot beside its logits (measured: 8 slots add 1.9 MiB, 16 add 4.3 MiB to 49k logits)."""
LOGIT_BYTES: Final = 4
"""A float32 logit per vocabulary entry, one token per slot."""
ESTIMATE_ERROR_BOUND: Final = 0.10
"""The largest relative error against the real RSS that the tests accept."""
KV_CACHE_TYPES: Final = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
"""What llama-server's ``--cache-type-k``/``--cache-type-v`` accept."""

MAX_LAYERS: Final = 512
"""``LLAMA_MAX_LAYERS``: llama.cpp loads no model with more blocks."""
MAX_COUNT: Final = (1 << 32) - 1
"""Head counts, lengths and context sizes are uint32 in llama.cpp."""
INFO_CACHE_SIZE: Final = 64
"""Models :func:`cached_model_info` remembers (least recently read ones are dropped first)."""
_CACHE: Final[dict[Path, tuple[tuple[tuple[int, int], ...] | None, ModelInfo]]] = {}
_CACHE_LOCK: Final = threading.Lock()
_SPLIT_RE: Final = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What a GGUF model's header says (None where the header does not say)."""

    path: Path
    """The file read (the first part of a split model)."""
    architecture: str
    """``general.architecture`` (``llama``, ``qwen3``, ...)."""
    name: str | None
    """``general.name``."""
    size_label: str | None
    """``general.size_label`` as the publisher wrote it (``135M``, ``8x7B``)."""
    parameter_count: int
    """Elements of every tensor, all parts together."""
    n_layer: int
    """``{arch}.block_count``."""
    context_length: int | None
    """The context the model was trained for (``{arch}.context_length``)."""
    embedding_length: int | None
    n_head: int | None
    """Attention (query) heads; the largest when layers differ."""
    n_head_kv: tuple[int, ...]
    """KV heads of each layer (0 for layers without attention, e.g. recurrent ones)."""
    key_length: int | None
    """Size of one key head (``attention.key_length``, else ``embedding_length / n_head``)."""
    value_length: int | None
    """Size of one value head (``attention.value_length``, else as :attr:`key_length`)."""
    vocab_size: int | None
    quantization: str | None
    """The file type (``Q4_K_M``, ``F16``...), else the type most tensor bytes have."""
    sliding_window: int | None
    expert_count: int | None
    tensor_bytes: int
    """Bytes of every tensor, all parts together: the weights llama-server loads."""
    file_size: int
    """Bytes of every part on disk."""
    parts: tuple[Path, ...]
    """Every file of the model, in order (one for an unsplit model)."""

    @property
    def kv_heads(self) -> int:
        """The most KV heads any layer has (0 when none is known)."""
        return max(self.n_head_kv, default=0)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (paths as strings)."""
        out = asdict(self)
        out["path"] = str(self.path)
        out["parts"] = [str(p) for p in self.parts]
        out["n_head_kv"] = list(self.n_head_kv)
        return out


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes llama-server needs to serve a model (see the module docstring for each part)."""

    weights: int
    kv_cache: int
    slots: int
    overhead: int
    ctx_size: int
    n_parallel: int
    kv_type: str

    @property
    def total(self) -> int:
        """Everything together."""
        return self.weights + self.kv_cache + self.slots + self.overhead

    def to_dict(self) -> dict[str, Any]:
        """The parts and the total, JSON-ready."""
        return {**asdict(self), "total": self.total}


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Read a GGUF model's header; the other parts of a split model are read for their tensors.

    Args:
        path: the model file (the first part, ``*-00001-of-0000N.gguf``, of a split model).

    Returns:
        What the header says.

    Raises:
        ModelFileError: the file (or a part of a split model) is missing, is not GGUF, or its
            header cannot be parsed or names no architecture.
    """
    model = Path(path).expanduser()
    budget = ReadBudget()  # shared by every part: the whole read is bounded, not each file
    header = read_gguf(model, budget=budget)
    fields = _Fields(model, header.metadata)
    arch = fields.string("general.architecture")
    if not arch:
        msg = f"{printable(str(model))} names no general.architecture; it is not a llama.cpp model file"
        raise ModelFileError(msg)
    parts = _parts(model, fields.integer("split.count"))
    tensors = list(header.tensors)
    for part in parts[1:]:
        tensors.extend(read_gguf(part, budget=budget).tensors)
    n_layer = fields.integer(f"{arch}.block_count") or 0
    if n_layer > MAX_LAYERS:
        msg = (
            f"{printable(str(model))} claims {n_layer} layers; llama.cpp loads at most {MAX_LAYERS}: the header "
            "is corrupt or hostile"
        )
        raise ModelFileError(msg)
    n_head = fields.per_layer(f"{arch}.attention.head_count", n_layer)
    n_head_kv = fields.per_layer(f"{arch}.attention.head_count_kv", n_layer) or n_head
    embedding = fields.integer(f"{arch}.embedding_length")
    head_max = max(n_head, default=0)
    key_length = fields.integer(f"{arch}.attention.key_length") or (
        embedding // head_max if embedding and head_max else None
    )
    value_length = fields.integer(f"{arch}.attention.value_length") or key_length
    return ModelInfo(
        path=model,
        architecture=arch,
        name=fields.string("general.name"),
        size_label=fields.string("general.size_label"),
        parameter_count=sum(t.n_elements for t in tensors),
        n_layer=n_layer,
        context_length=fields.integer(f"{arch}.context_length"),
        embedding_length=embedding,
        n_head=head_max or None,
        n_head_kv=n_head_kv,
        key_length=key_length,
        value_length=value_length,
        vocab_size=fields.integer(f"{arch}.vocab_size") or fields.length("tokenizer.ggml.tokens"),
        quantization=_quantization(fields.integer("general.file_type"), tensors),
        sliding_window=fields.integer(f"{arch}.attention.sliding_window"),
        expert_count=fields.integer(f"{arch}.expert_count"),
        tensor_bytes=sum(t.n_bytes for t in tensors),
        file_size=sum(p.stat().st_size for p in parts),
        parts=parts,
    )


def cached_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """:func:`read_model_info`, remembered while every part keeps its size and mtime.

    For callers that ask about the same models again and again (the proxy's memory budget).

    Args:
        path: as for :func:`read_model_info`.

    Returns:
        What the header says.

    Raises:
        ModelFileError: as :func:`read_model_info`.
    """
    model = Path(path).expanduser().absolute()
    with _CACHE_LOCK:
        cached = _CACHE.get(model)
    if cached is not None and cached[0] == _identities(cached[1].parts):
        return cached[1]
    info = read_model_info(model)
    identities = _identities(info.parts)
    with _CACHE_LOCK:
        _CACHE.pop(model, None)
        _CACHE[model] = (identities, info)
        while len(_CACHE) > INFO_CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
    return info


def estimate_memory(
    info: ModelInfo,
    ctx_size: int | None = None,
    n_parallel: int = 1,
    kv_type: str = "f16",
) -> MemoryEstimate:
    """Estimate the memory a CPU llama-server needs to serve ``info``'s model.

    Args:
        info: from :func:`read_model_info`.
        ctx_size: ``--ctx-size`` (all slots together); None or 0 = the trained context, as
            llama-server's ``-c 0``.
        n_parallel: ``--parallel`` slots.
        kv_type: ``--cache-type-k``/``-v`` (one of :data:`KV_CACHE_TYPES`).

    Returns:
        The parts and their total, in bytes.

    Raises:
        InvalidArgumentError: an unknown ``kv_type``, fewer than one slot, a negative context,
            or no context given for a model whose header names none.
    """
    kv = kv_type.lower()
    if kv not in KV_CACHE_TYPES:
        msg = f"unknown KV cache type {kv_type!r}; use one of {', '.join(KV_CACHE_TYPES)}"
        raise InvalidArgumentError(msg)
    if n_parallel < 1:
        msg = f"n_parallel must be at least 1, not {n_parallel}"
        raise InvalidArgumentError(msg)
    if ctx_size is not None and ctx_size < 0:
        msg = f"ctx_size must be 0 (the trained context) or more, not {ctx_size}"
        raise InvalidArgumentError(msg)
    ctx = ctx_size or info.context_length
    if not ctx:
        msg = f"{printable(str(info.path))} names no trained context length; pass ctx_size"
        raise InvalidArgumentError(msg)
    head_elements = (info.key_length or 0) + (info.value_length or 0)
    kv_elements = ctx * sum(info.n_head_kv) * head_elements
    per_slot = (info.vocab_size or 0) * LOGIT_BYTES + SLOT_STATE_BYTES
    return MemoryEstimate(
        weights=info.tensor_bytes,
        kv_cache=round(kv_elements * _bytes_per_element(kv)),
        slots=n_parallel * per_slot,
        overhead=PROCESS_OVERHEAD,
        ctx_size=ctx,
        n_parallel=n_parallel,
        kv_type=kv,
    )


# ----------------------------------------------------------------------------- reading
class _Fields:
    """Typed access to a header's metadata values."""

    def __init__(self, path: Path, metadata: Mapping[str, MetadataValue]) -> None:
        self._path = path
        self._metadata = metadata

    def _count(self, key: str, value: int) -> int:
        if not 0 <= value <= MAX_COUNT:
            msg = (
                f"{printable(str(self._path))} has {key} = {value}, not a count llama.cpp accepts "
                f"(0 to {MAX_COUNT}): the header is corrupt or hostile"
            )
            raise ModelFileError(msg)
        return value

    def string(self, key: str) -> str | None:
        value = self._metadata.get(key)
        return value if isinstance(value, str) and value else None

    def integer(self, key: str) -> int | None:
        value = self._metadata.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return self._count(key, value)
        return None

    def per_layer(self, key: str, n_layer: int) -> tuple[int, ...]:
        """A count that is one number for every layer, or an array with one per layer."""
        value = self._metadata.get(key)
        if isinstance(value, tuple):
            return tuple(self._count(key, int(v)) for v in value)
        if isinstance(value, int) and not isinstance(value, bool):
            return (self._count(key, value),) * n_layer
        return ()

    def length(self, key: str) -> int | None:
        value = self._metadata.get(key)
        if isinstance(value, GgufArray):
            return value.length or None
        if isinstance(value, tuple):
            return len(value) or None
        return None


def _identities(parts: Sequence[Path]) -> tuple[tuple[int, int], ...] | None:
    """Size and mtime of each part (None when one cannot be read: then nothing matches)."""
    try:
        stats = [p.stat() for p in parts]
    except OSError:
        return None
    return tuple((st.st_size, st.st_mtime_ns) for st in stats)


def _parts(model: Path, count: int | None) -> tuple[Path, ...]:
    match = _SPLIT_RE.search(model.name)
    if not count or count <= 1 or match is None:
        return (model,)
    if count > MAX_SPLIT_PARTS:
        msg = (
            f"{printable(str(model))} claims to be one of {count} parts; llama-proc reads at most "
            f"{MAX_SPLIT_PARTS}: the header is corrupt or hostile"
        )
        raise ModelFileError(msg)
    stem = model.name[: match.start()]
    parts = tuple(
        model.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    )
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        msg = (
            f"{printable(str(model))} is part of a split model of {count} files but {shown} "
            f"is missing beside it; fetch every part"
        )
        raise ModelFileError(msg)
    return parts


def _quantization(file_type: int | None, tensors: Sequence[GgufTensor]) -> str | None:
    if file_type is not None:
        name = FILE_TYPES.get(file_type)
        if name is None:
            return f"file type {file_type}"
        if name != "GUESSED":
            return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    by_type: dict[str, int] = {}
    for tensor in tensors:
        by_type[tensor.type_name] = by_type.get(tensor.type_name, 0) + tensor.n_bytes
    return max(by_type, key=by_type.__getitem__) if by_type else None


def _bytes_per_element(kv_type: str) -> float:
    kind = next(t for t in GGML_TYPES.values() if t.name == kv_type.upper())
    return kind.type_size / kind.block_size
