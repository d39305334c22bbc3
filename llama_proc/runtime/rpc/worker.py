"""Run one llama.cpp RPC worker (``rpc-server`` / ``ggml-rpc-server``) on this machine.

The RPC protocol has **no authentication and no encryption**: anyone who reaches the port can
run compute graphs on the worker's devices and read or overwrite its buffers.
:class:`RpcWorker` therefore binds loopback unless ``allow_remote=True``, and then logs a loud
warning.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

from llama_proc._childenv import child_environment
from llama_proc._proc import free_port, run_with_timeout
from llama_proc.errors import (
    InvalidArgumentError,
    RpcWorkerError,
    ServerNotReadyError,
    ServerStartError,
)
from llama_proc.runtime.health import POLL_INTERVAL
from llama_proc.runtime.process import ServerProcess
from llama_proc.runtime.rpc.protocol import WorkerInfo, check_bind_host, probe_worker

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence

__all__ = ["READY_TIMEOUT", "STOP_GRACE", "RpcWorker"]

logger = logging.getLogger(__name__)

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
            llama-server's (:func:`~llama_proc._childenv.child_environment`).
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
            self.port = free_port(self.host)
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
            old, self.port = self.port, free_port(self.host)
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
    ran = run_with_timeout([str(binary), "--help"], _HELP_TIMEOUT)
    if ran is None or ran.timed_out:
        why = "it timed out" if ran is not None else "it could not be started"
        msg = f"cannot run {binary} --help"
        raise ServerStartError(msg, cause=why)
    return ran.output
