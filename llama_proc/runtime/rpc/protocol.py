"""The llama.cpp RPC wire protocol: probe a worker and check workers before llama-server uses them.

Wire format (``ggml/src/ggml-rpc/ggml-rpc.cpp``, protocol v7), all integers little-endian::

    request : | command (u8) | payload size (u64) | payload |
    response: | payload size (u64) | payload |

The first command on a connection must be HELLO (14, pinned upstream "always 14"): a 24-byte
transport-capabilities block (all zero = plain TCP) answered by ``major, minor, patch, pad`` and
the worker's own 24-byte block. A worker whose protocol differs from the client's closes the
connection or answers a different version; llama-server then aborts while parsing its flags.
Each worker serves **one client at a time**: a second client is accepted by the kernel but gets
no answer until the first disconnects, so a worker already in use looks "busy", not down.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import socket
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple

from llama_proc.errors import InvalidArgumentError, RpcWorkerError

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "DEFAULT_RPC_PORT",
    "MAX_WORKERS",
    "PROBE_TIMEOUT",
    "RpcVersion",
    "WorkerDevice",
    "WorkerInfo",
    "check_bind_host",
    "check_workers",
    "parse_endpoint",
    "probe_worker",
]

logger = logging.getLogger(__name__)

DEFAULT_RPC_PORT: Final = 50052
"""rpc-server's own default port."""
PROBE_TIMEOUT: Final = 5.0
"""Seconds to connect to a worker and finish the handshake."""
MAX_WORKERS: Final = 16
"""``GGML_RPC_MAX_SERVERS``: llama.cpp accepts at most this many ``--rpc`` endpoints."""

_CMD_GET_DEVICE_MEMORY: Final = 11
_CMD_HELLO: Final = 14
_CMD_DEVICE_COUNT: Final = 15
_CONN_CAPS_SIZE: Final = 24
_KNOWN_MAJOR: Final = 7
"""The protocol major version whose command numbers this module knows beyond HELLO."""
_MAX_REPLY: Final = 1 << 16
"""Largest handshake/device reply accepted; anything bigger is not an rpc-server."""
_LINGER_RESET: Final = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)
"""SO_LINGER on, 0 seconds: close() sends a TCP reset instead of a FIN."""
_HEADER: Final = struct.Struct("<BQ")
_SIZE: Final = struct.Struct("<Q")


class RpcVersion(NamedTuple):
    """An RPC protocol version as a worker reports it in its HELLO answer."""

    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class WorkerDevice:
    """One device a worker exposes (``RPC<n>`` on the llama-server side)."""

    index: int
    free: int
    """Free memory in bytes, as the worker reported it."""
    total: int
    """Total memory in bytes."""


@dataclass(frozen=True)
class WorkerInfo:
    """What a successful probe learned about a worker."""

    host: str
    port: int
    version: RpcVersion
    devices: tuple[WorkerDevice, ...] | None
    """Device memory, or None when the protocol is not one this module can query."""

    @property
    def endpoint(self) -> str:
        """``host:port`` as ``llama-server --rpc`` takes it."""
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        """One human line: version and devices."""
        if self.devices is None:
            devices = "devices unknown"
        else:
            mib = 1024 * 1024
            devices = ", ".join(
                f"device {d.index}: {d.free // mib} of {d.total // mib} MiB free"
                for d in self.devices
            )
        return f"{self.endpoint}: RPC protocol v{self.version}; {devices}"


