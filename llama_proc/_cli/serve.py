"""``llama-proc serve``: the OpenAI-compatible proxy over a pool of llama-servers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._cli.common import (
    ADMIN_KEYS_ENV,
    API_KEYS_ENV,
    PROVISION_FLAGS,
    add_command,
    add_settings_flags,
    settings_from_args,
)
from llama_proc.vocab import AUTO, EVENT_LOOPS

if TYPE_CHECKING:
    import argparse

    from llama_proc.proxy.body_policy import BodyCaps
    from llama_proc.proxy.flag_policy import FlagCaps

__all__ = [
    "API_KEYS_ENV",
    "body_caps",
    "flag_caps",
    "is_loopback",
    "read_api_keys",
    "register",
    "run",
]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000
DEFAULT_MIN_RESIDENCY: Final = 30.0
"""Seconds `serve` keeps a loaded server from eviction (the pool itself defaults to none)."""


def register(subparsers: Any) -> None:
    """Add the ``serve`` command."""
    p = add_command(
        subparsers,
        "serve",
        help="run an OpenAI-compatible proxy that starts llama-servers on demand",
        description=(
            "Serve /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models for "
            "the models in a config file or folder. Each (model, X-Llama-Flags) pair gets its "
            "own llama-server, started on first use, evicted least-recently-used beyond "
            "--max-servers and unloaded after --idle-ttl seconds idle."
        ),
    )
    src = p.add_argument_group("models")
    src.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="models config (TOML: [defaults] and [models.<id>] tables with path = ...); "
        "default: $LLAMA_PROC_CONFIG",
    )
    src.add_argument(
        "--models-dir",
        type=Path,
        metavar="DIR",
        help="also offer every .gguf file under DIR, named by its relative path without .gguf",
    )
    provisioning = p.add_argument_group("llama-server provisioning")
    add_settings_flags(provisioning, "server_binary", *PROVISION_FLAGS)
    net = p.add_argument_group("network and security")
    net.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST})"
    )
    net.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to bind; 0 picks a free one (default: {DEFAULT_PORT})",
    )
    net.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow binding an address other than loopback (use with API keys)",
    )
    net.add_argument(
        "--api-key-file",
        type=Path,
        metavar="F",
        help=f"file with accepted API keys, one per line ('#' comments); also ${API_KEYS_ENV} "
        "(comma-separated). Without any key the proxy needs none",
    )
    net.add_argument(
        "--admin-key-file",
        type=Path,
        metavar="F",
        help=f"file with admin keys (same format; also ${ADMIN_KEYS_ENV}): they use the API "
        "and also see and stop servers (/servers); inference keys cannot",
    )
    net.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        metavar="N",
        help="largest request body accepted (default: 16 MiB)",
    )
    net.add_argument(
        "--max-response-bytes",
        type=int,
        default=None,
        metavar="N",
        help="largest non-streamed answer relayed; a bigger one is cut off with 502 and the "
        "server's connection closed (default: 64 MiB)",
    )
    net.add_argument(
        "--max-requests-per-key",
        type=int,
        default=None,
        metavar="N",
        help="requests one inference key may have in flight at once, its body still arriving "
        "included; beyond it the key gets 429 (default: a quarter of the connection limit, "
        "at least 4; admin keys are not limited)",
    )
    pool = p.add_argument_group("server pool")
    pool.add_argument(
        "--max-servers",
        type=int,
        default=None,
        metavar="N",
        help="most llama-servers up at once; the idle one cheapest to load again is stopped "
        "to make room, never a busy one (default: 1); with N > 1 each "
        "server gets cores/N threads unless its model sets threads",
    )
    pool.add_argument(
        "--min-residency",
        type=float,
        default=DEFAULT_MIN_RESIDENCY,
        metavar="S",
        help="a loaded server is not evicted for S seconds, unless a request has waited "
        "--residency-wait seconds for room (default: %(default)g)",
    )
    pool.add_argument(
        "--residency-wait",
        type=float,
        default=None,
        metavar="S",
        help="the bound on that wait (default: 10)",
    )
    pool.add_argument(
        "--idle-ttl",
        type=float,
        default=None,
        metavar="S",
        help="stop a server idle for S seconds; 0 = never (default: 600; a model's idle_ttl wins)",
    )
    pool.add_argument(
        "--start-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds a server may take to load its model (default: the runtime's)",
    )
    pool.add_argument(
        "--queue-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds a request waits for a free server slot before a 503 (default: 600)",
    )
    pool.add_argument(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="memory all servers may use together, by estimate (e.g. 24G, 75%%, none); idle "
        "servers are stopped to make room and a model too big for it is refused "
        "(default: 80%% of RAM)",
    )
    pool.add_argument(
        "--max-queue",
        type=int,
        default=None,
        metavar="N",
        help="requests one model may have waiting; more get 429 with Retry-After (default: 64)",
    )
    net.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=AUTO,
        help="event loop to serve on: uvloop (a dependency everywhere but Windows) adds less "
        "latency and CPU per request; auto takes it where it is installed (default: auto)",
    )
    tmo = p.add_argument_group("request timeouts")
    tmo.add_argument(
        "--first-byte-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds until llama-server's first response byte; a non-streamed answer is "
        "generated before it (default: 600)",
    )
    tmo.add_argument(
        "--stall-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds a stream may go without a byte before it is cut off (default: 120)",
    )
    tmo.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds running requests get to finish on shutdown (default: 30)",
    )
    caps = p.add_argument_group(
        "server-wide caps",
        "hard limits for every source of llama-server flags: the models config and each "
        "request's X-Llama-Flags (which a model's request_flags table must allow first)",
    )
    for flag, what in _CAP_FLAGS:
        caps.add_argument(flag, type=int, default=None, metavar="N", help=what)
    body = p.add_argument_group(
        "request-body caps",
        "checked before a request is forwarded (over one: 400 naming the field); a model's "
        "request_body table may lower them, never raise them. Unknown top-level fields are "
        "refused unless that table allows them (fields = [...], unknown_fields = "
        '"strip" or "allow")',
    )
    for flag, what in _BODY_FLAGS:
        body.add_argument(flag, type=int, default=None, metavar="N", help=what)
    p.set_defaults(handler=run)


_CAP_FLAGS: Final = (
    ("--max-threads", "most generation or batch threads, -t/-tb (default: the CPU count)"),
    ("--max-threads-http", "most HTTP threads, --threads-http (default: CPU count, at least 4)"),
    ("--max-parallel", "most parallel slots, -np (default: 16)"),
    ("--max-batch", "largest logical or physical batch, -b/-ub (default: 8192)"),
    (
        "--max-context-tokens",
        "largest context size x parallel slots, -c times -np (default: 131072)",
    ),
)


_BODY_FLAGS: Final = (
    ("--max-n-probs", "most n_probs / top_logprobs / logprobs per request (default: 20)"),
    (
        "--max-predict",
        (
            "most max_tokens / max_completion_tokens / n_predict; the model's context size, "
            "when set, lowers it (default: 131072)"
        ),
    ),
    ("--max-choices", "most completions per request, n / n_cmpl (default: 4)"),
    ("--max-logit-bias", "most logit_bias entries (default: 1024)"),
    ("--max-images", "most media parts (images, audio, video) per request (default: 8)"),
    ("--max-image-bytes", "largest decoded media part in bytes (default: 8 MiB)"),
    (
        "--max-grammar-bytes",
        "longest GBNF grammar in bytes (default: 64 KiB; at most 256 KiB)",
    ),
    (
        "--max-grammar-depth",
        "deepest nesting of ( ) groups in a grammar (default: 64; at most 256)",
    ),
    (
        "--max-schema-bytes",
        "largest JSON schema (json_schema, response_format, tools) in bytes (default: 64 KiB)",
    ),
    ("--max-schema-depth", "deepest nesting in a JSON schema (default: 32; at most 64)"),
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback address (``localhost``, 127.0.0.0/8, ::1)."""
    import ipaddress

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
    from llama_proc.errors import ConfigError

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


