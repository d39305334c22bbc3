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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ConfigError
from llama_proc.vocab import AUTO, EVENT_LOOPS

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator, Mapping

__all__ = [
    "ADMIN_KEYS_ENV",
    "API_KEYS_ENV",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_IDLE_TTL",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_SERVERS",
    "DEFAULT_PORT",
    "DEFAULT_QUEUE_TIMEOUT",
    "GROUPS",
    "ServeOptions",
    "add_serve_flags",
    "is_loopback",
    "read_api_keys",
]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000
DEFAULT_MAX_SERVERS: Final = 1
DEFAULT_IDLE_TTL: Final = 600.0
DEFAULT_QUEUE_TIMEOUT: Final = 600.0
DEFAULT_MAX_QUEUE: Final = 64
DEFAULT_DRAIN_TIMEOUT: Final = 30.0
"""Seconds in-flight requests get to finish at shutdown."""
API_KEYS_ENV: Final = "LLAMA_PROC_PROXY_API_KEYS"
"""Inference keys for ``serve``, comma-separated (beside ``--api-key-file``)."""
ADMIN_KEYS_ENV: Final = "LLAMA_PROC_PROXY_ADMIN_KEYS"
"""Admin keys for ``serve``, comma-separated (beside ``--admin-key-file``)."""

GROUPS: Final[Mapping[str, tuple[str, str | None]]] = {
    "net": ("network and security", None),
    "pool": ("server pool", None),
    "timeouts": ("request timeouts", None),
    "caps": (
        "server-wide caps",
        (
            "hard limits for every source of llama-server flags: the models config and each "
            "request's X-Llama-Flags (which a model's request_flags table must allow first)"
        ),
    ),
    "body": (
        "request-body caps",
        (
            "checked before a request is forwarded (over one: 400 naming the field); a model's "
            "request_body table may lower them, never raise them. Unknown top-level fields are "
            "refused unless that table allows them (fields = [...], unknown_fields = "
            '"strip" or "allow")'
        ),
    ),
}
"""Argument groups of ``serve --help``: key -> (title, description)."""


