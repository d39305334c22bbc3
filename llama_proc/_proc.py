"""Child-process mechanics shared by every layer: stop a tree, run with a timeout, free port.

A private leaf (stdlib only): provisioning (probes, builds, the smoke check) and the runtime
(llama-server, RPC workers) stop and time out their children the same way, so a fix to one
of these lands everywhere.

Every child meant to be stopped as a tree is started in its own process group
(:func:`group_popen_kwargs`): on POSIX a new session, whose id is the child's pid, so one
``killpg`` reaches everything it started; on Windows a new process group, which can receive
``CTRL_BREAK_EVENT`` and is killed with ``taskkill /T``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "KILL_WAIT",
    "Ran",
    "free_port",
    "group_popen_kwargs",
    "kill_tree",
    "run_with_timeout",
    "signal_tree",
    "stop_tree",
]

logger = logging.getLogger(__name__)

KILL_WAIT: Final = 5.0
"""Seconds to wait for a killed process to be reaped (and for ``taskkill`` to finish)."""
DRAIN_WAIT: Final = 1.0
"""Seconds to collect the output a timed-out command left in its pipe after the kill."""


def group_popen_kwargs() -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments that start the child in its own process group.

    Returns:
        ``start_new_session=True`` on POSIX; on Windows ``CREATE_NEW_PROCESS_GROUP`` (so
        :func:`stop_tree` can send ``CTRL_BREAK_EVENT``) and ``CREATE_NO_WINDOW``.
    """
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def signal_tree(proc: subprocess.Popen[Any], sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group (POSIX) or ``proc`` itself (Windows).

    A group that is already gone is not an error. On Windows ``SIGKILL`` (or any signal but
    ``SIGINT``/``SIGTERM``) kills the tree; ``SIGINT``/``SIGTERM`` become ``CTRL_BREAK_EVENT``.
    """
    if sys.platform == "win32":
        if sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(OSError):
                proc.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            kill_tree(proc)
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        # The child left our group's reach (e.g. it changed credentials): signal it alone.
        with contextlib.suppress(OSError):
            proc.send_signal(sig)


def kill_tree(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` and everything in its process group at once; does not wait."""
    if sys.platform == "win32":
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                capture_output=True,
                timeout=KILL_WAIT,
                check=False,
            )
        with contextlib.suppress(OSError):
            proc.kill()
        return
    signal_tree(proc, signal.SIGKILL)


def stop_tree(
    proc: subprocess.Popen[Any],
    grace: float,
    *,
    first_signal: int = signal.SIGTERM,
    repeat_after: float | None = None,
) -> int | None:
    """Stop ``proc``'s process tree: a first signal, up to ``grace`` seconds, then a kill.

    On POSIX each stop signal is followed by ``SIGCONT``: a stopped process (SIGSTOP, a
    debugger, a wedge test) leaves SIGTERM pending until it runs again, so without it every
    stop of a stopped process would wait out the whole grace before the kill.

    Args:
        proc: a child started with :func:`group_popen_kwargs`.
        grace: seconds to wait after the first signal before killing the tree.
        first_signal: ``SIGTERM`` for servers; ``SIGINT`` lets a CMake/Ninja build stop like
            after Ctrl-C. On Windows either one is sent as ``CTRL_BREAK_EVENT``.
        repeat_after: send the first signal once more after this many seconds (llama-server
            loses a SIGTERM that arrives while it turns ready, and exits on a second one).

    Returns:
        The exit status, or None when the process could not be reaped after the kill.
    """
    if proc.poll() is not None:
        return proc.returncode
    _signal_running(proc, first_signal)
    waited = 0.0
    if repeat_after is not None and repeat_after < grace:
        try:
            return proc.wait(repeat_after)
        except subprocess.TimeoutExpired:
            _signal_running(proc, first_signal)
            waited = repeat_after
    try:
        return proc.wait(max(grace - waited, 0.0))
    except subprocess.TimeoutExpired:
        logger.warning("pid %d ignored its stop signal for %gs; killing it", proc.pid, grace)
    kill_tree(proc)
    try:
        return proc.wait(KILL_WAIT)
    except subprocess.TimeoutExpired:
        return None


def _signal_running(proc: subprocess.Popen[Any], sig: int) -> None:
    """Send ``sig``, then continue the group so a stopped process can act on it at once."""
    signal_tree(proc, sig)
    if sys.platform != "win32":
        signal_tree(proc, signal.SIGCONT)


@dataclass(frozen=True)
class Ran:
    """What :func:`run_with_timeout` saw."""

    returncode: int | None
    """Exit status (negative = killed by that signal); None when it timed out."""
    output: str
    """stdout and stderr interleaved, decoded as UTF-8 (invalid bytes replaced)."""

    @property
    def timed_out(self) -> bool:
        """Whether the command was killed for running past its timeout."""
        return self.returncode is None


def run_with_timeout(
    argv: Sequence[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Ran | None:
    """Run ``argv`` with no stdin, collecting its output, for at most ``timeout`` seconds.

    The command runs in its own process group, so on timeout everything it started is killed
    and nothing it left behind can keep the output pipe open.

    Args:
        argv: the command line.
        timeout: seconds before the tree is killed.
        env: the child's environment (default: this process's).
        cwd: the child's working directory.

    Returns:
        The exit status and output (``returncode`` None after a timeout), or None when the
        command could not be started at all (missing, not executable, wrong format).
    """
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            **group_popen_kwargs(),
        )
    except (OSError, ValueError) as err:
        logger.debug("cannot run %s: %s", argv[0] if argv else argv, err)
        return None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out = b""
        with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
            out, _ = proc.communicate(timeout=DRAIN_WAIT)
        return Ran(None, (out or b"").decode("utf-8", errors="replace"))
    return Ran(proc.returncode, out.decode("utf-8", errors="replace"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (another process may take it later).

    Raises:
        OSError: ``host`` is not an address of this machine.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