def _positive(name: str, value: float | None) -> None:
    from llama_proc.errors import ConfigError

    if value is not None and value <= 0:
        msg = f"{name} must be a positive number"
        raise ConfigError(msg)


def flag_caps(args: argparse.Namespace) -> FlagCaps:
    """The server-wide caps from ``--max-threads`` and friends (defaults where not given).

    Raises:
        ConfigError: a cap below 1.
    """
    from llama_proc.proxy.flag_policy import FlagCaps

    given: dict[str, int] = {}
    for flag, _ in _CAP_FLAGS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is None:
            continue
        if value < 1:
            from llama_proc.errors import ConfigError

            msg = f"{flag} must be at least 1"
            raise ConfigError(msg)
        given[flag.removeprefix("--").replace("-", "_")] = value
    return FlagCaps(**given)


def body_caps(args: argparse.Namespace) -> BodyCaps:
    """The request-body caps from ``--max-n-probs`` and friends (defaults where not given).

    Raises:
        ConfigError: a cap below 0 or above its hard ceiling.
    """
    from llama_proc.errors import ConfigError, InvalidArgumentError
    from llama_proc.proxy.body_policy import CAP_FLAGS, BodyCaps

    given: dict[str, int] = {}
    for name, flag in CAP_FLAGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
        if value is not None:
            given[name] = value
    try:
        return BodyCaps(**given)
    except InvalidArgumentError as err:
        flag = next((f for n, f in CAP_FLAGS.items() if str(err).startswith(n + "=")), "")
        msg = f"{flag}: {err}" if flag else str(err)
        raise ConfigError(msg) from None


