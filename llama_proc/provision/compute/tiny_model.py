"""The compute check's model: a tiny llama written by llama-proc itself, no download.

Sizes are chosen so that llama.cpp's CPU backend takes its special paths: every weight matrix
has rows that are multiples of 32 and 8, so the AMX kernels (Sapphire Rapids and later) and the
repacked ``q4_0_8x8`` / ``q4_K_8x8`` kernels (AVX2, Arm i8mm) claim them; the feed-forward
input of 256 admits a Q4_K ``ffn_down``; grouped-query attention (4 heads over 2 KV heads) and
a prompt longer than 32 tokens take the batched path. Two layers spread F16, Q4_0, Q4_1, Q8_0
and Q4_K over the projections, and the token embedding is Q8_0 (a quantized ``get_rows``).

The weights are random codes from a fixed seed (:mod:`.quants`), so the same bytes are written
every time and :mod:`.reference` can decode them exactly. :func:`write_gguf` writes GGUF v3.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

from llama_proc.provision.compute.quants import QuantType, encode_random_row, row_bytes

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Tensor", "TinyModel", "make_tiny_model", "write_gguf"]

SEED: Final = 11434
N_VOCAB: Final = 64
N_EMBD: Final = 64
N_FF: Final = 256
N_HEAD: Final = 4
N_HEAD_KV: Final = 2
N_LAYER: Final = 2
N_CTX_TRAIN: Final = 256
RMS_EPS: Final = 1e-5
ROPE_BASE: Final = 10000.0
SPECIAL_TOKENS: Final = ("<unk>", "<s>", "</s>", "<0x0A>")
"""Token ids 0-3; the rest are plain words ``▁w4`` ... ``▁w63``."""
FIRST_WORD: Final = len(SPECIAL_TOKENS)
_ALIGNMENT: Final = 32
_GGUF_VERSION: Final = 3
_LAYER_TYPES: Final = (
    {  # layer 0
        "attn_q": QuantType.Q8_0,
        "attn_k": QuantType.Q4_0,
        "attn_v": QuantType.Q4_1,
        "attn_output": QuantType.F16,
        "ffn_gate": QuantType.Q4_0,
        "ffn_up": QuantType.Q4_1,
        "ffn_down": QuantType.Q4_K,
    },
    {  # layer 1
        "attn_q": QuantType.Q4_0,
        "attn_k": QuantType.Q8_0,
        "attn_v": QuantType.F16,
        "attn_output": QuantType.Q4_1,
        "ffn_gate": QuantType.Q8_0,
        "ffn_up": QuantType.F16,
        "ffn_down": QuantType.Q4_K,
    },
)
# GGUF metadata value types (``enum gguf_type``).
_U32: Final = 4
_I32: Final = 5
_F32: Final = 6
_BOOL: Final = 7
_STRING: Final = 8
_ARRAY: Final = 9
_TOKEN_NORMAL: Final = 1
_TOKEN_UNKNOWN: Final = 2
_TOKEN_CONTROL: Final = 3
_TOKEN_BYTE: Final = 6


@dataclass(frozen=True)
class Tensor:
    """One tensor: ``cols`` elements per row (GGUF's ``ne[0]``), ``rows`` rows, raw data."""

    name: str
    kind: QuantType
    cols: int
    rows: int
    data: bytes

    @property
    def row_size(self) -> int:
        """Bytes per row."""
        return row_bytes(self.kind, self.cols)


@dataclass(frozen=True)
class TinyModel:
    """The model: its shape and its tensors by name."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    n_vocab: int = N_VOCAB
    n_embd: int = N_EMBD
    n_ff: int = N_FF
    n_head: int = N_HEAD
    n_head_kv: int = N_HEAD_KV
    n_layer: int = N_LAYER
    rms_eps: float = RMS_EPS
    rope_base: float = ROPE_BASE

    @property
    def head_dim(self) -> int:
        """Elements per attention head."""
        return self.n_embd // self.n_head

    @property
    def type_names(self) -> list[str]:
        """The tensor types present, for records (``["F16", "F32", "Q4_0", ...]``)."""
        return sorted({t.kind.name for t in self.tensors.values()})


def _matrix(
    name: str, kind: QuantType, cols: int, rows: int, sigma: float, rng: random.Random
) -> Tensor:
    data = b"".join(encode_random_row(kind, cols, sigma, rng) for _ in range(rows))
    return Tensor(name, kind, cols, rows, data)


def _norm(name: str, n: int, rng: random.Random) -> Tensor:
    values = [1.0 + rng.uniform(-0.2, 0.2) for _ in range(n)]
    return Tensor(name, QuantType.F32, n, 1, struct.pack(f"<{n}f", *values))


def make_tiny_model(seed: int = SEED) -> TinyModel:
    """The check's model, the same bytes for the same seed."""
    rng = random.Random(seed)  # noqa: S311  fixed weights, not a secret
    kv = N_HEAD_KV * (N_EMBD // N_HEAD)
    tensors = [
        _matrix("token_embd.weight", QuantType.Q8_0, N_EMBD, N_VOCAB, 1.0, rng),
        _norm("output_norm.weight", N_EMBD, rng),
        _matrix("output.weight", QuantType.Q8_0, N_EMBD, N_VOCAB, 3.0 / N_EMBD**0.5, rng),
    ]
    for i, types in enumerate(_LAYER_TYPES):
        inv = 1.0 / N_EMBD**0.5
        tensors += [
            _norm(f"blk.{i}.attn_norm.weight", N_EMBD, rng),
            _matrix(f"blk.{i}.attn_q.weight", types["attn_q"], N_EMBD, N_EMBD, inv, rng),
            _matrix(f"blk.{i}.attn_k.weight", types["attn_k"], N_EMBD, kv, inv, rng),
            _matrix(f"blk.{i}.attn_v.weight", types["attn_v"], N_EMBD, kv, inv, rng),
            _matrix(f"blk.{i}.attn_output.weight", types["attn_output"], N_EMBD, N_EMBD, inv, rng),
            _norm(f"blk.{i}.ffn_norm.weight", N_EMBD, rng),
            _matrix(f"blk.{i}.ffn_gate.weight", types["ffn_gate"], N_EMBD, N_FF, inv, rng),
            _matrix(f"blk.{i}.ffn_up.weight", types["ffn_up"], N_EMBD, N_FF, inv, rng),
            _matrix(
                f"blk.{i}.ffn_down.weight", types["ffn_down"], N_FF, N_EMBD, 1 / N_FF**0.5, rng
            ),
        ]
    return TinyModel(tensors={t.name: t for t in tensors})


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, kind: int, value: object) -> bytes:
    head = _string(key) + struct.pack("<I", kind)
    if kind == _STRING:
        return head + _string(str(value))
    if kind == _ARRAY:
        item_kind, items = cast("tuple[int, list[Any]]", value)
        body = struct.pack("<IQ", item_kind, len(items))
        if item_kind == _STRING:
            return head + body + b"".join(_string(s) for s in items)
        fmt = {_F32: "f", _I32: "i"}[item_kind]
        return head + body + struct.pack(f"<{len(items)}{fmt}", *items)
    fmt = {_U32: "<I", _F32: "<f", _BOOL: "<?"}[kind]
    return head + struct.pack(fmt, value)


def _metadata(model: TinyModel) -> list[bytes]:
    tokens = list(SPECIAL_TOKENS) + [f"\u2581w{i}" for i in range(FIRST_WORD, model.n_vocab)]
    types = [_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_CONTROL, _TOKEN_BYTE]
    types += [_TOKEN_NORMAL] * (model.n_vocab - FIRST_WORD)
    return [
        _kv("general.architecture", _STRING, "llama"),
        _kv("general.name", _STRING, "llama-proc compute check"),
        _kv("general.alignment", _U32, _ALIGNMENT),
        _kv("llama.context_length", _U32, N_CTX_TRAIN),
        _kv("llama.embedding_length", _U32, model.n_embd),
        _kv("llama.block_count", _U32, model.n_layer),
        _kv("llama.feed_forward_length", _U32, model.n_ff),
        _kv("llama.attention.head_count", _U32, model.n_head),
        _kv("llama.attention.head_count_kv", _U32, model.n_head_kv),
        _kv("llama.attention.layer_norm_rms_epsilon", _F32, model.rms_eps),
        _kv("llama.rope.freq_base", _F32, model.rope_base),
        _kv("llama.rope.dimension_count", _U32, model.head_dim),
        _kv("llama.vocab_size", _U32, model.n_vocab),
        _kv("tokenizer.ggml.model", _STRING, "llama"),
        _kv("tokenizer.ggml.tokens", _ARRAY, (_STRING, tokens)),
        _kv("tokenizer.ggml.scores", _ARRAY, (_F32, [-float(i) for i in range(model.n_vocab)])),
        _kv("tokenizer.ggml.token_type", _ARRAY, (_I32, types)),
        _kv("tokenizer.ggml.unknown_token_id", _U32, 0),
        _kv("tokenizer.ggml.bos_token_id", _U32, 1),
        _kv("tokenizer.ggml.eos_token_id", _U32, 2),
        _kv("tokenizer.ggml.add_bos_token", _BOOL, value=False),
        _kv("tokenizer.ggml.add_eos_token", _BOOL, value=False),
    ]


def _pad(size: int) -> int:
    return (-size) % _ALIGNMENT


def write_gguf(model: TinyModel, path: Path) -> Path:
    """Write ``model`` as a GGUF v3 file at ``path`` (replaced if present)."""
    kvs = _metadata(model)
    tensors = list(model.tensors.values())
    header = struct.pack("<4sIQQ", b"GGUF", _GGUF_VERSION, len(tensors), len(kvs)) + b"".join(kvs)
    infos = bytearray()
    offset = 0
    for t in tensors:
        dims = (t.cols,) if t.rows == 1 else (t.cols, t.rows)
        infos += _string(t.name) + struct.pack("<I", len(dims))
        infos += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", int(t.kind), offset)
        offset += len(t.data) + _pad(len(t.data))
    head = header + bytes(infos)
    with path.open("wb") as f:
        f.write(head + b"\0" * _pad(len(head)))
        for t in tensors:
            f.write(t.data + b"\0" * _pad(len(t.data)))
    return path