# ----------------------------------------------------------------------------- endpoints
def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``host:port`` the way ``llama-server --rpc`` does.

    Raises:
        InvalidArgumentError: no port, or a port that is not 1-65535.
    """
    host, sep, port_text = endpoint.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        msg = f"RPC worker {endpoint!r} is not host:port (for example 192.168.1.10:50052)"
        raise InvalidArgumentError(msg)
    if "," in host or any(c.isspace() for c in host):
        msg = f"RPC worker {endpoint!r} holds a comma or space; pass each worker separately"
        raise InvalidArgumentError(msg)
    return host, int(port_text)


def check_bind_host(host: str, *, allow_remote: bool) -> bool:
    """Validate the address an rpc-server would bind; return whether it is loopback.

    rpc-server binds IPv4 literals only. Anything but loopback is refused unless
    ``allow_remote`` is true, because the protocol has no authentication or encryption.

    Raises:
        InvalidArgumentError: not an IPv4 address, or not loopback without ``allow_remote``.
    """
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        msg = f"rpc-server binds IPv4 addresses only; {host!r} is not one (use e.g. 127.0.0.1)"
        raise InvalidArgumentError(msg) from None
    if address.is_loopback:
        return True
    if not allow_remote:
        msg = (
            f"refusing to bind the RPC worker to {host}: the RPC protocol has no authentication "
            "or encryption; bind a private interface only and pass --allow-remote "
            "(allow_remote=True) to confirm"
        )
        raise InvalidArgumentError(msg)
    return False


# ----------------------------------------------------------------------------- protocol
class _RefusedError(Exception):
    """A probe failed; ``args[0]`` says why (turned into RpcWorkerError by the caller)."""


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise EOFError
        chunks += chunk
    return bytes(chunks)


def _call(sock: socket.socket, command: int, payload: bytes) -> bytes:
    sock.sendall(_HEADER.pack(command, len(payload)) + payload)
    (size,) = _SIZE.unpack(_recv_exact(sock, _SIZE.size))
    if size > _MAX_REPLY:
        msg = f"it answered command {command} with {size} bytes: it is not an rpc-server"
        raise _RefusedError(msg)
    return _recv_exact(sock, size)


def _handshake(sock: socket.socket, timeout: float) -> RpcVersion:
    try:
        reply = _call(sock, _CMD_HELLO, bytes(_CONN_CAPS_SIZE))
    except (EOFError, ConnectionResetError):
        msg = (
            "it closed the connection during the RPC handshake: it runs a llama.cpp build "
            "with another RPC protocol (or is not an rpc-server)"
        )
        raise _RefusedError(msg) from None
    except TimeoutError:
        msg = (
            f"it accepted the connection but did not answer the RPC handshake within "
            f"{timeout:g}s: it is busy serving another client (an rpc-server serves one "
            "llama-server at a time) or it is not an rpc-server"
        )
        raise _RefusedError(msg) from None
    if len(reply) < 3:
        msg = f"its handshake answer has {len(reply)} bytes: it is not an rpc-server"
        raise _RefusedError(msg)
    return RpcVersion(reply[0], reply[1], reply[2])


def _devices(sock: socket.socket) -> tuple[WorkerDevice, ...]:
    try:
        return _query_devices(sock)
    except (TimeoutError, EOFError, ConnectionError):
        msg = "it answered the handshake, then stopped answering device queries"
        raise _RefusedError(msg) from None


def _query_devices(sock: socket.socket) -> tuple[WorkerDevice, ...]:
    reply = _call(sock, _CMD_DEVICE_COUNT, b"")
    if len(reply) != 4:
        msg = "its device-count answer is malformed"
        raise _RefusedError(msg)
    (count,) = struct.unpack("<I", reply)
    devices = []
    for index in range(min(count, 64)):
        reply = _call(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", index))
        if len(reply) != 16:
            msg = "its device-memory answer is malformed"
            raise _RefusedError(msg)
        free, total = struct.unpack("<QQ", reply)
        devices.append(WorkerDevice(index, free, total))
    return tuple(devices)


def probe_worker(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> WorkerInfo:
    """Connect to an rpc-server, do the HELLO handshake and read its devices.

    The probe is an ordinary, short client session: the worker logs it as one accepted and
    closed connection. It cannot succeed while another client (a running llama-server) holds
    the worker.

    Args:
        host: worker address or name.
        port: worker port.
        timeout: seconds for connecting and for each answer.

    Returns:
        The worker's protocol version and, for protocol versions this module knows, its
        devices' memory.

    Raises:
        RpcWorkerError: nothing listens, the host is unreachable, the handshake fails or
            times out.
    """
    endpoint = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                version = _handshake(sock, timeout)
                devices = _devices(sock) if version.major == _KNOWN_MAJOR else None
            except BaseException:
                # Close abortively (RST): a busy worker reads our queued HELLO later, and a
                # reply written into a plainly closed socket raises SIGPIPE, which kills
                # rpc-server; after a reset its write fails with an error it survives.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                raise
    except _RefusedError as err:
        raise _worker_error(endpoint, str(err)) from None
    except socket.gaierror as err:
        reason = f"cannot resolve {host!r} ({err.strerror or err})"
        raise _worker_error(endpoint, reason) from None
    except ConnectionRefusedError:
        reason = "nothing listens there (connection refused); start it with llama-proc rpc-worker"
        raise _worker_error(endpoint, reason) from None
    except TimeoutError:
        reason = f"no answer within {timeout:g}s (host down, wrong address or a firewall)"
        raise _worker_error(endpoint, reason) from None
    except (EOFError, ConnectionError) as err:
        reason = f"the connection broke during the probe ({err or 'closed'})"
        raise _worker_error(endpoint, reason) from None
    except OSError as err:
        reason = f"cannot connect ({err.strerror or err})"
        raise _worker_error(endpoint, reason) from None
    return WorkerInfo(host, port, version, devices)


def _worker_error(endpoint: str, reason: str) -> RpcWorkerError:
    return RpcWorkerError(f"RPC worker {endpoint} is not usable", cause=reason)


def check_workers(
    workers: Iterable[str],
    timeout: float = PROBE_TIMEOUT,
    *,
    expected: RpcVersion | None = None,
) -> list[WorkerInfo]:
    """Probe every worker before llama-server is started with ``--rpc``.

    llama-server itself aborts with a terse message (or hangs, for a busy worker) when a
    worker is missing or incompatible; this check names the worker and the reason first.
    Workers are probed in parallel, so the whole check takes at most about ``timeout``.

    Args:
        workers: ``host:port`` endpoints, in ``--rpc`` order.
        timeout: seconds per worker for connecting and each answer.
        expected: the protocol version of the local llama-server's build (see
            :func:`local_rpc_version`); every worker must report exactly this version.
            None = only require that all workers agree with each other.

    Returns:
        One :class:`WorkerInfo` per worker, in order.

    Raises:
        InvalidArgumentError: a malformed or repeated endpoint, or more than 16 workers.
        RpcWorkerError: a worker is unreachable, busy, or reports another protocol version.
    """
    endpoints = list(workers)
    parsed = [parse_endpoint(e) for e in endpoints]
    seen: set[tuple[str, int]] = set()
    for endpoint, key in zip(endpoints, parsed, strict=True):
        if key in seen:
            msg = f"RPC worker {endpoint} is listed twice; name each worker once"
            raise InvalidArgumentError(msg)
        seen.add(key)
    if len(parsed) > MAX_WORKERS:
        msg = f"{len(parsed)} RPC workers given; llama.cpp accepts at most {MAX_WORKERS}"
        raise InvalidArgumentError(msg)
    if not parsed:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(parsed)) as pool:
        futures = [pool.submit(probe_worker, host, port, timeout) for host, port in parsed]
        # Raise the first failure in --rpc order so the message is deterministic.
        infos = [future.result() for future in futures]
    reference = expected if expected is not None else infos[0].version
    for info in infos:
        if info.version == reference:
            continue
        if expected is not None:
            reason = (
                f"it speaks RPC protocol v{info.version} but this llama-server speaks "
                f"v{expected}: run the same llama.cpp build on both ends "
                "(llama-proc rpc-worker provisions the pinned build)"
            )
        else:
            reason = (
                f"it speaks RPC protocol v{info.version} but {infos[0].endpoint} speaks "
                f"v{reference}: run the same llama.cpp build on every worker"
            )
        raise _worker_error(info.endpoint, reason)
    for info in infos:
        logger.info("RPC worker %s", info.describe())
    return infos
