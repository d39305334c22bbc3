"""Tie a child's life to its owner, so a crashed or killed Python process leaves no server.

A llama-server outliving its owner holds a port and, worse, gigabytes of VRAM. ``atexit`` and
``stop()`` cover normal exits; these cover SIGKILL, segfaults and ``os._exit``:

Linux -- ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in the child between fork and exec. The kernel
    sends the signal when the *thread* that forked the child exits, not the process, so every
    child is forked by one long-lived daemon thread (:func:`spawn`) instead of whichever thread
    called ``start()`` (a ``ThreadPoolExecutor`` worker or ``asyncio.to_thread`` would
    otherwise take the server down with it when the pool shrinks). The hook runs as
    ``preexec_fn``, which CPython documents as unsafe when other threads exist because the
    forked child may need a lock another thread held at fork time. The hook here only calls
    a ``prctl`` function pointer resolved before the fork and ``getppid``; it imports nothing
    and touches no Python-level lock, which keeps it within what is safe after ``fork``. If
    the owner died between fork and ``prctl`` (``getppid()`` no longer matches), the child
    kills itself.

macOS and other POSIX -- a watchdog process (:data:`WATCHDOG_CODE`, run with the current
    interpreter in its own session). It holds the read end of a pipe whose only write end
    stays in the owner; when the owner dies for any reason the kernel closes that end, the
    watchdog reads EOF and stops the server's process group (SIGTERM, grace, SIGKILL). It
    also exits by itself once the server's group is gone. The logic is platform-neutral and
    is tested on Linux. One gap remains: if the owner dies between spawning the server and
    spawning the watchdog (microseconds), the server is orphaned.

Windows -- every child is assigned to one Job Object created with
    ``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE``; the job handle lives as long as the owner process,
    and the kernel closes it (killing the job's processes) when the owner exits in any way.
    The child runs unassigned for the instant between creation and assignment.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "Lifetime",
    "Watchdog",
    "assign_to_job",
    "default_lifetime",
    "pdeathsig_preexec",
    "spawn",
    "start_watchdog",
]

logger = logging.getLogger(__name__)

Lifetime = Literal["auto", "pdeathsig", "watchdog", "job", "none"]
"""How a child is tied to its owner; "auto" picks the platform's mechanism."""

_PR_SET_PDEATHSIG: Final = 1
WATCHDOG_POLL: Final = 1.0
"""Seconds between the watchdog's checks that the server still exists."""

T = TypeVar("T")


def default_lifetime() -> Lifetime:
    """The mechanism "auto" means on this platform."""
    if sys.platform.startswith("linux"):
        return "pdeathsig"
    if sys.platform == "win32":
        return "job"
    return "watchdog"


# -- the spawner thread ----------------------------------------------------------------------


class _Spawner:
    """One daemon thread that runs every fork, so PR_SET_PDEATHSIG outlives caller threads."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._queue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            # After os.fork() in the owner the old thread object reports not alive.
            if self._thread is None or not self._thread.is_alive():
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._loop, args=(self._queue,), name="llama-proc-spawner", daemon=True
                )
                self._thread.start()
            self._queue.put((fn, future))
        return future.result()

    @staticmethod
    def _loop(
        jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]],
    ) -> None:
        while True:
            fn, future = jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                future.set_exception(err)


_SPAWNER: Final = _Spawner()


def spawn(fn: Callable[[], T]) -> T:
    """Run ``fn`` (which forks a child) on the long-lived spawner thread and return its result."""
    return _SPAWNER.run(fn)


# -- Linux: parent-death signal --------------------------------------------------------------


def pdeathsig_preexec(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``sig`` when its forking thread exits.

    Returns None where ``prctl`` is unavailable (not Linux, or no libc found).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        logger.warning("prctl is unavailable; llama-server will not die with its owner")
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    owner = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != owner:
            # The owner died before prctl took effect: the signal will never come.
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


# -- POSIX: pipe watchdog --------------------------------------------------------------------

WATCHDOG_CODE: Final = """
import os, select, signal, sys, time
fd, pgid, grace, poll = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
def gone():
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
while True:
    ready, _, _ = select.select([fd], [], [], poll)
    if ready:
        if not os.read(fd, 64):
            break
    elif gone():
        sys.exit(0)
if gone():
    sys.exit(0)
try:
    os.killpg(pgid, signal.SIGTERM)
    os.killpg(pgid, signal.SIGCONT)  # a stopped server handles SIGTERM only once continued
except ProcessLookupError:
    sys.exit(0)
