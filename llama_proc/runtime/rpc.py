"""llama.cpp RPC workers: run ``rpc-server`` and check workers before llama-server uses them.

llama.cpp's RPC backend spreads one model over several machines: each remote machine runs an
``rpc-server`` (``ggml-rpc-server`` on newer builds) that exposes its devices, and
``llama-server --rpc host:port,...`` places layers on them as if they were local GPUs.

The protocol has **no authentication and no encryption**: anyone who reaches the port can run
compute graphs on the worker's devices and read or overwrite its buffers. :class:`RpcWorker` therefore
binds loopback unless ``allow_remote=True``, and then logs a loud warning.

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
import contextlib
import functools
import ipaddress
import logging
import re
import shlex
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, NamedTuple, Self

from llama_proc.errors import (
    InvalidArgumentError,
    RpcWorkerError,
    ServerNotReadyError,
    ServerStartError,
)
from llama_proc.runtime.health import POLL_INTERVAL
from llama_proc.runtime.process import ServerProcess, child_environment

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Mapping, Sequence

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


# ----------------------------------------------------------------------------- diagnosis
_MISMATCH_RE: Final = re.compile(r"RPC server version mismatch: (\S+)")
_HANDSHAKE_RE: Final = re.compile(r"RPC handshake failed for (\S+)")
_CONNECT_RE: Final = re.compile(r"Failed to connect to (\S+)")
_CRASHED_RE: Final = re.compile(r"Remote RPC server crashed or returned malformed response")
_UNSUPPORTED_RE: Final = re.compile(r"RPC not supported in this build")


def _found(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1).rstrip(".:,") if pattern.groups else match.group(0)


def explain_rpc_failure(log_lines: Sequence[str]) -> str | None:
    """Turn llama-server's RPC failure log lines into one cause, or None if there is none.

    llama-server aborts (SIGABRT) while parsing ``--rpc`` when a worker is unreachable or
    speaks another protocol version; its log is the only record of which worker failed.
    """
    text = "\n".join(log_lines)
    version = _found(_MISMATCH_RE, text)
    worker = _found(_HANDSHAKE_RE, text)
    if version is not None:
        who = f"RPC worker {worker}" if worker else "an RPC worker"
        return (
            f"{who} speaks RPC protocol v{version}, not this llama-server's: run the same "
            "llama.cpp build on both ends"
        )
    if worker is not None:
        return (
            f"the RPC handshake with worker {worker} failed: it runs another llama.cpp build; "
            "run the same build on both ends"
        )
    if (endpoint := _found(_CONNECT_RE, text)) is not None:
        return (
            f"llama-server could not connect to RPC worker {endpoint}; start it "
            "(llama-proc rpc-worker) and check the address"
        )
    if _found(_CRASHED_RE, text):
        return (
            "an RPC worker crashed or dropped the connection (out of memory on the worker, or "
            "it was stopped); check the worker's log"
        )
    if _found(_UNSUPPORTED_RE, text):
        return "this llama-server was built without GGML_RPC; use the rpc (or cpu) variant"
    return None


# ----------------------------------------------------------------------------- the worker
READY_TIMEOUT: Final = 120.0
"""Seconds a worker may take to answer its first handshake (device init can be slow)."""
STOP_GRACE: Final = 5.0
"""Seconds between SIGTERM and SIGKILL when stopping a worker."""
_PROBE_STEP: Final = 1.0
"""Longest single readiness probe (a port held by another process may never answer)."""
_ACCEPT_CONFIRM: Final = 3.0
"""Seconds to see our own probe in the worker's log (proves no other process owns the port)."""
_ACCEPTED_LINE: Final = "Accepted client connection"
_BIND_FAILED_LINE: Final = "Failed to create server socket"
_HELP_TIMEOUT: Final = 30.0
_LOG_TAIL: Final = 20


