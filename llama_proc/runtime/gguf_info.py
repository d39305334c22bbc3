"""What a GGUF model's header says, and how much memory llama-server needs to serve it.

:func:`read_model_info` reads the header with the ``gguf`` package (llama.cpp's own reader):
architecture, parameter count, layers, trained context, quantization, attention and KV heads,
head sizes, and the bytes of its tensors. ``gguf`` pulls in numpy and parses every metadata
value (the tokenizer's vocabulary too: about 2 s for a 49k-token vocabulary on a slow core), so
it is imported only when a header is read.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import InvalidArgumentError, ModelFileError
from llama_proc.runtime.gguf import check_gguf

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

__all__ = [
    "ESTIMATE_ERROR_BOUND",
    "KV_CACHE_TYPES",
    "PROCESS_OVERHEAD",
    "SLOT_STATE_BYTES",
    "MemoryEstimate",
    "ModelInfo",
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
    check_gguf(model)
    reader = _reader(model)
    fields = _Fields(reader, model)
    arch = fields.string("general.architecture")
    if not arch:
        msg = f"{model} names no general.architecture; it is not a llama.cpp model file"
        raise ModelFileError(msg)
    parts = _parts(model, fields.integer("split.count"))
    tensors = list(reader.tensors)
    for part in parts[1:]:
        check_gguf(part)
        tensors.extend(_reader(part).tensors)
    n_layer = fields.integer(f"{arch}.block_count") or 0
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
        parameter_count=sum(int(t.n_elements) for t in tensors),
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
        tensor_bytes=sum(int(t.n_bytes) for t in tensors),
        file_size=sum(p.stat().st_size for p in parts),
        parts=parts,
    )


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
        msg = f"{info.path} names no trained context length; pass ctx_size"
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
def _reader(path: Path) -> Any:
    # numpy and gguf take ~0.2 s to import: only when a header is actually read.
    from gguf import GGUFReader  # noqa: PLC0415 - heavy optional reader (numpy)

    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OSError) as err:
        msg = f"cannot read the GGUF header of {path}: {err}; the file may be truncated or corrupt"
        raise ModelFileError(msg) from err


class _Fields:
    """Typed access to a reader's metadata values."""

    def __init__(self, reader: Any, path: Path) -> None:
        self._fields = reader.fields
        self._path = path

    def _value(self, key: str) -> Any:
        field = self._fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except (ValueError, IndexError) as err:
            msg = f"{self._path}: metadata {key} cannot be read ({err}); the file may be corrupt"
            raise ModelFileError(msg) from err

    def string(self, key: str) -> str | None:
        value = self._value(key)
        return value if isinstance(value, str) and value else None

    def integer(self, key: str) -> int | None:
        value = self._value(key)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    def per_layer(self, key: str, n_layer: int) -> tuple[int, ...]:
        """A count that is one number for every layer, or an array with one per layer."""
        value = self._value(key)
        if isinstance(value, list):
            return tuple(int(v) for v in value)
        if isinstance(value, int) and not isinstance(value, bool):
            return (int(value),) * n_layer
        return ()

    def length(self, key: str) -> int | None:
        field = self._fields.get(key)
        return len(field.data) if field is not None and field.data else None


def _parts(model: Path, count: int | None) -> tuple[Path, ...]:
    match = _SPLIT_RE.search(model.name)
    if not count or count <= 1 or match is None:
        return (model,)
    stem = model.name[: match.start()]
    parts = tuple(
        model.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    )
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        msg = (
            f"{model} is part of a split model of {count} files but {', '.join(missing)} "
            f"is missing beside it; fetch every part"
        )
        raise ModelFileError(msg)
    return parts


def _quantization(file_type: int | None, tensors: Sequence[Any]) -> str | None:
    from gguf import GGMLQuantizationType, LlamaFileType  # noqa: PLC0415 - see _reader

    if file_type is not None:
        try:
            name = LlamaFileType(file_type).name
        except ValueError:
            return f"file type {file_type}"
        if name != "GUESSED":
            return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    by_type: dict[str, int] = {}
    for tensor in tensors:
        kind = GGMLQuantizationType(int(tensor.tensor_type)).name
        by_type[kind] = by_type.get(kind, 0) + int(tensor.n_bytes)
    return max(by_type, key=by_type.__getitem__) if by_type else None


def _bytes_per_element(kv_type: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: PLC0415 - see _reader

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kv_type.upper()]]
    return size / block
