"""CPU threads for pooled servers: the cores are split between the servers that run at once.

llama-server takes every core by default; two busy servers on the same cores then fight over
them (64 clients waited 119-131 s p50 on 2 cores). ``serve`` gives each server
``cores // max_servers`` threads unless a model's config (or a request's flags) names a
thread count itself.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from llama_proc.runtime.args import ServerArgs

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = ["names_threads", "split_threads", "usable_cpus", "with_threads"]


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask where there is one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def split_threads(cpus: int, servers: int) -> int | None:
    """Threads for each of ``servers`` llama-servers sharing ``cpus`` cores.

    None for a single server (llama-server's own choice stands); otherwise an equal share,
    at least one thread.
    """
    if servers <= 1:
        return None
    return max(1, cpus // servers)


def _thread_flags() -> tuple[str, ...]:
    field = next(f for f in dataclasses.fields(ServerArgs) if f.name == "threads")
    flags: tuple[str, ...] = field.metadata["flags"]
    return flags


def names_threads(extra_args: Iterable[str]) -> bool:
    """Whether extra arguments set the thread count (``-t 4``, ``--threads=4``...)."""
    flags = _thread_flags()
    return any(arg in flags or arg.startswith(tuple(f"{f}=" for f in flags)) for arg in extra_args)


def with_threads(
    options: Mapping[str, Any], extra_args: Iterable[str], threads: int | None
) -> dict[str, Any]:
    """``options`` with ``threads`` added, unless unset or the options or arguments set it."""
    merged = dict(options)
    if threads is None or merged.get("threads") is not None or names_threads(extra_args):
        return merged
    merged["threads"] = threads
    return merged
