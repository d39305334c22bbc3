"""``llama-proc serve``: run the proxy until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import shlex
import sys
from typing import TYPE_CHECKING

from llama_proc._cli.common import EXIT_USAGE, settings_from_args
from llama_proc._text import printable_lines
from llama_proc.errors import ConfigError, InvalidArgumentError
from llama_proc.provision import ensure_server
from llama_proc.proxy.app import create_app
from llama_proc.proxy.budget import estimate_server_claims, estimate_server_memory
from llama_proc.proxy.configs import load_config, load_models
from llama_proc.proxy.device_budget import device_budgets, discover_gpus, list_devices
from llama_proc.proxy.downloads import ModelDownloads
from llama_proc.proxy.gate import run_proxy
from llama_proc.proxy.options import event_loop_factory, pool_limits_of, proxy_options_of
from llama_proc.proxy.pool import ServerPool
from llama_proc.proxy.prompt_cache import POOLED_CACHE_RAM_MIB, with_prompt_cache
from llama_proc.proxy.serve_flags import is_loopback
from llama_proc.proxy.serve_options import ServeOptions
from llama_proc.proxy.servers import LlamaServerFactory
from llama_proc.proxy.threads import split_threads, usable_cpus
from llama_proc.runtime.args import ServerArgs

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from llama_proc.proxy.body_policy import BodyCaps
    from llama_proc.proxy.flag_caps import FlagCaps


def check_config(path: Path, caps: FlagCaps, bodies: BodyCaps) -> int:
    """``serve --check-config FILE``: print each model's id, aliases, source and flags.

    Returns:
        0 when the file loads; 2 (one line on stderr, naming file, line and key) when not.
    """
    try:
        models = load_config(path, caps=caps, body_caps=bodies)
        lines = [f"{path}: {len(models)} model(s)"]
        for spec in models:
            argv = ServerArgs.from_options(**spec.options, extra_args=spec.extra_args).to_argv()
            at = argv.index("--host")
            del argv[at : at + 2]  # the pool binds each server itself
            source = f"-m {spec.path}" if spec.ref is None else f"-hf {spec.ref}"
            lines += [
                f"{spec.id}:",
                f"  aliases: {', '.join(spec.aliases) or '-'}",
                f"  model: {source}" + (" (with its mmproj)" if spec.mmproj else ""),
                f"  flags: {shlex.join(argv) or '-'}",
            ]
            if spec.idle_ttl is not None:
                lines.append(f"  idle_ttl: {spec.idle_ttl:g}s")
    except (ConfigError, InvalidArgumentError) as err:
        print(f"llama-proc: error: {printable_lines(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    print(printable_lines("\n".join(lines)))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the proxy until SIGINT/SIGTERM."""
    log = logging.getLogger("llama_proc.proxy")
    serve = ServeOptions.from_args(args)
    limits = pool_limits_of(serve)
    api_keys, admin_keys = serve.api_keys()
    if serve.allow_remote and not is_loopback(serve.host) and not (api_keys or admin_keys):
        log.warning("serving %s without API keys: anyone who can reach it can use it", serve.host)
    options = proxy_options_of(serve, api_keys, admin_keys)
    if args.check_config is not None:
        return check_config(args.check_config, options.flag_caps, options.body_caps)
    models = load_models(
        args.config,
        args.models_dir,
        preset=args.models_preset,
        caps=options.flag_caps,
        body_caps=options.body_caps,
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

    # GPUs and their budgets, from the binary's own device list, else NVML or AMD's sysfs.
    gpus = discover_gpus(list_devices(binary))
    if gpus:
        log.info(
            "GPU budgets: %s",
            ", ".join(f"{n} {b / 2**30:.1f} GiB" for n, b in device_budgets(gpus).items()),
        )
    # Each server's prompt cache counts: it is bounded per server (the factory) and added to
    # the estimate the budget is kept against.
    host_estimate = with_prompt_cache(estimate_server_memory, POOLED_CACHE_RAM_MIB)
    # llama.cpp fits unset placement options to the GPUs itself where the binary has --fit.
    known = factory.binary_flags()
    fits = known is not None and "--fit" in known

    async def main() -> None:
        pool = ServerPool(
            factory,
            **limits,
            memory_estimate=host_estimate,
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