class RpcWorker:
    """One llama.cpp RPC worker process (``rpc-server`` / ``ggml-rpc-server``).

    It gets the same lifecycle guarantees as llama-server because it runs in the same
    machinery (:class:`~llama_proc.runtime.process.ServerProcess`): its own process group, tied
    to this process so it never outlives it (even after SIGKILL), stopped at interpreter exit,
    output kept in a ring buffer and sent to the ``llama_proc.llama_server`` logger. Only
    readiness differs: the worker speaks no HTTP, so :meth:`wait_ready` waits for the RPC
    handshake and then checks the answer came from this process, not another one on the port.

    Usage::

        with RpcWorker(binary, port=50052) as worker:  # starts, waits, stops
            print(worker.info.describe())  # llama-server --rpc worker.endpoint

    Args:
        binary: the ``rpc-server`` / ``ggml-rpc-server`` executable (same build as llama-server).
        host: IPv4 address to bind; anything but loopback needs ``allow_remote``.
        port: TCP port; None picks a free one (retried once if it is taken before the bind).
        devices: devices to expose (``CUDA0``, ``Vulkan1``, ``CPU``); empty = rpc-server's
            default (every accelerator, else the CPU).
        threads: threads for the CPU device.
        mem: MiB to advertise; only builds whose rpc-server has ``--mem`` accept it.
        cache: let the worker cache large tensors on disk (``$LLAMA_CACHE/rpc``).
        allow_remote: permit a non-loopback ``host`` (the protocol has no authentication); a
            warning is logged when it is used.
        env: the worker's environment, used as given; None = this process's, cleaned like
            llama-server's (:func:`~llama_proc.runtime.process.child_environment`).
        extra_args: appended to the command line verbatim.
        ready_timeout: default for :meth:`wait_ready` (and the context manager).

    Raises:
        InvalidArgumentError: a refused host, a bad port, thread or memory value.
    """

    def __init__(
        self,
        binary: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        devices: Sequence[str] = (),
        threads: int | None = None,
        mem: int | None = None,
        cache: bool = False,
        allow_remote: bool = False,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self._loopback = check_bind_host(host, allow_remote=allow_remote)
        if port is not None and not 0 < port <= 65535:
            msg = f"RPC worker port {port} is not a port number (1-65535)"
            raise InvalidArgumentError(msg)
        for name, value in (("threads", threads), ("mem", mem)):
            if value is not None and value < 1:
                msg = f"RPC worker {name}={value} must be at least 1"
                raise InvalidArgumentError(msg)
        self.binary = Path(binary)
        self.host = host
        self._requested_port = port
        self.port: int = port or 0
        """The port; with ``port=None`` it is known once :meth:`start` has picked one."""
        self.devices = tuple(devices)
        self.threads = threads
        self.mem = mem
        self.cache = cache
        self.env = dict(env) if env is not None else None
        self.extra_args = tuple(extra_args)
        self.ready_timeout = ready_timeout
        self.info: WorkerInfo | None = None
        """What the readiness handshake learned (None until ready)."""
        self._process: ServerProcess | None = None
        self._respawned = False

    # -- state
    @property
    def endpoint(self) -> str:
        """``host:port`` for ``llama-server --rpc`` (the bound address; 0.0.0.0 stays as is)."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The worker's process id once started."""
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the worker has exited, else None."""
        return None if self._process is None else self._process.returncode

    @property
    def is_running(self) -> bool:
        """Whether the worker process is alive."""
        return self._process is not None and self._process.is_running

    def logs(self, n: int | None = None) -> list[str]:
        """The worker's last ``n`` output lines (all kept lines when None).

        rpc-server block-buffers its stdout when it is a pipe: its banner appears once it
        flushes, which it does when it accepts a connection (the readiness probe is one).
        """
        return [] if self._process is None else self._process.logs(n)

    def argv(self) -> list[str]:
        """The command line :meth:`start` runs."""
        argv = [str(self.binary), "--host", self.host, "--port", str(self.port)]
        if self.devices:
            argv += ["--device", ",".join(self.devices)]
        if self.threads is not None:
            argv += ["--threads", str(self.threads)]
        if self.mem is not None:
            argv += ["--mem", str(self.mem)]
        if self.cache:
            argv.append("--cache")
        return [*argv, *self.extra_args]

    # -- lifecycle
    def start(self) -> Self:
        """Spawn the worker (does not wait; see :meth:`wait_ready`).

        Raises:
            ServerStartError: already running, or the binary is missing or cannot run.
            InvalidArgumentError: ``mem`` is set but this build's worker has no ``--mem``.
        """
        if self.is_running:
            msg = f"RPC worker {self.endpoint} is already running (pid {self.pid})"
            raise ServerStartError(msg)
        if not self.binary.is_file():
            msg = f"RPC worker binary {self.binary} does not exist"
            raise ServerStartError(msg, cause="get it with: llama-proc fetch --variant rpc")
        if self.mem is not None and "--mem" not in _help_text(self.binary):
            msg = (
                f"{self.binary.name} of this build has no --mem option (newer builds report each "
                "device's real memory); drop mem / --mem, or choose devices with --device"
            )
            raise InvalidArgumentError(msg)
        if not self._loopback:
            logger.warning(
                "RPC worker will listen on %s, which is not loopback: the RPC protocol has NO "
                "authentication and NO encryption; anyone who reaches it can use this "
                "machine's devices and read or overwrite their memory",
                self.host,
            )
        if self._requested_port is None:
            self.port = _free_port(self.host)
        self.info = None
        self._respawned = False
        self._spawn()
        return self

    def _spawn(self) -> None:
        logger.info("starting RPC worker: %s", shlex.join(self.argv()))
        env = self.env if self.env is not None else child_environment()
        self._process = ServerProcess(
            self.argv(),
            env=env,
            host=self.host,
            port=self.port,
            stop_grace=STOP_GRACE,
            name=self.binary.name,
        )
        self._process.start()

    def wait_ready(self, timeout: float | None = None) -> WorkerInfo:
        """Wait until the worker answers the RPC handshake.

        The worker opens its port only after its devices are initialised, so the first
        successful handshake means ready. The probe then has to show up in this worker's own
        log, which proves that no other process owns the port.

        Args:
            timeout: seconds; None = :attr:`ready_timeout`.

        Returns:
            The worker's protocol version and devices (also kept as :attr:`info`).

        Raises:
            ServerStartError: not started; the worker exited first (bad option, port in use,
                unknown device); or another process answers on its port.
            ServerNotReadyError: no handshake within ``timeout`` seconds.
        """
        if self._process is None:
            msg = "RPC worker was not started; call start() first"
            raise ServerStartError(msg)
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        # A wildcard bind is probed over loopback.
        target = "127.0.0.1" if self.host == "0.0.0.0" else self.host  # noqa: S104
        last = "no answer yet"
        while True:
            self._raise_if_exited(may_respawn=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                url = f"rpc://{self.endpoint}"
                raise ServerNotReadyError(url, timeout, last, self.logs(_LOG_TAIL))
            step = max(0.1, min(_PROBE_STEP, remaining))
            try:
                info = probe_worker(target, self.port, timeout=step)
            except RpcWorkerError as err:
                last = err.cause
                time.sleep(POLL_INTERVAL)
                continue
            self._confirm_own_answer()
            self.info = WorkerInfo(self.host, self.port, info.version, info.devices)
            logger.info("RPC worker ready: %s (pid %s)", self.info.describe(), self.pid)
            return self.info

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """Stop the worker: SIGTERM to its process group, then SIGKILL after ``grace`` seconds.

        Idempotent; returns the exit status (None if it was never started).
        """
        return None if self._process is None else self._process.stop(grace)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the worker exits on its own; return its exit status.

        Raises:
            ServerStartError: the worker was never started.
            TimeoutError: still running after ``timeout`` seconds.
        """
        if self._process is None:
            msg = "RPC worker was not started; call start() first"
            raise ServerStartError(msg)
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self._process.returncode) is None:
            if deadline is not None and time.monotonic() >= deadline:
                msg = f"RPC worker {self.endpoint} still running after {timeout:g}s"
                raise TimeoutError(msg)
            time.sleep(_WAIT_POLL)
        return code

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<RpcWorker {self.endpoint} pid={self.pid} {state}>"

    # -- internals
    def _raise_if_exited(self, *, may_respawn: bool = False) -> None:
        process = self._process
        assert process is not None  # noqa: S101
        code = process.returncode
        if code is None:
            return
        with contextlib.suppress(ServerStartError):
            process.check_alive()  # drains the log reader; the error is rebuilt below
        lines = process.logs()
        bind_failed = any(_BIND_FAILED_LINE in line for line in lines)
        if may_respawn and bind_failed and self._requested_port is None and not self._respawned:
            # Another process took the free port between our check and the worker's bind
            # (rpc-server cannot bind port 0 itself): try once more on a new one.
            self._respawned = True
            old, self.port = self.port, _free_port(self.host)
            logger.info("RPC worker port %s was taken; retrying on %s", old, self.port)
            process.stop()
            self._spawn()
            return
        cause = _explain_worker_exit(lines, self.host, self.port)
        msg = f"RPC worker {self.binary.name} exited before it was ready"
        raise ServerStartError(msg, code, cause, lines[-_LOG_TAIL:])

    def _confirm_own_answer(self) -> None:
        deadline = time.monotonic() + _ACCEPT_CONFIRM
        while time.monotonic() < deadline:
            if any(_ACCEPTED_LINE in line for line in self.logs()):
                return
            self._raise_if_exited()
            time.sleep(POLL_INTERVAL)
        self._raise_if_exited()
        msg = f"another process answers on {self.endpoint}, not this RPC worker"
        raise ServerStartError(msg, cause="choose another port", log_tail=self.logs(_LOG_TAIL))


_WAIT_POLL: Final = 0.1


def _explain_worker_exit(lines: Sequence[str], host: str, port: int) -> str:
    text = "\n".join(lines)
    if _BIND_FAILED_LINE in text:
        return (
            f"it could not bind {host}:{port}: the port is in use or the address does not "
            "belong to this machine"
        )
    if "unknown device" in text:
        return "an unknown --device; the log lists the available ones"
    if "unknown argument" in text or "Invalid parameters" in text:
        return "this build's rpc-server refused an option (see the log)"
    if "No devices found" in text:
        return "it found no device to expose"
    return "see the log lines below"


def _help_text(binary: Path) -> str:
    try:
        out = subprocess.run(
            [str(binary), "--help"], capture_output=True, timeout=_HELP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        msg = f"cannot run {binary} --help"
        raise ServerStartError(msg, cause=str(err)) from err
    return (out.stdout + out.stderr).decode("utf-8", "replace")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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
