"""The prompt cache of pooled servers: bounded per server and counted in the memory budget.

llama-server keeps the KV state of past prompts in host memory for reuse, up to
``--cache-ram`` MiB per server (8 GiB by default at b11434). Distinct prompts grew one server
from 154 to 637 MiB against an estimate of 164 MiB, so a budget that ignores it is a budget in
name only. ``serve`` gives every pooled server ``--cache-ram`` :data:`POOLED_CACHE_RAM_MIB`
unless the model's config or the request's flags set it (the binary must know the flag), and
the pool's estimate of each server adds what its cache may hold (:func:`with_prompt_cache`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable

    from llama_proc.proxy.budget import MemoryEstimate
    from llama_proc.proxy.models_config import ModelSpec

__all__ = [
    "CACHE_RAM_FLAGS",
    "POOLED_CACHE_RAM_MIB",
    "cache_ram_mib",
    "prompt_cache_bytes",
    "with_cache_ram",
    "with_prompt_cache",
]

POOLED_CACHE_RAM_MIB: Final = 256
"""The prompt cache each pooled server may keep, in MiB, unless its config says otherwise."""
CACHE_RAM_FLAGS: Final = ("--cache-ram", "-cram")
UNLIMITED_COUNTS_AS_MIB: Final = 8192
"""What ``--cache-ram -1`` (no limit) is counted as: llama-server's own default limit."""
_MIB: Final = 1 << 20


def cache_ram_mib(extra_args: Iterable[str]) -> int | None:
    """The ``--cache-ram`` value the arguments give (the last one wins), or None."""
    args = list(extra_args)
    found: int | None = None
    for i, arg in enumerate(args):
        text: str | None = None
        if arg in CACHE_RAM_FLAGS and i + 1 < len(args):
            text = args[i + 1]
        else:
            for flag in CACHE_RAM_FLAGS:
                if arg.startswith(f"{flag}="):
                    text = arg[len(flag) + 1 :]
        if text is not None:
            try:
                found = int(text)
            except ValueError:
                continue  # llama-server refuses it itself; nothing to count
    return found


def with_cache_ram(
    extra_args: tuple[str, ...], mib: int | None, *, accepted: bool
) -> tuple[str, ...]:
    """``extra_args`` with ``--cache-ram mib`` added, unless unset, refused or already given."""
    if mib is None or not accepted or cache_ram_mib(extra_args) is not None:
        return extra_args
    return (*extra_args, CACHE_RAM_FLAGS[0], str(mib))


def prompt_cache_bytes(spec: ModelSpec, flags: tuple[str, ...], default_mib: int) -> int:
    """Bytes the prompt cache of a server for ``spec`` with ``flags`` may hold."""
    configured = spec.options.get("extra_args", ())
    given = cache_ram_mib((*configured, *spec.extra_args, *flags))
    mib = default_mib if given is None else given
    if mib < 0:
        mib = UNLIMITED_COUNTS_AS_MIB
    return mib * _MIB


def with_prompt_cache(estimate: MemoryEstimate, default_mib: int) -> MemoryEstimate:
    """``estimate`` plus what each server's prompt cache may hold."""

    def estimate_with_cache(spec: ModelSpec, flags: tuple[str, ...]) -> int:
        return estimate(spec, flags) + prompt_cache_bytes(spec, flags, default_mib)

    return estimate_with_cache
