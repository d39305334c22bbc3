"""Which RPC protocol version a llama.cpp build speaks, and where its worker binary is.

The version is compiled into the build and exchanged only on the wire, so it is asked from the
build's own worker binary (a short loopback handshake).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ServerNotReadyError, ServerStartError
from llama_proc.runtime.rpc.worker import READY_TIMEOUT, RpcWorker

if TYPE_CHECKING:
    import os

    from llama_proc.runtime.rpc.protocol import RpcVersion

__all__ = ["find_rpc_server", "local_rpc_version", "rpc_protocol_version"]

logger = logging.getLogger(__name__)


def rpc_protocol_version(
    binary: str | os.PathLike[str], timeout: float = READY_TIMEOUT
) -> RpcVersion:
    """The RPC protocol version a build speaks, asked from its own worker binary.

    The version is compiled into the build and exchanged only on the wire, so this starts the
    build's rpc-server on a free loopback port, does one handshake and stops it (well under a
    second on CPU). Results are cached per binary file for the life of the process.

    Raises:
        ServerStartError: the worker cannot start.
        ServerNotReadyError: it did not answer within ``timeout``.
    """
    path = Path(binary).resolve()
    try:
        stat = path.stat()
    except OSError as err:
        msg = f"RPC worker binary {path} cannot be read"
        raise ServerStartError(msg, cause=err.strerror or str(err)) from err
    return _cached_version(str(path), stat.st_mtime_ns, stat.st_size, timeout)


@functools.lru_cache(maxsize=16)
def _cached_version(path: str, _mtime: int, _size: int, timeout: float) -> RpcVersion:
    with RpcWorker(path, threads=1, ready_timeout=timeout) as worker:
        assert worker.info is not None  # noqa: S101 - set by a successful wait_ready
        return worker.info.version


_WORKER_NAMES: Final = ("ggml-rpc-server", "rpc-server")
"""The worker's file names, newest first (upstream renamed it in 2026)."""


def find_rpc_server(llama_server: str | os.PathLike[str]) -> Path | None:
    """The RPC worker binary shipped beside ``llama_server`` (same build), or None."""
    server = Path(llama_server)
    suffix = ".exe" if server.suffix.lower() == ".exe" else ""
    for name in _WORKER_NAMES:
        candidate = server.with_name(name + suffix)
        if candidate.is_file():
            return candidate
    return None


def local_rpc_version(
    llama_server: str | os.PathLike[str], timeout: float = READY_TIMEOUT
) -> RpcVersion | None:
    """The RPC protocol version of ``llama_server``'s build, for :func:`check_workers`.

    Asked from the worker binary of the same build (:func:`find_rpc_server`); None when the
    build has none or it cannot run, in which case :func:`check_workers` can only check that
    the workers agree with each other (llama-server still refuses an incompatible one).
    """
    worker = find_rpc_server(llama_server)
    if worker is None:
        logger.debug(
            "no RPC worker binary beside %s; worker versions are not compared", llama_server
        )
        return None
    try:
        return rpc_protocol_version(worker, timeout)
    except (ServerStartError, ServerNotReadyError) as err:
        logger.warning("cannot learn the RPC protocol version from %s: %s", worker, err)
        return None