def run(args: argparse.Namespace) -> int:
    """Run the proxy until SIGINT/SIGTERM."""
    import asyncio
    import functools
    import logging
    import os
    import sys

    from llama_proc.errors import ConfigError
    from llama_proc.proxy.budget import (
        estimate_server_claims,
        estimate_server_memory,
        parse_memory_budget,
    )
    from llama_proc.proxy.device_budget import device_budgets, discover_gpus, list_devices
    from llama_proc.proxy.models_config import load_models
    from llama_proc.proxy.pool import (
        DEFAULT_IDLE_TTL,
        DEFAULT_MAX_QUEUE,
        DEFAULT_MAX_SERVERS,
        DEFAULT_QUEUE_TIMEOUT,
        DEFAULT_RESIDENCY_WAIT,
        ServerPool,
    )
    from llama_proc.proxy.prompt_cache import POOLED_CACHE_RAM_MIB, with_prompt_cache
    from llama_proc.proxy.servers import LlamaServerFactory
    from llama_proc.proxy.threads import split_threads, usable_cpus

    log = logging.getLogger("llama_proc.proxy")
    if not args.allow_remote and not is_loopback(args.host):
        msg = (
            f"refusing to bind {args.host}: it is not a loopback address; pass --allow-remote "
            "(and set API keys) to serve other machines"
        )
        raise ConfigError(msg)
    if not 0 <= args.port <= 65535:
        msg = f"--port {args.port} is not a port number (0-65535)"
        raise ConfigError(msg)
    for name in ("first_byte_timeout", "stall_timeout", "start_timeout", "queue_timeout"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    memory_budget = parse_memory_budget(args.memory_budget)
    if args.max_queue is not None and args.max_queue < 1:
        msg = "--max-queue must be at least 1"
        raise ConfigError(msg)
    if args.max_servers is not None and args.max_servers < 1:
        msg = "--max-servers must be at least 1"
        raise ConfigError(msg)
    if args.max_body_bytes is not None and args.max_body_bytes < 1024:
        msg = "--max-body-bytes must be at least 1024"
        raise ConfigError(msg)
    if args.idle_ttl is not None and args.idle_ttl < 0:
        msg = "--idle-ttl must be >= 0 (0 = never unload)"
        raise ConfigError(msg)
    api_keys = read_api_keys(args.api_key_file, os.environ.get(API_KEYS_ENV))
    admin_keys = read_api_keys(
        args.admin_key_file, os.environ.get(ADMIN_KEYS_ENV), "--admin-key-file"
    )
    if args.allow_remote and not is_loopback(args.host) and not (api_keys or admin_keys):
        log.warning("serving %s without API keys: anyone who can reach it can use it", args.host)
    if args.max_response_bytes is not None and args.max_response_bytes < 1024:
        msg = "--max-response-bytes must be at least 1024"
        raise ConfigError(msg)
    if args.max_requests_per_key is not None and args.max_requests_per_key < 1:
        msg = "--max-requests-per-key must be at least 1"
        raise ConfigError(msg)
    caps = flag_caps(args)
    bodies = body_caps(args)
    models = load_models(args.config, args.models_dir, caps=caps, body_caps=bodies)

    # Resolve the binary once, up front: a provisioning problem shows now, not on the first
    # request, and every server in the pool runs the same build.
    from llama_proc.provision import ensure_server

    settings = settings_from_args(args)
    binary = ensure_server(settings).server_binary

    from llama_proc.proxy.app import create_app
    from llama_proc.proxy.downloads import ModelDownloads
    from llama_proc.proxy.gate import run_proxy
    from llama_proc.proxy.options import ProxyOptions, event_loop_factory

    loop_name, loop_factory = event_loop_factory(args.event_loop)

    defaults = ProxyOptions()
    options = ProxyOptions(
        api_keys=api_keys,
        admin_keys=admin_keys,
        max_body_bytes=args.max_body_bytes or defaults.max_body_bytes,
        first_byte_timeout=args.first_byte_timeout or defaults.first_byte_timeout,
        stall_timeout=args.stall_timeout or defaults.stall_timeout,
        drain_timeout=args.drain_timeout if args.drain_timeout is not None else 30.0,
        flag_caps=caps,
        body_caps=bodies,
        max_response_bytes=args.max_response_bytes or defaults.max_response_bytes,
        max_requests_per_key=args.max_requests_per_key,
    )
    # With proxy keys, the servers get a key of their own too: they listen on loopback ports
    # any local user could reach, and the proxy's keys must not be that easy to go around.
    import secrets

    factory = LlamaServerFactory(
        binary=binary,
        settings=settings,
        start_timeout=args.start_timeout,
        api_key=secrets.token_urlsafe(32) if api_keys or admin_keys else None,
        # Servers running at once share the cores instead of each taking all of them.
        threads=split_threads(usable_cpus(), args.max_servers or DEFAULT_MAX_SERVERS),
        cache_ram=POOLED_CACHE_RAM_MIB,
    )

    def ready(host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        names = ", ".join(spec.id for spec in models)
        print(
            f"llama-proc serve: listening on http://{shown}:{port} "
            f"({len(models)} model(s): {names}; llama-server {binary}; {loop_name} event loop)",
            flush=True,
        )

    # GPUs and their budgets, from the binary's own device list, else NVML or AMD's sysfs.
    gpus = discover_gpus(list_devices(binary))
    if gpus:
        log.info(
            "GPU budgets: %s",
            ", ".join(f"{n} {b / 2**30:.1f} GiB" for n, b in device_budgets(gpus).items()),
        )
    host_estimate = with_prompt_cache(estimate_server_memory, POOLED_CACHE_RAM_MIB)
    # llama.cpp fits unset placement options to the GPUs itself where the binary has --fit.
    known = factory.binary_flags()
    fits = known is not None and "--fit" in known

    async def main() -> None:
        pool = ServerPool(
            factory,
            max_servers=args.max_servers or DEFAULT_MAX_SERVERS,
            idle_ttl=DEFAULT_IDLE_TTL if args.idle_ttl is None else args.idle_ttl,
            queue_timeout=args.queue_timeout or DEFAULT_QUEUE_TIMEOUT,
            max_queue=args.max_queue or DEFAULT_MAX_QUEUE,
            memory_budget=memory_budget,
            # Each server's prompt cache counts: it is bounded per server (the factory) and
            # added to the estimate the budget is kept against.
            memory_estimate=with_prompt_cache(estimate_server_memory, POOLED_CACHE_RAM_MIB),
            min_residency=args.min_residency,
            residency_wait=(
                DEFAULT_RESIDENCY_WAIT if args.residency_wait is None else args.residency_wait
            ),
            preload=[m for m in models.models.values() if m.preload],
            device_budgets=device_budgets(gpus),
            device_estimate=(
                functools.partial(
                    estimate_server_claims, gpus=gpus, host_estimate=host_estimate, fit=fits
                )
                if gpus
                else None
            ),
        )
        app = create_app(models, pool, options, downloads=ModelDownloads(settings=settings))
        await run_proxy(
            app, host=args.host, port=args.port, drain_timeout=options.drain_timeout, ready=ready
        )

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())
    except OSError as err:
        msg = f"cannot serve on {args.host}:{args.port}: {err.strerror or err}"
        raise ConfigError(msg) from err
    print("llama-proc serve: stopped", file=sys.stderr, flush=True)
    return 0