deadline = time.monotonic() + grace
while time.monotonic() < deadline:
    if gone():
        sys.exit(0)
    time.sleep(0.05)
try:
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""
"""Source of the watchdog process (run as ``python -c``); see the module docstring."""


class Watchdog:
    """A running watchdog: :meth:`release` after a normal stop so it exits quietly."""

    def __init__(self, process: subprocess.Popen[bytes], write_fd: int) -> None:
        self.process = process
        self._write_fd: int | None = write_fd

    def release(self, timeout: float = 2.0) -> None:
        """Close the owner's end of the pipe and reap the watchdog.

        Call it after the server has been reaped: the watchdog then finds the group gone and
        exits without signalling anything.
        """
        fd, self._write_fd = self._write_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_watchdog(pgid: int, grace: float, python: str | None = None) -> Watchdog:
    """Start a watchdog that stops process group ``pgid`` when this process dies.

    Args:
        pgid: the server's process group (its pid: it was started in a new session).
        grace: seconds between SIGTERM and SIGKILL.
        python: interpreter to run the watchdog (default: this one).
    """
    read_fd, write_fd = os.pipe()  # both non-inheritable: only pass_fds hands one over
    try:
        process = subprocess.Popen(
            [python or sys.executable, "-S", "-c", WATCHDOG_CODE, str(read_fd), str(pgid),
             str(grace), str(WATCHDOG_POLL)],
            pass_fds=(read_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )  # fmt: skip
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return Watchdog(process, write_fd)


# -- Windows: Job Object ---------------------------------------------------------------------

_JOB: Any = None
_JOB_LOCK = threading.Lock()


def assign_to_job(process: subprocess.Popen[bytes]) -> bool:
    """Put ``process`` in this owner's kill-on-close Job Object (Windows only).

    Returns False (and logs why) when the job cannot be created or assigned; the server then
    only stops through ``stop()`` and ``atexit``.
    """
    if sys.platform != "win32":
        return False
    from ctypes import wintypes  # noqa: PLC0415 - Windows only

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)

    class _IoCounters(ctypes.Structure):
        _fields_ = [(n, ctypes.c_ulonglong) for n in (
            "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
            "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]  # fmt: skip

    class _BasicLimits(ctypes.Structure):
        _fields_ = [
            ("PerProcessUserTimeLimit", ctypes.c_int64),
            ("PerJobUserTimeLimit", ctypes.c_int64),
            ("LimitFlags", wintypes.DWORD),
            ("MinimumWorkingSetSize", ctypes.c_size_t),
            ("MaximumWorkingSetSize", ctypes.c_size_t),
            ("ActiveProcessLimit", wintypes.DWORD),
            ("Affinity", ctypes.c_size_t),
            ("PriorityClass", wintypes.DWORD),
            ("SchedulingClass", wintypes.DWORD),
        ]

    class _ExtendedLimits(ctypes.Structure):
        _fields_ = [
            ("BasicLimitInformation", _BasicLimits),
            ("IoInfo", _IoCounters),
            ("ProcessMemoryLimit", ctypes.c_size_t),
            ("JobMemoryLimit", ctypes.c_size_t),
            ("PeakProcessMemoryUsed", ctypes.c_size_t),
            ("PeakJobMemoryUsed", ctypes.c_size_t),
        ]

    job_object_extended_limit_information = 9
    job_object_limit_kill_on_job_close = 0x2000
    global _JOB  # noqa: PLW0603 - one job per owner process, closed by the kernel at exit
    with _JOB_LOCK:
        if _JOB is None:
            kernel32.CreateJobObjectW.restype = wintypes.HANDLE
            job = kernel32.CreateJobObjectW(None, None)
            if not job:
                logger.warning("CreateJobObjectW failed (%d)", ctypes.get_last_error())
                return False
            info = _ExtendedLimits()
            info.BasicLimitInformation.LimitFlags = job_object_limit_kill_on_job_close
            ok = kernel32.SetInformationJobObject(
                job, job_object_extended_limit_information, ctypes.byref(info), ctypes.sizeof(info)
            )
            if not ok:
                logger.warning("SetInformationJobObject failed (%d)", ctypes.get_last_error())
                kernel32.CloseHandle(job)
                return False
            _JOB = job
        handle = int(getattr(process, "_handle"))  # noqa: B009 - private on Windows Popen
        if not kernel32.AssignProcessToJobObject(_JOB, handle):
            logger.warning("AssignProcessToJobObject failed (%d)", ctypes.get_last_error())
            return False
    return True
