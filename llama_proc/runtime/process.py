"""Run one llama-server process: spawn, wait until ready, keep its log, stop it.

:class:`ServerProcess` takes a complete argv, so tests can run a fake server with
``[sys.executable, "fake_llama_server.py", ...]``; :class:`~llama_proc.server.LlamaServer`
builds the argv from :class:`~llama_proc.runtime.args.ServerArgs`.

The child:

* gets a deliberately built environment (:func:`child_environment`): the caller's, minus every
  ``LLAMA_ARG_*`` variable, ``LLAMA_API_KEY`` and Vertex AI's ``AIP_*`` variables. llama-server
  reads those as if they were flags (a stray ``LLAMA_ARG_PORT`` moves the port, a malformed one
  aborts startup, ``AIP_MODE=PREDICTION`` overrides the port), so the typed options are the
  single source of truth. The API key is added back only when the caller sets one.
* runs in its own process group/session, so Ctrl-C in a terminal reaches the owner (which
  stops it cleanly) rather than killing it mid-write, and ``stop()`` can signal the group.
* is tied to the owner's life (:mod:`llama_proc.runtime.lifetime`) and stopped at interpreter
  exit (``atexit``).
* writes stdout and stderr into one pipe, read by a thread into a bounded ring buffer and the
  ``llama_proc.llama_server`` logger. Any output, even a progress dot without a newline,
  counts as activity for the stall timeout.

Readiness is ``GET /health`` == 200, probed every 10 ms while checking the child is alive, and
at once when the child logs its "listening on" line (printed the instant it turns ready).
Because a different process may already own the port (llama-server then fails to bind and exits
within milliseconds, while the probe reaches the other process), a 200 only counts once the
child has logged ``listening on ...:<port>`` or has stayed alive for
:data:`CONFIRM_WINDOW` seconds after it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Final, Self

from llama_proc._childenv import DROPPED_ENV, child_environment
from llama_proc._proc import group_popen_kwargs, stop_tree
from llama_proc.devices import Placement, read_placement
from llama_proc.diagnosis import Cause, diagnose
from llama_proc.errors import ServerNotReadyError, ServerStartError
from llama_proc.runtime import lifetime as _lifetime
from llama_proc.runtime.health import HEALTH_PATH, POLL_INTERVAL, format_url, probe_health
from llama_proc.runtime.log_buffer import LOG_CAPACITY, LogBuffer

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

__all__ = [
    "DROPPED_ENV",
    "LOG_CAPACITY",
    "STALL_TIMEOUT",
    "STOP_GRACE",
    "LogBuffer",
    "ServerProcess",
    "child_environment",
]

logger = logging.getLogger(__name__)
server_logger = logging.getLogger("llama_proc.llama_server")
"""Receives every line llama-server prints (errors as WARNING, warnings as INFO, rest DEBUG)."""

STALL_TIMEOUT: Final = 120.0
"""Seconds without any new output from a loading server before it counts as stalled."""
STOP_GRACE: Final = 10.0
"""Seconds between SIGTERM and SIGKILL in :meth:`ServerProcess.stop`."""
TERM_REPEAT: Final = 1.0
"""Seconds after the first SIGTERM before a second one (see :meth:`ServerProcess.stop`)."""
LOG_TAIL: Final = 30
"""Lines of output attached to startup errors."""
CONFIRM_WINDOW: Final = 1.0
"""Seconds a child must stay alive after the first 200 when it logs no "listening on" line."""
READER_JOIN_TIMEOUT: Final = 2.0
"""Seconds to wait for the log reader to drain after the child exited."""
MAX_LINE: Final = 16384
"""Longest line kept; longer output is split."""
_READ_CHUNK: Final = 65536

_LEVEL: Final = re.compile(r"^\d+\.\d+\.\d+\.\d+ (?P<level>[A-Z]) ")
_LEVELS: Final = {"E": logging.WARNING, "W": logging.INFO}


_LIVE: set[ServerProcess] = set()
_LIVE_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _register(proc: ServerProcess) -> None:
    global _ATEXIT_REGISTERED  # noqa: PLW0603 - one hook per interpreter
    with _LIVE_LOCK:
        _LIVE.add(proc)
        if not _ATEXIT_REGISTERED:
            atexit.register(_stop_all)
            _ATEXIT_REGISTERED = True


def _unregister(proc: ServerProcess) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def _stop_all() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.stop(grace=min(proc.stop_grace, 5.0))


class ServerProcess:
    """One llama-server child process. A context manager: ``with`` starts, waits, stops.

    Args:
        argv: the full command line, binary first.
        env: the child's environment, used as given; None = :func:`child_environment`.
        host: the address the server listens on (for probes and :attr:`url`).
        port: its port; 0 = learn it from the server's "listening on" log line.
        health_path: the readiness route.
        log_capacity: output lines kept in memory.
        lifetime: how the child is tied to this process (see :mod:`~llama_proc.runtime.lifetime`).
        stop_grace: default seconds between SIGTERM and SIGKILL.
        cwd: working directory for the child.
        name: label for log messages.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int,
        health_path: str = HEALTH_PATH,
        log_capacity: int = LOG_CAPACITY,
        lifetime: _lifetime.Lifetime = "auto",
        stop_grace: float = STOP_GRACE,
        cwd: str | os.PathLike[str] | None = None,
        name: str = "llama-server",
    ) -> None:
        if not argv:
            msg = "argv is empty; pass the llama-server binary and its flags"
            raise ValueError(msg)
        self.argv = [os.fspath(a) for a in argv]
        self.env = dict(env) if env is not None else None
        self.host = host
        self._requested_port = port
        self.health_path = health_path
        self.lifetime: _lifetime.Lifetime = (
            _lifetime.default_lifetime() if lifetime == "auto" else lifetime
        )
        self.stop_grace = stop_grace
        self.cwd = cwd
        self.name = name
        self.failure: Cause | None = None
        """Why the last start failed, decoded from the log (None while fine)."""
        self._log_capacity = log_capacity
        self._log = LogBuffer(log_capacity)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._watchdog: _lifetime.Watchdog | None = None
        self._lock = threading.RLock()
        self._started_at = 0.0
        self.ready_after: float | None = None
        """Seconds from spawn to ready, once ready."""

    # -- state ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The child's process id (None before start)."""
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the child has exited (negative = killed by that signal)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def is_running(self) -> bool:
        """Whether the child has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def port(self) -> int:
        """The port: as requested, or as the server reported when started with port 0."""
        if self._requested_port == 0 and self._log.listening is not None:
            return self._log.listening[1]
        return self._requested_port

    @property
    def url(self) -> str:
        """``http://host:port`` of the server."""
        return format_url(self.host, self.port)

    def logs(self, n: int | None = None) -> list[str]:
        """The last ``n`` lines the server printed (all kept lines when None)."""
        return self._log.tail(n)

    def placement(self) -> Placement:
        """Where the server put the model, read from its log so far.

        The devices it uses, the layers offloaded and the weight buffers per device; the
        "using device" and buffer lines need log verbosity 4 (``--log-verbosity 4``), which
        :class:`~llama_proc.server.LlamaServer` passes. Read once the server is ready: the
        model is loaded by then.
        """
        return read_placement(self._log.tail())

    @property
    def last_output(self) -> float:
        """``time.monotonic()`` of the server's latest output."""
        return self._log.last_activity

    # -- start ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Spawn the child (does not wait for readiness; see :meth:`wait_ready`).

        Raises:
            ServerStartError: the binary cannot be executed, or it is already running.
        """
        with self._lock:
            if self.is_running:
                msg = f"{self.name} is already running (pid {self.pid})"
                raise ServerStartError(msg)
            if self._proc is not None:
                self._cleanup()
            self._log = LogBuffer(self._log_capacity)
            self.failure = None
            self.ready_after = None
            self._started_at = time.monotonic()
            try:
                proc = self._spawn()
            except OSError as err:
                msg = f"cannot run {self.argv[0]}: {err.strerror or err}"
                raise ServerStartError(
                    msg, cause="the binary is missing or not executable"
                ) from err
            self._proc = proc
            _register(self)
            self._reader = threading.Thread(
                target=self._read_output,
                args=(proc,),
                name=f"llama-proc-log-{proc.pid}",
                daemon=True,
            )
            self._reader.start()
            if self.lifetime == "watchdog" and os.name == "posix":
                try:
                    self._watchdog = _lifetime.start_watchdog(proc.pid, self.stop_grace)
                except OSError as err:
                    logger.warning("could not start the watchdog for pid %d: %s", proc.pid, err)
            elif self.lifetime == "job":
                _lifetime.assign_to_job(proc)
            logger.debug("started %s pid %d: %s", self.name, proc.pid, " ".join(self.argv))
            return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = self.env if self.env is not None else child_environment()
        preexec = _lifetime.pdeathsig_preexec() if self.lifetime == "pdeathsig" else None
        group = group_popen_kwargs()

        def popen() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                close_fds=True,
                preexec_fn=preexec,  # noqa: PLW1509 - see lifetime: only prctl + getppid
                **group,
            )

        if preexec is not None:
            return _lifetime.spawn(popen)
        return popen()

    def _read_output(self, proc: subprocess.Popen[bytes]) -> None:
        stream = proc.stdout
        if stream is None:  # pragma: no cover - always a pipe
            return
        log = self._log
        pending = b""
        pid = proc.pid
        try:
            while True:
                chunk = stream.read1(_READ_CHUNK)  # type: ignore[attr-defined]
                if not chunk:
                    break
                log.touch()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > MAX_LINE:
                    lines.append(pending)
                    pending = b""
                for raw in lines:
                    self._emit(log, pid, raw)
        except (OSError, ValueError):
            pass  # the pipe was closed by stop(); nothing more to read
        if pending:
            self._emit(log, pid, pending)

    @staticmethod
    def _emit(log: LogBuffer, pid: int, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")[:MAX_LINE]
        if not line.strip() or line.strip(".") == "":
            log.touch()  # progress dots and blank lines: activity, but not worth keeping
            return
        log.append(line)
        match = _LEVEL.match(line)
        level = _LEVELS.get(match.group("level"), logging.DEBUG) if match else logging.DEBUG
        if server_logger.isEnabledFor(level):
            server_logger.log(level, "[%d] %s", pid, line)

    # -- readiness -----------------------------------------------------------------------

    def wait_ready(
        self,
        timeout: float | None = None,
        stall_timeout: float | None = STALL_TIMEOUT,
        *,
        cancel: threading.Event | None = None,
    ) -> Self:
        """Block until ``/health`` answers 200 from this child.

        Args:
            timeout: total seconds allowed; None = no total limit (the stall timeout still
                applies).
            stall_timeout: seconds without any new server output before giving up; None =
                never count as stalled.
            cancel: set it from another thread to abandon the wait.

        Raises:
            ServerStartError: the child exited first (with exit code, decoded cause and log
                tail), was never started, or the wait was cancelled.
            ServerNotReadyError: the total or the stall timeout passed.
        """
        proc = self._proc
        if proc is None:
            msg = f"{self.name} was not started; call start() first"
            raise ServerStartError(msg)
        deadline = None if timeout is None else time.monotonic() + timeout
        first_ok: float | None = None
        while True:
            if cancel is not None and cancel.is_set():
                msg = f"waiting for {self.name} was cancelled"
                raise ServerStartError(msg, log_tail=self.logs(LOG_TAIL))
            code = proc.poll()
            if code is not None:
                raise self._exited_error(proc, code)
            port = self.port
            if port and probe_health(self.host, port, self.health_path) == 200:
                now = time.monotonic()
                first_ok = first_ok or now
                if self._confirmed(port) or now - first_ok >= CONFIRM_WINDOW:
                    if proc.poll() is None:
                        self.ready_after = now - self._started_at
                        logger.info(
                            "%s pid %d ready at %s after %.3fs",
                            self.name, proc.pid, self.url, self.ready_after,
                        )  # fmt: skip
                        return self
                    continue
            else:
                first_ok = None
            now = time.monotonic()
            if stall_timeout is not None and now - self._log.last_activity > stall_timeout:
                reason = f"no output for {stall_timeout:g}s while loading: it stalled"
                raise ServerNotReadyError(self.url, stall_timeout, reason, self.logs(LOG_TAIL))
            if deadline is not None and now >= deadline:
                assert timeout is not None  # noqa: S101 - deadline implies timeout
                raise ServerNotReadyError(
                    self.url, timeout, "total start timeout", self.logs(LOG_TAIL)
                )
            # llama-server logs "listening on" the moment it turns ready: wake up for it
            # rather than finishing the 10 ms tick (it only wakes us once).
            if self._log.listening_seen.is_set():
                time.sleep(POLL_INTERVAL)
            else:
                self._log.listening_seen.wait(POLL_INTERVAL)

    def _confirmed(self, port: int) -> bool:
        listening = self._log.listening
        return listening is not None and listening[1] == port

    def _exited_error(self, proc: subprocess.Popen[bytes], code: int) -> ServerStartError:
        reader = self._reader
        if reader is not None:
            reader.join(READER_JOIN_TIMEOUT)
        tail = self.logs(LOG_TAIL)
        self.failure = diagnose(self.logs(), code)
        msg = f"{self.name} (pid {proc.pid}) exited before it was ready"
        return ServerStartError(msg, code, str(self.failure), tail)

    def check_alive(self) -> None:
        """Raise if the child has exited since it became ready (a crash).

        Raises:
            ServerStartError: the child is not running; carries exit code, cause and log tail.
        """
        proc = self._proc
        if proc is None:
            msg = f"{self.name} was not started"
            raise ServerStartError(msg)
        code = proc.poll()
        if code is not None:
            reader = self._reader
            if reader is not None:
                reader.join(READER_JOIN_TIMEOUT)
            self.failure = diagnose(self.logs(), code)
            msg = f"{self.name} (pid {proc.pid}) is not running"
            raise ServerStartError(msg, code, str(self.failure), self.logs(LOG_TAIL))

    # -- stop ----------------------------------------------------------------------------

    def stop(self, grace: float | None = None) -> int | None:
        """Stop the child: SIGTERM to its process group, wait ``grace`` s, then SIGKILL.

        A second SIGTERM follows after :data:`TERM_REPEAT` s: llama-server loses a SIGTERM
        that arrives in the instant between becoming ready and entering its main loop, and
        exits at once on a second one.

        Idempotent; safe to call from several threads, after a crash and at exit. On Windows
        the group gets ``CTRL_BREAK_EVENT`` instead of SIGTERM (:func:`~llama_proc._proc.stop_tree`).

        Returns:
            The exit status, or None if it was never started.
        """
        grace = self.stop_grace if grace is None else grace
        with self._lock:
            proc = self._proc
            if proc is None:
                return None
            if proc.poll() is None:
                # A SIGTERM that lands between llama-server installing its handler and
                # entering its main loop is lost (start_loop() sets running=true again); its
                # handler treats a second signal as "exit now".
                stop_tree(proc, grace, repeat_after=min(TERM_REPEAT, grace))
                logger.debug("stopped %s pid %d (exit %s)", self.name, proc.pid, proc.returncode)
            self._cleanup()
            return proc.returncode

    def _cleanup(self) -> None:
        proc = self._proc
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(READER_JOIN_TIMEOUT)
        if proc is not None and proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.release()
        _unregister(self)

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = (
            "running" if self.is_running else f"exited {self.returncode}" if self._proc else "new"
        )
        return f"<ServerProcess {self.name} pid={self.pid} {state} {self.url}>"
