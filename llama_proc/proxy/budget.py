"""The pool's memory budget: what a server is expected to use, and how much RAM there is.

:func:`estimate_server_memory` reads the model's GGUF header once per file identity and
applies the server's context size, slots and KV cache types; :func:`parse_memory_budget`
reads ``--memory-budget`` (a size, a share of RAM, or none).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ConfigError, InvalidArgumentError, ModelFileError
from llama_proc.models.gguf_info import cached_model_info, estimate_memory
from llama_proc.proxy.device_budget import HOST, placement_from_args, split_claim
from llama_proc.runtime.args import ServerArgs

if TYPE_CHECKING:
    from pathlib import Path

    from llama_proc.models.gguf_info import MemoryEstimate as ModelMemory
    from llama_proc.models.gguf_info import ModelInfo
    from llama_proc.proxy.device_budget import DeviceMemory
    from llama_proc.proxy.models_config import ModelSpec

__all__ = [
    "estimate_server_claims",
    "estimate_server_memory",
    "parse_memory_budget",
    "total_memory",
]

logger = logging.getLogger(__name__)

MEMORY_WEIGHT_FACTOR: Final = 1.2
MEMORY_OVERHEAD: Final = 256 * 1024 * 1024
"""Estimate when a model's header cannot be read: model files x factor + this."""
AUTO_PARALLEL: Final = 4
"""Slots llama-server runs with when ``--parallel`` is not given (its ``-np -1``, auto)."""
_ESTIMATE_OPTIONS: Final = frozenset({"ctx_size", "parallel", "cache_type_k", "cache_type_v"})
DEFAULT_MEMORY_SHARE: Final = 0.8
"""Share of RAM the pool's servers may use together when ``--memory-budget`` is not given."""
_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b?|b)?")
_SHARD_RE: Final = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")

MemoryEstimate = Callable[["ModelSpec", tuple[str, ...]], int]
"""Bytes a server for (model, flags) is expected to use; 0 = unknown."""


def estimate_server_claims(
    spec: ModelSpec,
    flags: tuple[str, ...],
    gpus: Sequence[DeviceMemory],
    host_estimate: MemoryEstimate | None = None,
    *,
    fit: bool = False,
) -> dict[str, int]:
    """Bytes a server for ``spec`` with ``flags`` is expected to hold per device.

    The GGUF header's estimate (as :func:`estimate_server_memory`) split over ``gpus`` by the
    server's placement flags (:func:`~llama_proc.proxy.device_budget.split_claim`), from the
    config's options, its ``extra_args`` and the request's flags. The host keeps what
    ``host_estimate`` (default :func:`estimate_server_memory`; ``serve`` adds the prompt
    cache) counts beyond what went to the GPUs. Where the header cannot be read, all of it
    is claimed on the host. ``fit``: the binary has ``--fit`` (see ``split_claim``).
    """
    host_total = (host_estimate or estimate_server_memory)(spec, flags)
    path = spec.path
    if path is None or not gpus:
        return {HOST: host_total}
    try:
        info, estimate = _header_estimate(spec, path, flags)
    except (ModelFileError, InvalidArgumentError, ValueError):
        return {HOST: host_total}
    placement = placement_from_args(_placement_words(spec, flags))
    claim = split_claim(estimate, info.n_layer, placement, gpus, fit=fit)
    on_gpus = sum(size for name, size in claim.items() if name != HOST)
    claim[HOST] = max(0, host_total - on_gpus)
    return claim


def _header_estimate(
    spec: ModelSpec, path: Path, flags: Sequence[str]
) -> tuple[ModelInfo, ModelMemory]:
    """The model's header and the server's estimate from it.

    The context size, slots and KV cache type it gets (see :func:`estimate_server_memory`);
    the larger cache type counts when K and V differ.

    Raises:
        ModelFileError: the header cannot be read.
        InvalidArgumentError: an option is out of range.
        ValueError: an option is not a number.
    """
    chosen = _estimate_options(spec, flags)
    info = cached_model_info(path)
    ctx = int(chosen.get("ctx_size", 0))
    parallel = int(chosen.get("parallel", -1))
    slots = AUTO_PARALLEL if parallel < 1 else parallel
    kv_types = {str(chosen.get(k, "f16")) for k in ("cache_type_k", "cache_type_v")}
    estimate = max((estimate_memory(info, ctx, slots, kv) for kv in kv_types),
                   key=lambda e: e.total)  # fmt: skip
    return info, estimate


