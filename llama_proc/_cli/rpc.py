"""``llama-proc rpc-worker``: run one llama.cpp RPC worker in the foreground."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Final

from llama_proc._cli.common import (
    PROVISION_FLAGS,
    Handler,
    add_command,
    add_settings_flags,
    positive_int,
)
from llama_proc.vocab import BACKENDS

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 50052
DEFAULT_READY_TIMEOUT: Final = 120.0


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
        variant={
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
    p.set_defaults(handler=Handler("rpc:run"))
