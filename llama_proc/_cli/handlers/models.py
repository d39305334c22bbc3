"""``llama-proc pull | inspect``: models by name and what a GGUF file holds."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._cli.common import settings_from_args
from llama_proc._text import printable
from llama_proc.errors import ModelFileError
from llama_proc.models import hub
from llama_proc.models.gguf_info import (
    MemoryEstimate,
    ModelInfo,
    estimate_memory,
    read_model_info,
)
from llama_proc.models.hub import ModelFiles, ModelRef

if TYPE_CHECKING:
    import argparse

    from llama_proc.config import Settings

_MIB: Final = 1 << 20
_GIB: Final = 1 << 30


def _fetch(
    text: str, settings: Settings, *, revision: str | None = None, mmproj: bool = False
) -> Any:
    """The local files of a path or reference; the model is fetched when it is a reference."""
    ref = ModelRef.parse(text)
    if ref is None:
        path = Path(text).expanduser()
        if revision is not None or mmproj:
            flag = "--revision" if revision is not None else "--mmproj"
            msg = f"{text} is a local path, not a Hugging Face reference; {flag} needs org/repo"
            raise ModelFileError(msg)
        if not path.is_file():
            msg = (
                f"{text} is neither a model file nor a Hugging Face reference; pass a .gguf "
                "path or org/repo[:QUANT]"
            )
            raise ModelFileError(msg)
        return ModelFiles(model=path.resolve())
    if revision is not None:
        ref = dataclasses.replace(ref, revision=revision)
    return hub.fetch_model(ref, settings=settings, with_mmproj=mmproj)


def pull(args: argparse.Namespace) -> int:
    quiet = args.quiet or args.pull_quiet
    settings = settings_from_args(args, progress=False if quiet else None)
    files = _fetch(args.ref, settings, revision=args.revision, mmproj=args.mmproj)
    if len(files.parts) > 1 and not quiet:
        _err(f"  split model: {len(files.parts)} parts in {files.model.parent}")
    if args.mmproj and files.mmproj is None and not quiet:
        _err(f"  {args.ref} has no multimodal projector (mmproj-*.gguf)")
    print(files.model)
    if files.mmproj is not None:
        print(files.mmproj)
    return 0


def inspect(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    files = _fetch(args.model, settings)
    info = read_model_info(files.model)
    estimate = estimate_memory(info, args.ctx_size, args.parallel, args.cache_type)
    if args.json:
        print(json.dumps({**info.to_dict(), "memory": estimate.to_dict()}, indent=2))
        return 0
    for line in _info_lines(info, estimate):
        print(printable(line))  # the model's name and path may hold terminal escapes
    return 0


def _info_lines(info: ModelInfo, est: MemoryEstimate) -> list[str]:
    heads = "?" if info.n_head is None else str(info.n_head)
    kv = sorted(set(info.n_head_kv))
    kv_text = "/".join(map(str, kv)) if kv else "?"
    label = (
        f" ({info.parameter_count:,}; labelled {info.size_label})"
        if info.size_label
        else (f" ({info.parameter_count:,})")
    )
    parts = f" in {len(info.parts)} parts" if len(info.parts) > 1 else ""
    lines = [
        f"model: {info.path}",
        f"  name: {info.name or '?'}",
        f"  architecture: {info.architecture}",
        f"  parameters: {_count(info.parameter_count)}{label}",
        f"  layers: {info.n_layer}",
        f"  trained context: {info.context_length or '?'}",
        f"  embedding: {info.embedding_length or '?'}",
        f"  attention heads: {heads}; KV heads: {kv_text}",
        f"  head size: key {info.key_length or '?'}, value {info.value_length or '?'}",
        f"  quantization: {info.quantization or '?'}",
        f"  vocabulary: {info.vocab_size or '?'}",
    ]
    if info.sliding_window:
        lines.append(f"  sliding window: {info.sliding_window}")
    if info.expert_count:
        lines.append(f"  experts: {info.expert_count}")
    lines += [
        f"  file size: {_bytes(info.file_size)}{parts} (tensors {_bytes(info.tensor_bytes)})",
        (
            f"memory to serve it (CPU llama-server, ctx {est.ctx_size}, {est.n_parallel} "
            f"slot(s), {est.kv_type} KV cache): about {_bytes(est.total)}"
        ),
        (
            f"  weights {_bytes(est.weights)} + KV cache {_bytes(est.kv_cache)} + slots "
            f"{_bytes(est.slots)} + overhead {_bytes(est.overhead)}"
        ),
    ]
    return lines


def _count(n: int) -> str:
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB else f"{n / _MIB:.1f} MiB"


def _err(line: str) -> None:
    print(printable(line), file=sys.stderr)
