"""Tiny llama-shaped GGUF models written with ``gguf``'s own writer, for fast header tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from gguf import GGUFWriter, LlamaFileType

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["write_model"]


def write_model(
    path: Path,
    *,
    layers: int = 4,
    heads: int = 8,
    kv_heads: int | list[int] = 2,
    embedding: int = 64,
    context: int = 1024,
    key_length: int | None = None,
    file_type: int | None = int(LlamaFileType.MOSTLY_F16),
    vocab: int = 100,
    split_max_tensors: int = 0,
    name: str = "tiny test model",
) -> Path:
    """A tiny llama-shaped GGUF: metadata as given, one f16 and one f32 tensor per layer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(embedding)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_vocab_size(vocab)
    if key_length is not None:
        writer.add_key_length(key_length)
        writer.add_value_length(key_length)
    if file_type is not None:
        writer.add_file_type(file_type)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((embedding, embedding), np.float16))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.zeros(embedding, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
