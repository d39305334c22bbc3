"""``llama-proc rpc-worker``: run one llama.cpp RPC worker in the foreground."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Final

from llama_proc._cli.common import (
    PROVISION_FLAGS,
    add_command,
    add_settings_flags,
    positive_int,
    settings_from_args,
)
from llama_proc.vocab import BACKENDS

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 50052
DEFAULT_READY_TIMEOUT: Final = 120.0

_WARNING: Final = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARNING: the RPC worker listens on {host}:{port}, which is not loopback.
The llama.cpp RPC protocol has NO authentication and NO encryption: anyone who
can reach this port can use this machine's devices and read or overwrite the
tensors in its memory. Expose it only on a private network you trust, behind a
firewall that admits just the llama-server host(s).
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        msg = f"{text!r} is not a port number (1-65535)"
        raise argparse.ArgumentTypeError(msg)
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        msg = f"{text!r} is not a positive number of seconds"
        raise argparse.ArgumentTypeError(msg)
    return value


def register(subparsers: Any) -> None:
    """Add the ``rpc-worker`` command."""
    p = add_command(
        subparsers,
        "rpc-worker",
        help="run a llama.cpp RPC worker (rpc-server) that llama-server --rpc can use",
        description=(
            "Run llama.cpp's rpc-server (ggml-rpc-server on newer builds) from the same build "
            "as llama-server, in the foreground, until Ctrl-C or SIGTERM. It is started in its "
            "own process group, dies with this command, and is reported ready only once it "
            "answers the RPC handshake. A llama-server on another machine then uses it with "
            "--rpc HOST:PORT (LlamaServer(rpc=[...]) in Python). The protocol has no "
            "authentication or encryption: it binds loopback unless --allow-remote is given."
        ),
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"IPv4 address to bind (default: {DEFAULT_HOST}); anything but loopback needs "
        "--allow-remote",
    )
    p.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"TCP port to bind (default: {DEFAULT_PORT})",
    )
    p.add_argument(
        "--device",
        action="append",
        default=None,
        metavar="DEV",
        help="device to expose, as llama.cpp names it (CUDA0, Vulkan1, CPU...); repeatable or "
        "comma-separated (default: every accelerator, else the CPU)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="threads for the CPU device (default: rpc-server's, half the cores)",
    )
    p.add_argument(
        "--mem",
        type=positive_int,
        default=None,
        metavar="MB",
        help="memory to advertise, in MiB; only builds whose rpc-server has --mem accept it "
        "(newer builds expose each device's real memory instead)",
    )
    p.add_argument(
        "--cache",
        action="store_true",
        help="let the worker keep large tensors in a local file cache ($LLAMA_CACHE/rpc) so a "
        "reload does not send them over the network again",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow binding an address other than loopback; the RPC protocol has no "
        "authentication or encryption, so only do this on a private, firewalled network",
    )
    add_settings_flags(
        p,
        *PROVISION_FLAGS,
        backend={
            "default": "rpc",
            "choices": BACKENDS,
            "help": "which provisioned build provides the worker (default: rpc); it must be the "
            "same build as the llama-server that connects to it",
        },
    )
    p.add_argument(
        "--binary",
        type=Path,
        default=None,
        metavar="PATH",
        help="run this rpc-server / ggml-rpc-server instead of a provisioned one",
    )
    p.add_argument(
        "--ready-timeout",
        type=_seconds,
        default=DEFAULT_READY_TIMEOUT,
        metavar="S",
        help=f"seconds the worker may take to answer its first handshake (default: "
        f"{DEFAULT_READY_TIMEOUT:g})",
    )
    p.set_defaults(handler=run)


def _devices(values: list[str] | None) -> tuple[str, ...]:
    if not values:
        return ()
    return tuple(d.strip() for value in values for d in value.split(",") if d.strip())


def run(args: argparse.Namespace) -> int:
    """Run the worker until it exits, Ctrl-C or SIGTERM.

    Returns:
        0 after a requested stop; 1 when the worker exits on its own.
    """
    import signal
    import sys

    from llama_proc.runtime.rpc import RpcWorker, check_bind_host

    # Refuse an unsafe address before anything is downloaded or built.
    if not check_bind_host(args.host, allow_remote=args.allow_remote):
        print(_WARNING.format(host=args.host, port=args.port), file=sys.stderr, flush=True)

    binary: Path = args.binary
    if binary is None:
        from llama_proc.provision import ensure_server

        install = ensure_server(settings_from_args(args))
        binary = install.binary("rpc-server")

    def on_signal(_signum: int, _frame: object) -> None:
        raise _StopRequestedError

    worker = RpcWorker(
        binary,
        host=args.host,
        port=args.port,
        devices=_devices(args.device),
        threads=args.threads,
        mem=args.mem,
        cache=args.cache,
        allow_remote=args.allow_remote,
        ready_timeout=args.ready_timeout,
    )
    _echo_worker_output()
    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        with worker as running:
            info = running.info
            assert info is not None  # noqa: S101 - the with-block waited for the handshake
            print(
                f"llama-proc rpc-worker: ready at {info.describe()}; pid {worker.pid}; "
                f"connect with llama-server --rpc {worker.endpoint}",
                flush=True,
            )
            code = worker.wait()
    except _StopRequestedError:
        # The with-block has stopped the worker (SIGTERM, then SIGKILL) on the way out.
        print("llama-proc rpc-worker: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"llama-proc rpc-worker: the worker exited with code {code}", file=sys.stderr)
    return 1


def _echo_worker_output() -> None:
    """Show the worker's output on stderr as it arrives.

    Worker lines go to the ``llama_proc.llama_server`` logger at DEBUG level (like
    llama-server's); this command owns its process, so it routes that logger to stderr.
    """
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    server_log = logging.getLogger("llama_proc.llama_server")
    server_log.addHandler(handler)
    server_log.setLevel(logging.DEBUG)
    server_log.propagate = False


class _StopRequestedError(Exception):
    """SIGTERM arrived: leave the with-block so the worker is stopped, then exit 0."""
