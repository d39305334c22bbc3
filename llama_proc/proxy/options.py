"""How the proxy treats requests: :class:`ProxyOptions` and its defaults.

Also what ``serve``'s options make of it and of the pool, and the event loop to serve on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ConfigError, InvalidArgumentError
from llama_proc.proxy.body_policy import BodyCaps
from llama_proc.proxy.budget import parse_memory_budget
from llama_proc.proxy.flag_caps import FlagCaps
from llama_proc.proxy.serve_flags import BODY_CAP_FLAGS, DEFAULT_DRAIN_TIMEOUT
from llama_proc.vocab import AUTO, EVENT_LOOPS

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from llama_proc.proxy.serve_options import ServeOptions

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_FIRST_BYTE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_STALL_TIMEOUT",
    "MIN_REQUESTS_PER_KEY",
    "ProxyOptions",
    "body_caps_of",
    "event_loop_factory",
    "flag_caps_of",
    "pool_limits_of",
    "proxy_options_of",
]

DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
"""Largest non-streamed answer the proxy buffers and relays (502 above it)."""
DEFAULT_FIRST_BYTE_TIMEOUT: Final = 600.0
"""Seconds until llama-server's first response byte; for a non-streamed answer, the whole
generation happens before it, so this is generous."""
DEFAULT_STALL_TIMEOUT: Final = 120.0
"""Seconds a started stream may go without a byte before it is cut off."""

DEFAULT_IDLE_TIMEOUT: Final = 15.0
"""Seconds a connection may sit without a complete request head (idle keep-alive, or headers
trickled in) before it is closed."""
DEFAULT_BODY_TIMEOUT: Final = 60.0
"""Seconds an authenticated client gets to send its request body."""
DEFAULT_MAX_CONNECTIONS: Final = 256
MIN_REQUESTS_PER_KEY: Final = 4
"""The least a key may have in flight when the share is taken from ``max_connections``."""
"""Open client connections at once; beyond it the oldest idle one is closed, or the new one
refused when none is idle."""


@dataclass(frozen=True, kw_only=True)
class ProxyOptions:
    """How the proxy treats requests.

    Keys are sent as ``Authorization: Bearer <key>`` or ``X-Api-Key``. With no key of either
    kind the proxy needs none (every client is an admin: meant for loopback use); with any
    key, every route but ``/health`` needs one, and ``/servers`` needs an admin key.

    Attributes:
        api_keys: inference keys: the OpenAI routes, ``/v1/models`` and ``/metrics``.
        admin_keys: admin keys: everything inference keys may do, plus ``GET /servers``
            (every tenant's flags) and ``DELETE /servers/{key}``.
        max_body_bytes: largest request body accepted (413 above it).
        first_byte_timeout: seconds until llama-server's first response byte (504 after it).
        stall_timeout: seconds a started stream may go silent before it is cut off.
        drain_timeout: seconds in-flight requests get to finish at shutdown.
        idle_timeout: seconds a connection may go without a complete request head (idle
            keep-alive or trickled headers) before it is closed.
        body_timeout: seconds an authenticated client gets to send its body (408 after it).
        max_connections: client connections open at once; at the limit the oldest idle one
            is closed to make room, or the new one is refused (503) when none is idle.
        flag_caps: server-wide caps on threads, slots, batch and context size that every
            model's config and every request's ``X-Llama-Flags`` must keep.
        body_caps: server-wide caps on what a request body may ask (``n_probs``, grammar
            size...): see :mod:`llama_proc.proxy.body_policy`.
        max_response_bytes: largest non-streamed answer relayed; a bigger one is cut off
            (the upstream connection closed) and answered 502.
        max_requests_per_key: requests one inference key may have in flight at once, its
            body still arriving included (429 beyond); None = a quarter of
            ``max_connections``, at least 4. Admin keys are not limited.
    """

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    flag_caps: FlagCaps = field(default_factory=FlagCaps)
    body_caps: BodyCaps = field(default_factory=BodyCaps)
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_requests_per_key: int | None = None

    @property
    def per_key_limit(self) -> int:
        """The in-flight requests one inference key may have (:attr:`max_requests_per_key`)."""
        if self.max_requests_per_key is not None:
            return max(1, self.max_requests_per_key)
        return max(MIN_REQUESTS_PER_KEY, self.max_connections // 4)


def flag_caps_of(serve: ServeOptions) -> FlagCaps:
    """The server-wide caps on llama-server flags (defaults where no flag was given)."""
    names = {f.name for f in dataclasses.fields(FlagCaps)}
    return FlagCaps(**{n: v for n, v in serve.given().items() if n in names})


def body_caps_of(serve: ServeOptions) -> BodyCaps:
    """The request-body caps (defaults where no flag was given).

    Raises:
        ConfigError: a cap above its hard ceiling (the message names the flag).
    """
    try:
        return BodyCaps(**serve.body_caps_given)
    except InvalidArgumentError as err:
        flag = next((f for n, (f, _) in BODY_CAP_FLAGS.items() if str(err).startswith(n + "=")), "")
        msg = f"{flag}: {err}" if flag else str(err)
        raise ConfigError(msg) from None


def proxy_options_of(
    serve: ServeOptions, api_keys: tuple[str, ...] = (), admin_keys: tuple[str, ...] = ()
) -> ProxyOptions:
    """The proxy's request handling from ``serve``'s options and the given keys.

    Raises:
        ConfigError: a request-body cap above its hard ceiling.
    """
    defaults = ProxyOptions()
    return ProxyOptions(
        api_keys=api_keys,
        admin_keys=admin_keys,
        max_body_bytes=serve.max_body_bytes or defaults.max_body_bytes,
        first_byte_timeout=serve.first_byte_timeout or defaults.first_byte_timeout,
        stall_timeout=serve.stall_timeout or defaults.stall_timeout,
        drain_timeout=serve.drain_timeout,
        flag_caps=flag_caps_of(serve),
        body_caps=body_caps_of(serve),
        max_response_bytes=serve.max_response_bytes or defaults.max_response_bytes,
        max_requests_per_key=serve.max_requests_per_key,
    )


def pool_limits_of(serve: ServeOptions) -> dict[str, Any]:
    """The :class:`~llama_proc.proxy.pool.ServerPool` keyword arguments ``serve`` sets.

    Raises:
        ConfigError: ``--memory-budget`` is not a size.
    """
    return {
        "max_servers": serve.max_servers,
        "idle_ttl": serve.idle_ttl,
        "queue_timeout": serve.queue_timeout,
        "max_queue": serve.max_queue,
        "min_residency": serve.min_residency,
        "residency_wait": serve.residency_wait,
        "memory_budget": parse_memory_budget(serve.memory_budget),
    }


def event_loop_factory(
    choice: str = AUTO,
) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The event loop to serve on: (its name, a factory for ``asyncio.Runner``; None = asyncio's).

    ``auto`` takes uvloop where it is installed (a dependency everywhere but Windows) and
    asyncio's own loop otherwise. ``bench/proxy_overhead.py`` measures both in one run.

    Raises:
        ConfigError: ``uvloop`` was asked for and is not installed, or an unknown choice.
    """
    if choice not in EVENT_LOOPS:
        msg = f"unknown event loop {choice!r}; choose one of {', '.join(EVENT_LOOPS)}"
        raise ConfigError(msg)
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop  # noqa: PLC0415 - optional, and only wanted when serving
    except ImportError:
        if choice == "uvloop":
            msg = "uvloop is not installed: pip install 'llama-proc[fast]', or --event-loop asyncio"
            raise ConfigError(msg) from None
        return "asyncio", None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return "uvloop", factory
