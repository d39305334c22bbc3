"""``llama-proc rpc-worker``: run an RPC worker until stopped."""

from __future__ import annotations

import logging
import signal
import sys
from typing import TYPE_CHECKING

from llama_proc._cli.common import settings_from_args
from llama_proc.provision import ensure_server
from llama_proc.runtime.rpc import RpcWorker, check_bind_host

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

_WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARNING: the RPC worker listens on {host}:{port}, which is not loopback.
The llama.cpp RPC protocol has NO authentication and NO encryption: anyone who
can reach this port can use this machine's devices and read or overwrite the
tensors in its memory. Expose it only on a private network you trust, behind a
firewall that admits just the llama-server host(s).
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


class _StopRequestedError(Exception):
    """SIGTERM arrived: leave the with-block so the worker is stopped, then exit 0."""


def _devices(values: list[str] | None) -> tuple[str, ...]:
    if not values:
        return ()
    return tuple(d.strip() for value in values for d in value.split(",") if d.strip())


def run(args: argparse.Namespace) -> int:
    """Run the worker until it exits, Ctrl-C or SIGTERM.

    Returns:
        0 after a requested stop; 1 when the worker exits on its own.
    """
    # Refuse an unsafe address before anything is downloaded or built.
    if not check_bind_host(args.host, allow_remote=args.allow_remote):
        print(_WARNING.format(host=args.host, port=args.port), file=sys.stderr, flush=True)

    binary: Path = args.binary
    if binary is None:
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    server_log = logging.getLogger("llama_proc.llama_server")
    server_log.addHandler(handler)
    server_log.setLevel(logging.DEBUG)
    server_log.propagate = False