def _opt(
    flag: str,
    group: str,
    text: str,
    *,
    at_least: float | None = None,
    above_zero: bool = False,
    metavar: str | None = None,
) -> dict[str, Any]:
    return {
        "flag": flag,
        "group": group,
        "help": text,
        "at_least": at_least,
        "above_zero": above_zero,
        "metavar": metavar,
    }


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

    host: str = field(
        default=DEFAULT_HOST,
        metadata=_opt("--host", "net", f"address to bind (default: {DEFAULT_HOST})"),
    )
    port: int = field(
        default=DEFAULT_PORT,
        metadata=_opt(
            "--port", "net", f"port to bind; 0 picks a free one (default: {DEFAULT_PORT})"
        ),
    )
    allow_remote: bool = field(
        default=False,
        metadata=_opt(
            "--allow-remote",
            "net",
            "allow binding an address other than loopback (use with API keys)",
        ),
    )
    api_key_file: Path | None = field(
        default=None,
        metadata=_opt(
            "--api-key-file",
            "net",
            f"file with accepted API keys, one per line ('#' comments); also ${API_KEYS_ENV} "
            "(comma-separated). Without any key the proxy needs none",
            metavar="F",
        ),
    )
    admin_key_file: Path | None = field(
        default=None,
        metadata=_opt(
            "--admin-key-file",
            "net",
            f"file with admin keys (same format; also ${ADMIN_KEYS_ENV}): they use the API "
            "and also see and stop servers (/servers); inference keys cannot",
            metavar="F",
        ),
    )
    max_body_bytes: int | None = field(
        default=None,
        metadata=_opt(
            "--max-body-bytes",
            "net",
            "largest request body accepted (default: 16 MiB)",
            at_least=1024,
        ),
    )
    max_response_bytes: int | None = field(
        default=None,
        metadata=_opt(
            "--max-response-bytes",
            "net",
            "largest non-streamed answer relayed; a bigger one is cut off with 502 and the "
            "server's connection closed (default: 64 MiB)",
            at_least=1024,
        ),
    )
    max_requests_per_key: int | None = field(
        default=None,
        metadata=_opt(
            "--max-requests-per-key",
            "net",
            "requests one inference key may have in flight at once, its body still arriving "
            "included; beyond it the key gets 429 (default: a quarter of the connection "
            "limit, at least 4; admin keys are not limited)",
            at_least=1,
        ),
    )
    event_loop: str = field(
        default=AUTO,
        metadata=_opt(
            "--event-loop",
            "net",
            "event loop to serve on: uvloop (a dependency everywhere but Windows) adds less "
            "latency and CPU per request; auto takes it where it is installed (default: auto)",
        ),
    )
    max_servers: int = field(
        default=DEFAULT_MAX_SERVERS,
        metadata=_opt(
            "--max-servers",
            "pool",
            "most llama-servers up at once; the least recently used idle one is stopped to "
            "make room, a busy one only after its requests end (default: "
            f"{DEFAULT_MAX_SERVERS}); with N > 1 each server gets cores/N threads unless its "
            "model sets threads",
            at_least=1,
        ),
    )
    idle_ttl: float = field(
        default=DEFAULT_IDLE_TTL,
        metadata=_opt(
            "--idle-ttl",
            "pool",
            "stop a server idle for S seconds; 0 = never (default: "
            f"{DEFAULT_IDLE_TTL:g}; a model's idle_ttl wins)",
            at_least=0,
            metavar="S",
        ),
    )
    start_timeout: float | None = field(
        default=None,
        metadata=_opt(
            "--start-timeout",
            "pool",
            "seconds a server may take to load its model (default: the runtime's)",
            above_zero=True,
            metavar="S",
        ),
    )
    queue_timeout: float = field(
        default=DEFAULT_QUEUE_TIMEOUT,
        metadata=_opt(
            "--queue-timeout",
            "pool",
            "seconds a request waits for a free server slot before a 503 (default: "
            f"{DEFAULT_QUEUE_TIMEOUT:g})",
            above_zero=True,
            metavar="S",
        ),
    )
    memory_budget: str | None = field(
        default=None,
        metadata=_opt(
            "--memory-budget",
            "pool",
            "memory all servers may use together, by estimate (e.g. 24G, 75%%, none); idle "
            "servers are stopped to make room and a model too big for it is refused "
            "(default: 80%% of RAM)",
            metavar="SIZE",
        ),
    )
    max_queue: int = field(
        default=DEFAULT_MAX_QUEUE,
        metadata=_opt(
            "--max-queue",
            "pool",
            "requests one model may have waiting; more get 429 with Retry-After (default: "
            f"{DEFAULT_MAX_QUEUE})",
            at_least=1,
        ),
    )
    first_byte_timeout: float | None = field(
        default=None,
        metadata=_opt(
            "--first-byte-timeout",
            "timeouts",
            "seconds until llama-server's first response byte; a non-streamed answer is "
            "generated before it (default: 600)",
            above_zero=True,
            metavar="S",
        ),
    )
    stall_timeout: float | None = field(
        default=None,
        metadata=_opt(
            "--stall-timeout",
            "timeouts",
            "seconds a stream may go without a byte before it is cut off (default: 120)",
            above_zero=True,
            metavar="S",
        ),
    )
    drain_timeout: float = field(
        default=DEFAULT_DRAIN_TIMEOUT,
        metadata=_opt(
            "--drain-timeout",
            "timeouts",
            "seconds running requests get to finish on shutdown (default: "
            f"{DEFAULT_DRAIN_TIMEOUT:g})",
            at_least=0,
            metavar="S",
        ),
    )
    max_threads: int | None = field(
        default=None,
        metadata=_opt(
            "--max-threads",
            "caps",
            "most generation or batch threads, -t/-tb (default: the CPU count)",
            at_least=1,
        ),
    )
    max_threads_http: int | None = field(
        default=None,
        metadata=_opt(
            "--max-threads-http",
            "caps",
            "most HTTP threads, --threads-http (default: CPU count, at least 4)",
            at_least=1,
        ),
    )
    max_parallel: int | None = field(
        default=None,
        metadata=_opt(
            "--max-parallel", "caps", "most parallel slots, -np (default: 16)", at_least=1
        ),
    )
    max_batch: int | None = field(
        default=None,
        metadata=_opt(
            "--max-batch",
            "caps",
            "largest logical or physical batch, -b/-ub (default: 8192)",
            at_least=1,
        ),
    )
    max_context_tokens: int | None = field(
        default=None,
        metadata=_opt(
            "--max-context-tokens",
            "caps",
            "largest context size x parallel slots, -c times -np (default: 131072)",
            at_least=1,
        ),
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
            name: getattr(args, _dest(flag))
            for name, (flag, _) in BODY_CAP_FLAGS.items()
            if getattr(args, _dest(flag), None) is not None
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


BODY_CAP_FLAGS: Final[Mapping[str, tuple[str, str]]] = {
    "inputs": (
        "--max-inputs",
        "most items in input / documents / input_extra / prompt lists (default: 2048)",
    ),
    "n_probs": (
        "--max-n-probs",
        "most n_probs / top_logprobs / logprobs per request (default: 20)",
    ),
    "max_tokens": (
        "--max-predict",
        (
            "most max_tokens / max_completion_tokens / n_predict; the model's context size, "
            "when set, lowers it (default: 131072)"
        ),
    ),
    "n": ("--max-choices", "most completions per request, n / n_cmpl (default: 4)"),
    "logit_bias": ("--max-logit-bias", "most logit_bias entries (default: 1024)"),
    "images": (
        "--max-images",
        "most media parts (images, audio, video) per request (default: 8)",
    ),
    "image_bytes": ("--max-image-bytes", "largest decoded media part in bytes (default: 8 MiB)"),
    "grammar_bytes": (
        "--max-grammar-bytes",
        "longest GBNF grammar in bytes (default: 64 KiB; at most 256 KiB)",
    ),
    "grammar_depth": (
        "--max-grammar-depth",
        "deepest nesting of ( ) groups in a grammar (default: 64; at most 256)",
    ),
    "schema_bytes": (
        "--max-schema-bytes",
        "largest JSON schema (json_schema, response_format, tools) in bytes (default: 64 KiB)",
    ),
    "schema_depth": (
        "--max-schema-depth",
        "deepest nesting in a JSON schema (default: 32; at most 64)",
    ),
}
"""Each request-body cap (a ``BodyCaps`` field): its ``serve`` flag and help."""


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every :class:`ServeOptions` field, in its ``--help`` group.

    Every flag defaults to None (absent) so :meth:`ServeOptions.from_args` keeps the field's
    own default: the defaults live in one place.
    """
    groups = {
        key: parser.add_argument_group(title, description)
        for key, (title, description) in GROUPS.items()
    }
    hints = {"int": int, "float": float, "Path": Path, "str": str}
    for f in dataclasses.fields(ServeOptions):
        meta = f.metadata
        if "flag" not in meta:
            continue
        group = groups[meta["group"]]
        kind = str(f.type).split(" |")[0]
        if kind == "bool":
            group.add_argument(meta["flag"], action="store_true", default=None, help=meta["help"])
            continue
        options: dict[str, Any] = {"type": hints[kind], "default": None, "help": meta["help"]}
        if f.name == "event_loop":
            options["choices"] = EVENT_LOOPS
        elif kind in ("int", "float") or meta["metavar"]:
            options["metavar"] = meta["metavar"] or "N"
        group.add_argument(meta["flag"], **options)
    for flag, text in BODY_CAP_FLAGS.values():
        groups["body"].add_argument(flag, type=int, default=None, metavar="N", help=text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback address (``localhost``, 127.0.0.0/8, ::1)."""
    import ipaddress  # noqa: PLC0415 - only when serving

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_keys(
    path: Path | None, env_value: str | None, flag: str = "--api-key-file"
) -> tuple[str, ...]:
    """API keys from a file (one per line, ``#`` comments) and a comma-separated variable.

    Raises:
        ConfigError: the file cannot be read.
    """
    keys: list[str] = []
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            msg = f"cannot read {flag} {path}: {err.strerror or err}"
            raise ConfigError(msg) from err
        except UnicodeDecodeError:
            # The decoder's own message quotes bytes of the file, which are key material.
            msg = f"{flag} {path} is not UTF-8 text; write one key per line"
            raise ConfigError(msg) from None
        for line in text.splitlines():
            line = line.strip()  # noqa: PLW2901 - the stripped line is the key
            if line and not line.startswith("#"):
                keys.append(line)
    if env_value:
        keys.extend(k.strip() for k in env_value.split(",") if k.strip())
    return tuple(dict.fromkeys(keys))
