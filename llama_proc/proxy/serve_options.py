"""Everything ``llama-proc serve`` is told: :class:`ServeOptions`, one field per flag.

Each field carries its flag, ``--help`` group and text, and its bound in its metadata, the way
:class:`~llama_proc.config.Settings` carries its environment variable: the command line is
made from the fields (:func:`add_serve_flags`), the values are checked once, when the options
are made, and the proxy's and the pool's settings are taken from them
(:mod:`llama_proc.proxy.options`). This module imports only the leaves, so ``llama-proc serve
--help`` stays fast and every proxy module may import it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llama_proc.errors import ConfigError
from llama_proc.proxy.key_env import ADMIN_KEYS_ENV, API_KEYS_ENV, read_api_keys
from llama_proc.proxy.serve_flags import (
    BODY_CAP_FLAGS,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_IDLE_TTL,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SERVERS,
    DEFAULT_MIN_RESIDENCY,
    DEFAULT_PORT,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_RESIDENCY_WAIT,
    OPTION_FLAGS,
    flag_dest,
    is_loopback,
)
from llama_proc.vocab import AUTO, EVENT_LOOPS

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator, Mapping
    from pathlib import Path

__all__ = ["ServeOptions"]


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """What ``serve`` was asked: network, keys, pool limits, timeouts and caps.

    A field left None takes the default its component documents (the caps' defaults live with
    :class:`~llama_proc.proxy.flag_policy.FlagCaps` and
    :class:`~llama_proc.proxy.body_policy.BodyCaps`). Every value is checked when the options
    are made.

    Raises:
        ConfigError: a value out of its bounds (the message names the flag).
    """

    host: str = field(default=DEFAULT_HOST, metadata=OPTION_FLAGS["host"])
    port: int = field(default=DEFAULT_PORT, metadata=OPTION_FLAGS["port"])
    allow_remote: bool = field(default=False, metadata=OPTION_FLAGS["allow_remote"])
    api_key_file: Path | None = field(default=None, metadata=OPTION_FLAGS["api_key_file"])
    admin_key_file: Path | None = field(default=None, metadata=OPTION_FLAGS["admin_key_file"])
    max_body_bytes: int | None = field(default=None, metadata=OPTION_FLAGS["max_body_bytes"])
    max_response_bytes: int | None = field(
        default=None, metadata=OPTION_FLAGS["max_response_bytes"]
    )
    max_requests_per_key: int | None = field(
        default=None, metadata=OPTION_FLAGS["max_requests_per_key"]
    )
    event_loop: str = field(default=AUTO, metadata=OPTION_FLAGS["event_loop"])
    max_servers: int = field(default=DEFAULT_MAX_SERVERS, metadata=OPTION_FLAGS["max_servers"])
    idle_ttl: float = field(default=DEFAULT_IDLE_TTL, metadata=OPTION_FLAGS["idle_ttl"])
    start_timeout: float | None = field(default=None, metadata=OPTION_FLAGS["start_timeout"])
    queue_timeout: float = field(
        default=DEFAULT_QUEUE_TIMEOUT, metadata=OPTION_FLAGS["queue_timeout"]
    )
    memory_budget: str | None = field(default=None, metadata=OPTION_FLAGS["memory_budget"])
    max_queue: int = field(default=DEFAULT_MAX_QUEUE, metadata=OPTION_FLAGS["max_queue"])
    min_residency: float = field(
        default=DEFAULT_MIN_RESIDENCY, metadata=OPTION_FLAGS["min_residency"]
    )
    residency_wait: float = field(
        default=DEFAULT_RESIDENCY_WAIT, metadata=OPTION_FLAGS["residency_wait"]
    )
    first_byte_timeout: float | None = field(
        default=None, metadata=OPTION_FLAGS["first_byte_timeout"]
    )
    stall_timeout: float | None = field(default=None, metadata=OPTION_FLAGS["stall_timeout"])
    drain_timeout: float = field(
        default=DEFAULT_DRAIN_TIMEOUT, metadata=OPTION_FLAGS["drain_timeout"]
    )
    max_threads: int | None = field(default=None, metadata=OPTION_FLAGS["max_threads"])
    max_threads_http: int | None = field(default=None, metadata=OPTION_FLAGS["max_threads_http"])
    max_parallel: int | None = field(default=None, metadata=OPTION_FLAGS["max_parallel"])
    max_batch: int | None = field(default=None, metadata=OPTION_FLAGS["max_batch"])
    max_context_tokens: int | None = field(
        default=None, metadata=OPTION_FLAGS["max_context_tokens"]
    )
    body_caps_given: Mapping[str, int] = field(default_factory=dict)
    """Request-body caps set by their flags (:data:`BODY_CAP_FLAGS`), by ``BodyCaps`` field."""

    def __post_init__(self) -> None:
        for f, flag, value in self._given():
            meta = f.metadata
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if meta["at_least"] is not None and value < meta["at_least"]:
                bound = meta["at_least"]
                msg = f"{flag} must be at least {bound:g}"
                if f.name == "idle_ttl":
                    msg = f"{flag} must be >= 0 (0 = never unload)"
                raise ConfigError(msg)
            if meta["above_zero"] and value <= 0:
                msg = f"{flag} must be a positive number"
                raise ConfigError(msg)
        if not 0 <= self.port <= 65535:
            msg = f"--port {self.port} is not a port number (0-65535)"
            raise ConfigError(msg)
        if self.event_loop not in EVENT_LOOPS:
            msg = f"--event-loop {self.event_loop!r}: choose one of {', '.join(EVENT_LOOPS)}"
            raise ConfigError(msg)
        if not self.allow_remote and not is_loopback(self.host):
            msg = (
                f"refusing to bind {self.host}: it is not a loopback address; pass "
                "--allow-remote (and set API keys) to serve other machines"
            )
            raise ConfigError(msg)
        for name in self.body_caps_given:
            if name not in BODY_CAP_FLAGS:
                msg = f"unknown request-body cap {name!r}; known: {', '.join(BODY_CAP_FLAGS)}"
                raise ConfigError(msg)

    def _given(self) -> Iterator[tuple[dataclasses.Field[Any], str, Any]]:
        for f in dataclasses.fields(self):
            if "flag" in f.metadata and getattr(self, f.name) is not None:
                yield f, f.metadata["flag"], getattr(self, f.name)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        """The options given on the command line (flags left out keep their defaults).

        Raises:
            ConfigError: a value out of its bounds.
        """
        given = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(cls)
            if "flag" in f.metadata and getattr(args, f.name, None) is not None
        }
        bodies = {
            name: getattr(args, flag_dest(flag))
            for name, (flag, _) in BODY_CAP_FLAGS.items()
            if getattr(args, flag_dest(flag), None) is not None
        }
        return cls(**given, body_caps_given=bodies)

    def api_keys(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(inference keys, admin keys) from the key files and the environment.

        Raises:
            ConfigError: a key file cannot be read.
        """
        return (
            read_api_keys(self.api_key_file, os.environ.get(API_KEYS_ENV)),
            read_api_keys(self.admin_key_file, os.environ.get(ADMIN_KEYS_ENV), "--admin-key-file"),
        )

    def given(self) -> dict[str, Any]:
        """The fields set to something other than None, by name."""
        return {f.name: v for f, _, v in self._given()}