def _placement_words(spec: ModelSpec, flags: Sequence[str]) -> list[str]:
    """The placement options of the config as flags, then its extra args and the request's."""
    words: list[str] = []
    options = spec.options
    if options.get("n_gpu_layers") is not None:
        words += ["-ngl", str(options["n_gpu_layers"])]
    if options.get("tensor_split"):
        words += ["-ts", ",".join(str(v) for v in options["tensor_split"])]
    if options.get("device"):
        words += ["-dev", str(options["device"])]
    return [*words, *options.get("extra_args", ()), *spec.extra_args, *flags]


def estimate_server_memory(spec: ModelSpec, flags: tuple[str, ...] = ()) -> int:
    """Bytes a llama-server for ``spec`` with ``flags`` is expected to use.

    :func:`~llama_proc.models.gguf_info.estimate_memory` (weights, KV cache, slots, process
    overhead) for the model's header, read once per file identity, and the context size,
    slots and KV cache type the server gets: the config's options, then its ``extra_args``,
    then the request's flags, the last one winning. Unset, they are llama-server's defaults:
    the trained context, :data:`AUTO_PARALLEL` slots, f16. When the K and V cache types
    differ, the larger one counts for both (an upper bound).

    When the header cannot be read (a ggml type newer than this reader, say), the files' size
    times :data:`MEMORY_WEIGHT_FACTOR` plus :data:`MEMORY_OVERHEAD`; 0 when the file is missing
    or not fetched yet (the start reports that).
    """
    path = spec.path
    if path is None:  # a Hugging Face reference not fetched yet: size unknown
        return 0
    try:
        return _header_estimate(spec, path, flags)[1].total
    except (ModelFileError, InvalidArgumentError, ValueError) as err:
        logger.debug("memory estimate of %s from its file size: %s", spec.id, err)
    try:
        match = _SHARD_RE.search(path.name)
        if match is None:
            size = path.stat().st_size
        else:
            stem = path.name[: match.start()]
            count = int(match.group(2))
            size = sum(
                (path.parent / f"{stem}-{i:05d}-of-{count:05d}.gguf").stat().st_size
                for i in range(1, count + 1)
            )
    except (OSError, AttributeError, TypeError):
        return 0
    return int(size * MEMORY_WEIGHT_FACTOR) + MEMORY_OVERHEAD


@functools.cache
def _estimate_spellings() -> Mapping[str, str]:
    """Every spelling of the flags the memory estimate reads -> the ServerArgs field name."""
    return {
        flag: f.name
        for f in dataclasses.fields(ServerArgs)
        if f.name in _ESTIMATE_OPTIONS
        for flag in f.metadata["flags"]
    }


def _estimate_options(spec: ModelSpec, flags: Sequence[str]) -> dict[str, Any]:
    chosen = {k: v for k, v in spec.options.items() if k in _ESTIMATE_OPTIONS and v is not None}
    spellings = _estimate_spellings()
    words = [*spec.options.get("extra_args", ()), *spec.extra_args, *flags]
    for i, word in enumerate(words):
        name, eq, value = word.partition("=")
        field = spellings.get(name)
        if field is not None and (eq or i + 1 < len(words)):
            chosen[field] = value if eq else words[i + 1]
    return chosen


def total_memory() -> int | None:
    """Physical memory of this host in bytes (None where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def parse_memory_budget(text: str | None, total: int | None = None) -> int | None:
    """The pool's memory budget from ``--memory-budget`` (bytes).

    Args:
        text: ``"12G"``, ``"512M"``, ``"2048"`` (bytes), ``"75%"`` (of RAM), ``"none"``
            (no budget); None = :data:`DEFAULT_MEMORY_SHARE` of RAM.
        total: RAM in bytes (default: this host's, read now).

    Raises:
        ConfigError: the text is not a size, or a share of RAM is asked where RAM is unknown.
    """
    value = (text or f"{DEFAULT_MEMORY_SHARE * 100:g}%").strip().lower()
    if value in ("none", "off", "0"):
        return None
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        msg = f"--memory-budget {text!r} is not a size: use e.g. 12G, 512M, 75% (of RAM) or none"
        raise ConfigError(msg)
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        ram = total if total is not None else total_memory()
        if ram is None:
            msg = "cannot read this host's memory size: give --memory-budget in bytes (e.g. 12G)"
            raise ConfigError(msg)
        budget = int(ram * number / 100)
    else:
        budget = int(number * 1024 ** "bkmgt".index(unit[0] if unit else "b"))
    if budget < 1:
        msg = f"--memory-budget {text!r} must be more than 0 bytes (or none)"
        raise ConfigError(msg)
    return budget
