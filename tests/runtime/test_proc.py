"""The shared process helpers: stop a tree, run with a timeout, free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from llama_proc._proc import (
    free_port,
    group_popen_kwargs,
    run_with_timeout,
    stop_tree,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    Spawn = Callable[[str], tuple[subprocess.Popen[bytes], bytes]]

posix_only = pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")

# A parent that starts a grandchild in the same group, prints its pid, then waits forever.
_TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""
# Ignores SIGTERM (and SIGINT): only the kill after the grace period stops it.
_STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""
# Exits only on the second SIGTERM (like llama-server in the instant it turns ready).
_SECOND_TERM = """
import signal, sys, time
seen = []
def on_term(signum, frame):
    seen.append(signum)
    if len(seen) == 2:
        sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(0.01)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start ``python -c code`` in its own group; return it and its first output line."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(code: str) -> tuple[subprocess.Popen[bytes], bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, **group_popen_kwargs()
        )
        procs.append(proc)
        assert proc.stdout is not None
        return proc, proc.stdout.readline()

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@posix_only
def test_run_with_timeout_kills_the_whole_tree() -> None:
    started = time.monotonic()
    ran = run_with_timeout([sys.executable, "-c", _TREE], 1.0)
    assert ran is not None
    assert ran.timed_out
    assert time.monotonic() - started < 5.0
    grandchild = int(ran.output.split()[0])
    assert _wait_gone(grandchild), "the grandchild outlived the timeout"


def test_run_with_timeout_returns_status_and_interleaved_output() -> None:
    code = "import sys; print('out'); sys.stderr.write('err\\n'); sys.exit(3)"
    ran = run_with_timeout([sys.executable, "-c", code], 30.0, env={**os.environ, "X": "1"})
    assert ran is not None
    assert ran.returncode == 3
    assert not ran.timed_out
    assert "out" in ran.output
    assert "err" in ran.output


def test_run_with_timeout_none_when_it_cannot_run(tmp_path: Path) -> None:
    assert run_with_timeout([str(tmp_path / "missing")], 5.0) is None


@posix_only
def test_stop_tree_kills_after_grace_and_reaches_the_group(spawn: Spawn) -> None:
    proc, _ = spawn(_STUBBORN)
    started = time.monotonic()
    code = stop_tree(proc, 0.3)
    assert code == -signal.SIGKILL
    assert 0.25 <= time.monotonic() - started < 5.0


@posix_only
def test_stop_tree_first_signal_is_selectable(spawn: Spawn) -> None:
    proc, _ = spawn("import time; print('ready', flush=True); time.sleep(60)")
    assert stop_tree(proc, 5.0, first_signal=signal.SIGINT) in (-signal.SIGINT, 1)


@posix_only
def test_stop_tree_repeats_the_first_signal(spawn: Spawn) -> None:
    proc, _ = spawn(_SECOND_TERM)
    started = time.monotonic()
    assert stop_tree(proc, 10.0, repeat_after=0.2) == 7
    assert time.monotonic() - started < 5.0


@posix_only
def test_stop_tree_kills_grandchildren(spawn: Spawn) -> None:
    proc, line = spawn(_TREE)
    grandchild = int(line)
    stop_tree(proc, 2.0)
    assert _wait_gone(grandchild)


def test_stop_tree_on_an_exited_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], **group_popen_kwargs())
    proc.wait()
    assert stop_tree(proc, 1.0) == 0


def test_free_port_is_bindable() -> None:
    port = free_port("127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
