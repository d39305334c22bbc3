"""The ``serve`` command line: one entry per option (flag, ``--help`` group and text, bounds).

:class:`~llama_proc.proxy.serve_options.ServeOptions` carries these entries as its fields'
metadata, the way :class:`~llama_proc.config.Settings` carries its environment variables; this
module holds them without the dataclass, so building the CLI parser (every command builds it)
imports nothing more than a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.proxy.key_env import ADMIN_KEYS_ENV, API_KEYS_ENV
from llama_proc.vocab import EVENT_LOOPS

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping

__all__ = [
    "BODY_CAP_FLAGS",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_IDLE_TTL",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_SERVERS",
    "DEFAULT_MIN_RESIDENCY",
    "DEFAULT_PORT",
    "DEFAULT_QUEUE_TIMEOUT",
    "DEFAULT_RESIDENCY_WAIT",
    "GROUPS",
    "OPTION_FLAGS",
    "add_serve_flags",
    "flag_dest",
    "is_loopback",
]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000
DEFAULT_MAX_SERVERS: Final = 1
DEFAULT_IDLE_TTL: Final = 600.0
DEFAULT_QUEUE_TIMEOUT: Final = 600.0
DEFAULT_MAX_QUEUE: Final = 64
DEFAULT_MIN_RESIDENCY: Final = 30.0
"""Seconds ``serve`` keeps a loaded server from eviction (the pool itself defaults to none)."""
DEFAULT_RESIDENCY_WAIT: Final = 10.0
"""Seconds a request may wait for room held by minimum residency before it is given way."""
DEFAULT_DRAIN_TIMEOUT: Final = 30.0
"""Seconds in-flight requests get to finish at shutdown."""

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
    kind: str,
) -> dict[str, Any]:
    return {
        "flag": flag,
        "group": group,
        "help": text,
        "at_least": at_least,
        "above_zero": above_zero,
        "metavar": metavar,
        "kind": kind,
    }


OPTION_FLAGS: Final[Mapping[str, Mapping[str, Any]]] = {
    "host": _opt("--host", "net", f"address to bind (default: {DEFAULT_HOST})", kind="str"),
    "port": _opt(
        "--port", "net", f"port to bind; 0 picks a free one (default: {DEFAULT_PORT})", kind="int"
    ),
    "allow_remote": _opt(
        "--allow-remote",
        "net",
        "allow binding an address other than loopback (use with API keys)",
        kind="bool",
    ),
    "api_key_file": _opt(
        "--api-key-file",
        "net",
        f"file with accepted API keys, one per line ('#' comments); also ${API_KEYS_ENV} "
        "(comma-separated). Without any key the proxy needs none",
        metavar="F",
        kind="Path",
    ),
    "admin_key_file": _opt(
        "--admin-key-file",
        "net",
        f"file with admin keys (same format; also ${ADMIN_KEYS_ENV}): they use the API "
        "and also see and stop servers (/servers); inference keys cannot",
        metavar="F",
        kind="Path",
    ),
    "max_body_bytes": _opt(
        "--max-body-bytes",
        "net",
        "largest request body accepted (default: 16 MiB)",
        at_least=1024,
        kind="int",
    ),
    "max_response_bytes": _opt(
        "--max-response-bytes",
        "net",
        "largest non-streamed answer relayed; a bigger one is cut off with 502 and the "
        "server's connection closed (default: 64 MiB)",
        at_least=1024,
        kind="int",
    ),
    "max_requests_per_key": _opt(
        "--max-requests-per-key",
        "net",
        "requests one inference key may have in flight at once, its body still arriving "
        "included; beyond it the key gets 429 (default: a quarter of the connection "
        "limit, at least 4; admin keys are not limited)",
        at_least=1,
        kind="int",
    ),
    "event_loop": _opt(
        "--event-loop",
        "net",
        "event loop to serve on: uvloop (a dependency everywhere but Windows) adds less "
        "latency and CPU per request; auto takes it where it is installed (default: auto)",
        kind="str",
    ),
    "max_servers": _opt(
        "--max-servers",
        "pool",
        "most llama-servers up at once; the idle one cheapest to load again is stopped "
        f"to make room, never a busy one (default: {DEFAULT_MAX_SERVERS}); with N > 1 each "
        "server gets cores/N threads unless its model sets threads",
        at_least=1,
        kind="int",
    ),
    "idle_ttl": _opt(
        "--idle-ttl",
        "pool",
        "stop a server idle for S seconds; 0 = never (default: "
        f"{DEFAULT_IDLE_TTL:g}; a model's idle_ttl wins)",
        at_least=0,
        metavar="S",
        kind="float",
    ),
    "start_timeout": _opt(
        "--start-timeout",
        "pool",
        "seconds a server may take to load its model (default: the runtime's)",
        above_zero=True,
        metavar="S",
        kind="float",
    ),
    "queue_timeout": _opt(
        "--queue-timeout",
        "pool",
        "seconds a request waits for a free server slot before a 503 (default: "
        f"{DEFAULT_QUEUE_TIMEOUT:g})",
        above_zero=True,
        metavar="S",
        kind="float",
    ),
    "memory_budget": _opt(
        "--memory-budget",
        "pool",
        "memory all servers may use together, by estimate (e.g. 24G, 75%%, none); idle "
        "servers are stopped to make room and a model too big for it is refused "
        "(default: 80%% of RAM)",
        metavar="SIZE",
        kind="str",
    ),
    "max_queue": _opt(
        "--max-queue",
        "pool",
        "requests one model may have waiting; more get 429 with Retry-After (default: "
        f"{DEFAULT_MAX_QUEUE})",
        at_least=1,
        kind="int",
    ),
    "min_residency": _opt(
        "--min-residency",
        "pool",
        "a loaded server is not evicted for S seconds, unless a request has waited "
        f"--residency-wait seconds for room (default: {DEFAULT_MIN_RESIDENCY:g})",
        at_least=0,
        metavar="S",
        kind="float",
    ),
    "residency_wait": _opt(
        "--residency-wait",
        "pool",
        f"the bound on that wait (default: {DEFAULT_RESIDENCY_WAIT:g})",
        at_least=0,
        metavar="S",
        kind="float",
    ),
    "first_byte_timeout": _opt(
        "--first-byte-timeout",
        "timeouts",
        "seconds until llama-server's first response byte; a non-streamed answer is "
        "generated before it (default: 600)",
        above_zero=True,
        metavar="S",
        kind="float",
    ),
    "stall_timeout": _opt(
        "--stall-timeout",
        "timeouts",
        "seconds a stream may go without a byte before it is cut off (default: 120)",
        above_zero=True,
        metavar="S",
        kind="float",
    ),
    "drain_timeout": _opt(
        "--drain-timeout",
        "timeouts",
        f"seconds running requests get to finish on shutdown (default: {DEFAULT_DRAIN_TIMEOUT:g})",
        at_least=0,
        metavar="S",
        kind="float",
    ),
    "max_threads": _opt(
        "--max-threads",
        "caps",
        "most generation or batch threads, -t/-tb (default: the CPU count)",
        at_least=1,
        kind="int",
    ),
    "max_threads_http": _opt(
        "--max-threads-http",
        "caps",
        "most HTTP threads, --threads-http (default: CPU count, at least 4)",
        at_least=1,
        kind="int",
    ),
    "max_parallel": _opt(
        "--max-parallel", "caps", "most parallel slots, -np (default: 16)", at_least=1, kind="int"
    ),
    "max_batch": _opt(
        "--max-batch",
        "caps",
        "largest logical or physical batch, -b/-ub (default: 8192)",
        at_least=1,
        kind="int",
    ),
    "max_context_tokens": _opt(
        "--max-context-tokens",
        "caps",
        "largest context size x parallel slots, -c times -np (default: 131072)",
        at_least=1,
        kind="int",
    ),
}
"""Each ``serve`` option: its flag, ``--help`` group and text, bounds and kind, by field name."""


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


def flag_dest(flag: str) -> str:
    """The argparse destination of ``--some-flag``: ``some_flag``."""
    return flag.removeprefix("--").replace("-", "_")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every ``serve`` option, in its ``--help`` group.

    Every flag defaults to None (absent) so :meth:`ServeOptions.from_args
    <llama_proc.proxy.serve_options.ServeOptions.from_args>` keeps the field's own default: the
    defaults live in one place.
    """
    groups = {
        key: parser.add_argument_group(title, description)
        for key, (title, description) in GROUPS.items()
    }
    hints = {"int": int, "float": float, "Path": Path, "str": str}
    for name, meta in OPTION_FLAGS.items():
        group = groups[meta["group"]]
        kind = meta["kind"]
        if kind == "bool":
            group.add_argument(meta["flag"], action="store_true", default=None, help=meta["help"])
            continue
        options: dict[str, Any] = {"type": hints[kind], "default": None, "help": meta["help"]}
        if name == "event_loop":
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
