"""A server must not outlive its owner: parent-death signal, spawner thread, watchdog."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llama_proc.runtime.lifetime import default_lifetime, start_watchdog
from llama_proc.runtime.process import ServerProcess
from llama_proc.server import reserve_port

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses /proc and prctl (Linux)"
)

REPO = Path(__file__).resolve().parents[2]
Argv = Callable[..., list[str]]


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (exited; a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return _gone(pid)


def _run_owner(tmp_path: Path, body: str) -> tuple[subprocess.Popen[str], int]:
    """Run ``body`` in a separate Python owner; it prints ``PID <server pid>`` when ready."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert owner.stdout is not None
    line = owner.stdout.readline()
    if not line.startswith("PID "):
        owner.kill()
        owner.wait()
        pytest.fail(f"owner did not start the server: {line!r}")
    return owner, int(line.split()[1])


def _kill_owner(owner: subprocess.Popen[str]) -> None:
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    if owner.stdout is not None:
        owner.stdout.close()


def test_default_lifetime_on_linux() -> None:
    assert default_lifetime() == "pdeathsig"


def test_owner_killed_with_sigkill_leaves_no_llama_server(
    tmp_path: Path, llama_server_bin: Path, smol_model: Path
) -> None:
    owner, pid = _run_owner(
        tmp_path,
        f"""
        import threading, time
        from llama_proc.server import LlamaServer
        server = LlamaServer({str(smol_model)!r}, binary={str(llama_server_bin)!r}, ctx_size=512)
        # start from a short-lived thread: the child must survive the thread, not the process
        t = threading.Thread(target=server.start, kwargs={{"timeout": 120}})
        t.start(); t.join()
        time.sleep(0.3)
        print("PID", server.pid, flush=True)
        time.sleep(600)
        """,
    )
    try:
        assert not _gone(pid), "the server died with the thread that started it"
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"llama-server" in cmdline
    finally:
        _kill_owner(owner)
    assert _wait_gone(pid, 10), "llama-server outlived its SIGKILLed owner"


def test_child_survives_the_thread_that_started_it(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, delay=0.0), port=port, lifetime="pdeathsig")
    worker = threading.Thread(target=lambda: proc.start().wait_ready(timeout=20))
    worker.start()
    worker.join()
    try:
        time.sleep(0.3)
        assert proc.is_running
    finally:
        proc.stop()


def test_watchdog_stops_the_server_when_the_owner_dies(tmp_path: Path, fake_argv: Argv) -> None:
    port = reserve_port()
    owner, pid = _run_owner(
        tmp_path,
        f"""
        import time
        from llama_proc.runtime.process import ServerProcess
        proc = ServerProcess({fake_argv(port, delay=0.0)!r}, port={port}, lifetime="watchdog")
        proc.start().wait_ready(timeout=20)
        print("PID", proc.pid, flush=True)
        time.sleep(600)
        """,
    )
    try:
        assert not _gone(pid)
    finally:
        _kill_owner(owner)
    assert _wait_gone(pid, 10), "the watchdog did not stop the server"


def test_without_a_lifetime_tie_the_server_is_orphaned(tmp_path: Path, fake_argv: Argv) -> None:
    """The control experiment: the two tests above are not passing by accident."""
    port = reserve_port()
    owner, pid = _run_owner(
        tmp_path,
        f"""
        import time
        from llama_proc.runtime.process import ServerProcess
        proc = ServerProcess({fake_argv(port, delay=0.0)!r}, port={port}, lifetime="none")
        proc.start().wait_ready(timeout=20)
        print("PID", proc.pid, flush=True)
        time.sleep(600)
        """,
    )
    _kill_owner(owner)
    try:
        time.sleep(1.0)
        assert not _gone(pid)
    finally:
        os.killpg(pid, signal.SIGKILL)
    assert _wait_gone(pid, 10)


def test_watchdog_released_after_normal_stop(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, delay=0.0), port=port, lifetime="watchdog")
    proc.start().wait_ready(timeout=20)
    watchdog = proc._watchdog
    assert watchdog is not None
    assert watchdog.process.poll() is None
    proc.stop()
    assert watchdog.process.poll() == 0


def test_watchdog_exits_when_the_server_is_gone() -> None:
    target = subprocess.Popen(["sleep", "30"], start_new_session=True)
    watchdog = start_watchdog(target.pid, grace=1.0)
    try:
        target.kill()
        target.wait()
        watchdog.process.wait(10)  # it polls the group every WATCHDOG_POLL seconds
        assert watchdog.process.returncode == 0
    finally:
        watchdog.release()


def test_pdeathsig_follows_the_forking_thread() -> None:
    """Why the spawner thread exists: a child forked by a thread that exits is killed."""
    from llama_proc.runtime.lifetime import pdeathsig_preexec

    children: list[subprocess.Popen[bytes]] = []

    def fork_here() -> None:
        children.append(subprocess.Popen(["sleep", "30"], preexec_fn=pdeathsig_preexec()))  # noqa: PLW1509

    worker = threading.Thread(target=fork_here)
    worker.start()
    worker.join()
    child = children[0]
    assert child.wait(10) == -signal.SIGKILL


def test_interpreter_exit_stops_the_server(tmp_path: Path, fake_argv: Argv) -> None:
    """atexit: a normal exit without stop() stops the server (lifetime tie switched off)."""
    port = reserve_port()
    owner, pid = _run_owner(
        tmp_path,
        f"""
        from llama_proc.runtime.process import ServerProcess
        proc = ServerProcess({fake_argv(port, delay=0.0)!r}, port={port}, lifetime="none")
        proc.start().wait_ready(timeout=20)
        print("PID", proc.pid, flush=True)
        """,
    )
    assert owner.wait(30) == 0
    if owner.stdout is not None:
        owner.stdout.close()
    assert _wait_gone(pid, 5), "atexit did not stop the server"
