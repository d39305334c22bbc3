"""``llama-proc serve``: the OpenAI-compatible proxy over a pool of llama-servers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_proc._cli.common import (
    PROVISION_FLAGS,
    add_command,
    add_settings_flags,
    settings_from_args,
)
from llama_proc.proxy.serve_options import (
    API_KEYS_ENV,
    ServeOptions,
    add_serve_flags,
    is_loopback,
    read_api_keys,
)

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
    add_serve_flags(p)
    p.set_defaults(handler=run)


def flag_caps(args: argparse.Namespace) -> FlagCaps:
    """The server-wide caps from ``--max-threads`` and friends (defaults where not given).

    Raises:
        ConfigError: a cap below 1.
    """
    return ServeOptions.from_args(args).flag_caps()


def body_caps(args: argparse.Namespace) -> BodyCaps:
    """The request-body caps from ``--max-n-probs`` and friends (defaults where not given).

    Raises:
        ConfigError: a cap below 0 or above its hard ceiling.
    """
    return ServeOptions.from_args(args).body_caps()


def run(args: argparse.Namespace) -> int:
    """Run the proxy until SIGINT/SIGTERM."""
    import asyncio
    import logging
    import secrets
    import sys

    from llama_proc.errors import ConfigError
    from llama_proc.provision import ensure_server
    from llama_proc.proxy.app import create_app
    from llama_proc.proxy.budget import estimate_server_memory
    from llama_proc.proxy.downloads import ModelDownloads
    from llama_proc.proxy.gate import run_proxy
    from llama_proc.proxy.models_config import load_models
    from llama_proc.proxy.options import event_loop_factory
    from llama_proc.proxy.pool import ServerPool
    from llama_proc.proxy.prompt_cache import POOLED_CACHE_RAM_MIB, with_prompt_cache
    from llama_proc.proxy.servers import LlamaServerFactory
    from llama_proc.proxy.threads import split_threads, usable_cpus

    log = logging.getLogger("llama_proc.proxy")
    serve = ServeOptions.from_args(args)
    limits = serve.pool_limits()
    api_keys, admin_keys = serve.api_keys()
    if serve.allow_remote and not is_loopback(serve.host) and not (api_keys or admin_keys):
        log.warning("serving %s without API keys: anyone who can reach it can use it", serve.host)
    options = serve.proxy_options(api_keys, admin_keys)
    models = load_models(
        args.config, args.models_dir, caps=options.flag_caps, body_caps=options.body_caps
    )

    # Resolve the binary once, up front: a provisioning problem shows now, not on the first
    # request, and every server in the pool runs the same build.
    settings = settings_from_args(args)
    binary = ensure_server(settings).server_binary
    loop_name, loop_factory = event_loop_factory(serve.event_loop)
    # With proxy keys, the servers get a key of their own too: they listen on loopback ports
    # any local user could reach, and the proxy's keys must not be that easy to go around.
    factory = LlamaServerFactory(
        binary=binary,
        settings=settings,
        start_timeout=serve.start_timeout,
        api_key=secrets.token_urlsafe(32) if api_keys or admin_keys else None,
        # Servers running at once share the cores instead of each taking all of them.
        threads=split_threads(usable_cpus(), serve.max_servers),
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

    async def main() -> None:
        pool = ServerPool(
            factory,
            **limits,
            # Each server's prompt cache counts: it is bounded per server (the factory) and
            # added to the estimate the budget is kept against.
            memory_estimate=with_prompt_cache(estimate_server_memory, POOLED_CACHE_RAM_MIB),
        )
        app = create_app(models, pool, options, downloads=ModelDownloads(settings=settings))
        await run_proxy(
            app, host=serve.host, port=serve.port, drain_timeout=serve.drain_timeout, ready=ready
        )

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())
    except OSError as err:
        msg = f"cannot serve on {serve.host}:{serve.port}: {err.strerror or err}"
        raise ConfigError(msg) from err
    print("llama-proc serve: stopped", file=sys.stderr, flush=True)
    return 0
