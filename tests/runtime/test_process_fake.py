"""ServerProcess against the fake server: faults a real llama-server cannot be made to produce.

Everything that a real server can show (bad flag, bad model, port in use, crash, API key) is
tested against the real binary in test_server_real.py.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable

import pytest

from llama_proc.errors import (
    ServerNotReadyError,
    ServerStartError,
    ServerTimeoutError,
)
from llama_proc.runtime import process as process_module
from llama_proc.runtime.client import LlamaClient
from llama_proc.runtime.health import probe_health
from llama_proc.runtime.process import ServerProcess, child_environment
from llama_proc.server import reserve_port

Argv = Callable[..., list[str]]


def test_ready_then_stop(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, delay=0.3), port=port)
    assert proc.pid is None
    assert proc.stop() is None  # stop before start is a no-op
    proc.start()
    try:
        assert probe_health("127.0.0.1", port) in (None, 503)
        proc.wait_ready(timeout=20)
        assert proc.is_running
        assert proc.ready_after is not None
        assert proc.ready_after >= 0.3
        assert proc.url == f"http://127.0.0.1:{port}"
        assert any("listening on" in line for line in proc.logs())
        with pytest.raises(ServerStartError, match="already running"):
            proc.start()
    finally:
        code = proc.stop()
    assert code == -signal.SIGTERM
    assert not proc.is_running
    assert proc.stop() == code  # idempotent


def test_context_manager_and_restart(fake_argv: Argv) -> None:
    port = reserve_port()
    with ServerProcess(fake_argv(port, delay=0.05), port=port) as proc:
        first = proc.pid
        assert probe_health("127.0.0.1", port) == 200
    assert not proc.is_running
    proc.start().wait_ready(timeout=20)  # the same object can run again
    try:
        assert proc.pid != first
    finally:
        proc.stop()


def test_exit_before_ready_carries_code_cause_and_log(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, "exit", "--exit-code", "3", delay=0.1), port=port)
    proc.start()
    with pytest.raises(ServerStartError) as info:
        proc.wait_ready(timeout=20)
    err = info.value
    assert err.returncode == 3
    assert err.cause.startswith("bad model file: invalid magic characters")
    assert any("failed to load model" in line for line in err.log_tail)
    assert "exit code 3" in str(err)
    assert proc.failure is not None
    assert proc.failure.kind == "bad_model"
    proc.stop()


def test_total_timeout(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, "never-ready"), port=port)
    proc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ServerNotReadyError, match="total start timeout") as info:
            proc.wait_ready(timeout=0.8, stall_timeout=30)
        assert isinstance(info.value, TimeoutError)
        assert 0.8 <= time.monotonic() - started < 5
        assert any("still loading" in line for line in info.value.log_tail)
    finally:
        proc.stop()


def test_stall_timeout_fires_on_silence(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, "silent"), port=port)
    proc.start()
    try:
        with pytest.raises(ServerNotReadyError, match="stalled"):
            proc.wait_ready(timeout=30, stall_timeout=0.8)
    finally:
        proc.stop()


def test_progress_dots_count_as_activity(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, "dots"), port=port)
    proc.start()
    try:
        # dots arrive every 0.1 s without a newline: never stalled, only the total timeout fires
        with pytest.raises(ServerNotReadyError, match="total start timeout"):
            proc.wait_ready(timeout=1.5, stall_timeout=0.6)
        assert proc.logs() == [line for line in proc.logs() if set(line) != {"."}]
    finally:
        proc.stop()


def test_sigterm_ignored_escalates_to_sigkill(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, "ignore-term", delay=0.05), port=port)
    proc.start().wait_ready(timeout=20)
    started = time.monotonic()
    assert proc.stop(grace=0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 5


def test_a_lost_sigterm_is_repeated(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, "lose-first-term", delay=0.05), port=port)
    proc.start().wait_ready(timeout=20)
    started = time.monotonic()
    assert proc.stop(grace=8) == 1
    assert time.monotonic() - started < process_module.TERM_REPEAT + 2


def test_port_zero_is_learned_from_the_log(fake_argv: Argv) -> None:
    proc = ServerProcess(fake_argv(0, delay=0.1), port=0)
    proc.start()
    try:
        proc.wait_ready(timeout=20)
        assert proc.port != 0
        assert probe_health("127.0.0.1", proc.port) == 200
    finally:
        proc.stop()


def test_health_from_another_process_on_the_port_is_not_readiness(fake_argv: Argv) -> None:
    """Another server already answers /health 200 on the port; ours fails to bind and exits."""
    port = reserve_port()
    with ServerProcess(fake_argv(port, delay=0.0), port=port, name="squatter"):
        proc = ServerProcess(fake_argv(port, delay=0.0), port=port)
        proc.start()
        with pytest.raises(ServerStartError) as info:
            proc.wait_ready(timeout=20)
        assert proc.failure is not None
        assert proc.failure.kind == "port_in_use"
        assert info.value.returncode == 1
        proc.stop()


def test_without_listening_line_ready_after_confirm_window(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, "ready", "--no-listening-line", delay=0.0), port=port)
    proc.start()
    try:
        proc.wait_ready(timeout=20)
        assert proc.ready_after is not None
        assert proc.ready_after >= process_module.CONFIRM_WINDOW
    finally:
        proc.stop()


def test_child_environment_is_built_deliberately(
    fake_argv: Argv, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LLAMA_ARG_PORT": "1",
            "LLAMA_ARG_CTX_SIZE": "abc", "LLAMA_API_KEY": "leak", "AIP_MODE": "PREDICTION",
            "CUDA_VISIBLE_DEVICES": "0", "LLAMA_CACHE": "/c"}  # fmt: skip
    env = child_environment(base, extra={"LLAMA_API_KEY": "mine"})
    assert env == {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "CUDA_VISIBLE_DEVICES": "0",
                   "LLAMA_CACHE": "/c", "LLAMA_API_KEY": "mine", "XDG_CONFIG_HOME": os.devnull}  # fmt: skip
    # and a real child sees exactly that: the inherited LLAMA_ARG_* never reach it
    monkeypatch.setenv("LLAMA_ARG_PORT", "1")
    monkeypatch.setenv("LLAMA_API_KEY", "inherited")
    port = reserve_port()
    with ServerProcess(fake_argv(port, delay=0.0), port=port) as proc:
        seen = LlamaClient(proc.url)._json("GET", "/env")
    assert "LLAMA_ARG_PORT" not in seen
    assert "LLAMA_API_KEY" not in seen
    assert seen["PATH"] == os.environ["PATH"]


def test_missing_binary() -> None:
    proc = ServerProcess(["/nonexistent/llama-server"], port=1)
    with pytest.raises(ServerStartError, match="cannot run /nonexistent/llama-server"):
        proc.start()
    with pytest.raises(ServerStartError, match="not started"):
        proc.wait_ready()


def test_hang_after_health_hits_the_request_timeout(fake_argv: Argv) -> None:
    port = reserve_port()
    with ServerProcess(fake_argv(port, "hang-after-health", delay=0.0), port=port) as proc:
        client = LlamaClient(proc.url, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ServerTimeoutError, match=r"sent nothing for 0\.5 s"):
            client.models()
        assert time.monotonic() - started < 5
        client.close()


def test_log_buffer_is_bounded_and_logged(
    fake_argv: Argv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llama_proc.llama_server")
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, "never-ready"), port=port, log_capacity=5)
    proc.start()
    try:
        with pytest.raises(ServerNotReadyError):
            proc.wait_ready(timeout=1.2)
    finally:
        proc.stop()
    assert len(proc.logs()) == 5
    assert proc.logs(2) == proc.logs()[-2:]
    records = [r for r in caplog.records if r.name == "llama_proc.llama_server"]
    assert len(records) > 5
    assert f"[{proc.pid}]" in records[0].getMessage()


def test_crash_after_ready_is_detected(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, delay=0.0), port=port)
    proc.start().wait_ready(timeout=20)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while proc.is_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not proc.is_running
    with pytest.raises(ServerStartError, match="is not running") as info:
        proc.check_alive()
    assert info.value.returncode == -signal.SIGKILL
    assert "SIGKILL" in info.value.cause
    assert proc.stop() == -signal.SIGKILL


def test_atexit_hook_stops_live_servers(fake_argv: Argv) -> None:
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, delay=0.0), port=port)
    proc.start().wait_ready(timeout=20)
    assert proc in process_module._LIVE
    process_module._stop_all()
    assert not proc.is_running
    assert proc not in process_module._LIVE


def test_reserve_port_gives_a_bindable_port() -> None:
    port = reserve_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX job control")
def test_stopping_a_stopped_server_does_not_wait_out_the_grace(fake_argv: Argv) -> None:
    # A SIGSTOPped process never handles SIGTERM: without a SIGCONT the stop waits the whole
    # grace period before its SIGKILL.
    port = reserve_port()
    proc = ServerProcess(fake_argv(port, delay=0.05), port=port)
    proc.start().wait_ready(timeout=20)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGSTOP)
    started = time.monotonic()
    code = proc.stop(grace=10)
    assert time.monotonic() - started < 2, code
    assert code is not None
    assert not proc.is_running
