"""llama.cpp RPC workers: run ``rpc-server`` and check workers before llama-server uses them.

llama.cpp's RPC backend spreads one model over several machines: each remote machine runs an
``rpc-server`` (``ggml-rpc-server`` on newer builds) that exposes its devices, and
``llama-server --rpc host:port,...`` places layers on them as if they were local GPUs.

* :mod:`~llama_proc.runtime.rpc.protocol` -- the wire protocol: :func:`probe_worker`,
  :func:`check_workers`, endpoint parsing and bind-address policy.
* :mod:`~llama_proc.runtime.rpc.worker` -- :class:`RpcWorker`, one local worker process.
* :mod:`~llama_proc.runtime.rpc.version` -- the protocol version a build speaks.
* Decoding llama-server's RPC failure lines lives with every other failure cause, in
  :func:`llama_proc.diagnosis.explain_rpc_failure`.

This module re-exports the public names of the three.
"""

from __future__ import annotations

from llama_proc.diagnosis import explain_rpc_failure
from llama_proc.errors import RpcWorkerError
from llama_proc.runtime.rpc.protocol import (
    DEFAULT_RPC_PORT,
    RpcVersion,
    WorkerDevice,
    WorkerInfo,
    check_bind_host,
    check_workers,
    parse_endpoint,
    probe_worker,
)
from llama_proc.runtime.rpc.version import (
    find_rpc_server,
    local_rpc_version,
    rpc_protocol_version,
)
from llama_proc.runtime.rpc.worker import RpcWorker

__all__ = [
    "DEFAULT_RPC_PORT",
    "RpcVersion",
    "RpcWorker",
    "RpcWorkerError",
    "WorkerDevice",
    "WorkerInfo",
    "check_bind_host",
    "check_workers",
    "explain_rpc_failure",
    "find_rpc_server",
    "local_rpc_version",
    "parse_endpoint",
    "probe_worker",
    "rpc_protocol_version",
]
