"""Server-wide hard caps on llama-server flags, from any source (:class:`FlagCaps`).

Threads, HTTP threads, parallel slots, batch sizes and context size x slots are bounded for the
models config (options and ``extra_args``, checked when it is loaded) and for each request
merged with its model's config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from llama_proc.errors import InvalidArgumentError
from llama_proc.proxy.threads import usable_cpus

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "CAPPED",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_CONTEXT_TOKENS",
    "DEFAULT_MAX_PARALLEL",
    "FlagCaps",
]

DEFAULT_MAX_PARALLEL: Final = 16
"""Default cap on parallel slots (``-np``) from any source."""
DEFAULT_MAX_BATCH: Final = 8192
"""Default cap on the logical and physical batch sizes (``-b``, ``-ub``)."""
DEFAULT_MAX_CONTEXT_TOKENS: Final = 131072
"""Default cap on context size x parallel slots: the KV cache's size in tokens."""
MIN_HTTP_THREADS_CAP: Final = 4
"""The default HTTP-thread cap is the CPU count, but never below this."""
CAPPED: Final = (
    "threads",
    "threads_batch",
    "threads_http",
    "parallel",
    "batch_size",
    "ubatch_size",
    "ctx_size",
)
"""ServerArgs fields the server-wide caps bound."""


@dataclass(frozen=True, kw_only=True)
class FlagCaps:
    """Hard limits on what any source of flags may ask of the host.

    They bound the models config (typed options and ``extra_args``) and every request merged
    with its model's config. ``-1`` ("auto") stays allowed: llama.cpp then picks a value the
    host can take.

    Attributes:
        max_threads: most generation or batch threads (``-t``, ``-tb``); default: CPUs usable.
        max_threads_http: most HTTP threads (``--threads-http``); default: CPUs, at least 4.
        max_parallel: most parallel slots (``-np``).
        max_batch: largest logical and physical batch (``-b``, ``-ub``).
        max_context_tokens: largest context size x parallel slots (when the context size is
            set; ``0`` or unset leaves it to the model file).
    """

    max_threads: int = field(default_factory=usable_cpus)
    max_threads_http: int = field(default_factory=lambda: max(MIN_HTTP_THREADS_CAP, usable_cpus()))
    max_parallel: int = DEFAULT_MAX_PARALLEL
    max_batch: int = DEFAULT_MAX_BATCH
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{f.name}={value!r} must be a whole number of at least 1"
                raise InvalidArgumentError(msg)

    def limit(self, option: str) -> tuple[int, str] | None:
        """The cap on a ServerArgs field (``threads``, ``parallel``, ...) and its ``serve`` flag.

        ``ctx_size`` is bounded together with ``parallel`` (:meth:`check`), alone by
        ``max_context_tokens``.
        """
        limits = {
            "threads": (self.max_threads, "--max-threads"),
            "threads_batch": (self.max_threads, "--max-threads"),
            "threads_http": (self.max_threads_http, "--max-threads-http"),
            "parallel": (self.max_parallel, "--max-parallel"),
            "batch_size": (self.max_batch, "--max-batch"),
            "ubatch_size": (self.max_batch, "--max-batch"),
            "ctx_size": (self.max_context_tokens, "--max-context-tokens"),
        }
        return limits.get(option)

    def check(self, values: Mapping[str, int]) -> None:
        """Check effective option values (ServerArgs field names) against the caps.

        Raises:
            InvalidArgumentError: a value is above its cap, or context size x slots is.
        """
        for option, value in values.items():
            limit = self.limit(option)
            if option != "ctx_size" and limit is not None and value > limit[0]:
                msg = f"{option}={value} is above the server-wide cap of {limit[0]} (serve {limit[1]})"
                raise InvalidArgumentError(msg)
        ctx = values.get("ctx_size", 0)
        slots = max(values.get("parallel", 1), 1)
        if ctx > 0 and ctx * slots > self.max_context_tokens:
            msg = (
                f"context size x parallel slots = {ctx} x {slots} = {ctx * slots} tokens is above "
                f"the server-wide cap of {self.max_context_tokens} (serve --max-context-tokens)"
            )
            raise InvalidArgumentError(msg)
