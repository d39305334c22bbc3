"""RPC workers on loopback: the protocol probe, RpcWorker's lifecycle and ``llama-proc rpc-worker``.

Everything that a real worker can show runs the real ``ggml-rpc-server`` from the run's rpc
install. Only a worker of *another* llama.cpp build (a different protocol version), a peer that
hangs up or one that never answers are faked (tests/helpers/rpc_fakes.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rpc_fakes import FakeRpcWorker

from llama_proc.errors import (
    InvalidArgumentError,
    ServerNotReadyError,
    ServerStartError,
)
from llama_proc.runtime.rpc import (
    RpcVersion,
    RpcWorker,
    RpcWorkerError,
    WorkerInfo,
    check_bind_host,
    check_workers,
    explain_rpc_failure,
    find_rpc_server,
    local_rpc_version,
    parse_endpoint,
    probe_worker,
    rpc_protocol_version,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llama_proc.provision import Install

REPO = Path(__file__).resolve().parents[2]
WAIT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); count it as gone when /proc says so.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state != "Z"


def wait_gone(pid: int, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def worker_bin(rpc_install: Install) -> Path:
    return rpc_install.binary("rpc-server")


# ----------------------------------------------------------------------------- pure checks
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("10.0.0.2:50052", ("10.0.0.2", 50052), id="ipv4"),
        pytest.param("gpu-box.lan:1", ("gpu-box.lan", 1), id="name"),
        pytest.param(" 127.0.0.1:65535 ", ("127.0.0.1", 65535), id="spaces"),
    ],
)
def test_parse_endpoint(text, expected):
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    "text",
    ["10.0.0.2", "10.0.0.2:", ":50052", "h:0", "h:70000", "h:port", "a:1,b:2"],
)
def test_parse_endpoint_refuses(text):
    with pytest.raises(InvalidArgumentError, match="RPC worker"):
        parse_endpoint(text)


def test_bind_host_policy():
    assert check_bind_host("127.0.0.1", allow_remote=False) is True
    assert check_bind_host("127.0.0.2", allow_remote=False) is True
    with pytest.raises(InvalidArgumentError, match="no authentication") as err:
        check_bind_host("192.168.1.5", allow_remote=False)
    assert "--allow-remote" in str(err.value)
    assert "\n" not in str(err.value)
    assert check_bind_host("192.168.1.5", allow_remote=True) is False
    assert check_bind_host("0.0.0.0", allow_remote=True) is False
    with pytest.raises(InvalidArgumentError, match="IPv4"):
        check_bind_host("localhost", allow_remote=True)


def test_explain_rpc_failure():
    assert explain_rpc_failure(["I load", "E Failed to connect to 10.0.0.9:50052"]) == (
        "llama-server could not connect to RPC worker 10.0.0.9:50052; start it "
        "(llama-proc rpc-worker) and check the address"
    )
    assert "v6.0.0" in (explain_rpc_failure(["E RPC server version mismatch: 6.0.0"]) or "")
    aborted = [
        "0.00.013.349 E RPC server version mismatch: 6.1.0",
        "/src/ggml-rpc.cpp:550: RPC handshake failed for 10.0.0.9:50052",
        "#0 0x00007f in __GI___wait4 ()",
    ]
    assert explain_rpc_failure(aborted) == (
        "RPC worker 10.0.0.9:50052 speaks RPC protocol v6.1.0, not this llama-server's: run "
        "the same llama.cpp build on both ends"
    )
    assert "crashed" in (
        explain_rpc_failure(["Remote RPC server crashed or returned malformed response"]) or ""
    )
    assert "GGML_RPC" in (explain_rpc_failure(["RPC not supported in this build"]) or "")
    assert explain_rpc_failure(["I all good"]) is None


# ----------------------------------------------------------------------------- probe (fakes)
def test_probe_reads_version_and_devices():
    with FakeRpcWorker(version=(7, 0, 0), devices=((10 << 20, 20 << 20), (5 << 20, 8 << 20))) as w:
        info = probe_worker("127.0.0.1", w.port, timeout=WAIT)
    assert info.version == RpcVersion(7, 0, 0)
    assert [(d.free, d.total) for d in info.devices or ()] == [
        (10 << 20, 20 << 20),
        (5 << 20, 8 << 20),
    ]
    assert info.endpoint == w.endpoint
    assert "RPC protocol v7.0.0" in info.describe()


def test_probe_unknown_major_sends_nothing_but_hello():
    with FakeRpcWorker(version=(8, 1, 0)) as w:
        info = probe_worker("127.0.0.1", w.port, timeout=WAIT)
    assert info.version == RpcVersion(8, 1, 0)
    assert info.devices is None
    assert w.commands == [14]


def test_probe_closed_port_names_the_worker():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RpcWorkerError) as err:
        probe_worker("127.0.0.1", port, timeout=WAIT)
    assert time.monotonic() - start < 2
    text = str(err.value)
    assert f"127.0.0.1:{port}" in text
    assert "connection refused" in text
    assert isinstance(err.value, ServerStartError)


def test_probe_busy_worker_times_out_with_reason():
    with FakeRpcWorker("silent") as w:
        start = time.monotonic()
        with pytest.raises(RpcWorkerError, match="busy serving another client"):
            probe_worker("127.0.0.1", w.port, timeout=0.5)
        assert time.monotonic() - start < 3


def test_probe_peer_hanging_up_means_other_protocol():
    with FakeRpcWorker("close") as w, pytest.raises(RpcWorkerError, match="another RPC protocol"):
        probe_worker("127.0.0.1", w.port, timeout=WAIT)


def test_probe_refuses_absurd_answer():
    with FakeRpcWorker("oversized") as w, pytest.raises(RpcWorkerError, match="not an rpc-server"):
        probe_worker("127.0.0.1", w.port, timeout=WAIT)


def test_check_workers_version_mismatch_names_worker_and_versions():
    with FakeRpcWorker(version=(7, 0, 0)) as good, FakeRpcWorker(version=(6, 1, 0)) as old:
        with pytest.raises(RpcWorkerError) as err:
            check_workers([good.endpoint, old.endpoint], WAIT, expected=RpcVersion(7, 0, 0))
        text = str(err.value)
        assert old.endpoint in text
        assert "v6.1.0" in text
        assert "v7.0.0" in text
        assert "same llama.cpp build" in text
        # Without an expected version the workers must at least agree with each other.
        with pytest.raises(RpcWorkerError, match=r"v6\.1\.0 but .* speaks v7\.0\.0"):
            check_workers([good.endpoint, old.endpoint], WAIT)
        infos = check_workers([good.endpoint], WAIT, expected=RpcVersion(7, 0, 0))
        assert [i.endpoint for i in infos] == [good.endpoint]


def test_check_workers_reports_first_failure_in_order_and_in_parallel():
    dead = f"127.0.0.1:{free_port()}"
    with FakeRpcWorker("silent") as busy1, FakeRpcWorker("silent") as busy2:
        start = time.monotonic()
        with pytest.raises(RpcWorkerError) as err:
            check_workers([busy1.endpoint, busy2.endpoint, dead], 1.0)
        # Probed in parallel: about one timeout, not three.
        assert time.monotonic() - start < 2.5
    assert busy1.endpoint in str(err.value)


def test_check_workers_refuses_bad_lists():
    with pytest.raises(InvalidArgumentError, match="listed twice"):
        check_workers(["127.0.0.1:1", "127.0.0.1:1"])
    with pytest.raises(InvalidArgumentError, match="at most 16"):
        check_workers([f"127.0.0.1:{p}" for p in range(1, 18)])
    assert check_workers([]) == []


# ----------------------------------------------------------------------------- real worker
@contextlib.contextmanager
def started(worker: RpcWorker) -> Iterator[RpcWorker]:
    """Start without waiting (to test wait_ready itself); always stop."""
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def test_worker_lifecycle(worker_bin, caplog):
    caplog.set_level(logging.DEBUG, logger="llama_proc.llama_server")
    worker = RpcWorker(worker_bin, threads=1)
    assert worker.pid is None
    assert worker.stop() is None
    with pytest.raises(ServerStartError, match="not started"):
        worker.wait_ready(1)
    worker.start()
    try:
        info = worker.wait_ready(WAIT * 6)
        assert worker.is_running
        assert info is worker.info
        assert info.endpoint == worker.endpoint == f"127.0.0.1:{worker.port}"
        assert info.devices
        assert info.devices[0].total > 0
        # The same answer from outside.
        again = probe_worker("127.0.0.1", worker.port, timeout=WAIT)
        assert again.version == info.version
        logs = "\n".join(worker.logs())
        assert f"Starting RPC server v{info.version}" in logs
        assert f"endpoint       : 127.0.0.1:{worker.port}" in logs
        # Worker output also reaches the llama_proc.llama_server logger, like llama-server's.
        assert any("Starting RPC server" in r.getMessage() for r in caplog.records)
        with pytest.raises(ServerStartError, match="already running"):
            worker.start()
    finally:
        code = worker.stop()
    pid = worker.pid
    assert pid is not None
    assert wait_gone(pid)
    assert code is not None
    assert not worker.is_running
    assert worker.stop() == code  # idempotent
    with pytest.raises(RpcWorkerError, match="connection refused"):
        probe_worker("127.0.0.1", worker.port, timeout=WAIT)


def test_worker_context_manager_starts_waits_and_stops(worker_bin):
    with RpcWorker(worker_bin, threads=1) as worker:
        assert worker.info is not None
        assert worker.is_running
        pid = worker.pid
    assert pid is not None
    assert wait_gone(pid)


def test_check_workers_against_real_worker_and_build_version(worker_bin):
    version = rpc_protocol_version(worker_bin)
    assert version.major >= 1
    with RpcWorker(worker_bin, threads=1) as worker:
        infos = check_workers([worker.endpoint], WAIT, expected=version)
        assert isinstance(infos[0], WorkerInfo)
        assert infos[0].version == version
        mismatch = RpcVersion(version.major + 1, 0, 0)
        with pytest.raises(RpcWorkerError, match=f"speaks RPC protocol v{version}"):
            check_workers([worker.endpoint], WAIT, expected=mismatch)


def test_real_worker_in_use_is_reported_busy(worker_bin):
    with RpcWorker(worker_bin, threads=1) as worker:
        # Hold the worker the way llama-server does: one open session after HELLO.
        with socket.create_connection(("127.0.0.1", worker.port), timeout=WAIT) as holder:
            holder.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
            size = struct.unpack("<Q", holder.recv(8, socket.MSG_WAITALL))[0]
            holder.recv(size, socket.MSG_WAITALL)
            with pytest.raises(RpcWorkerError, match="busy serving another client"):
                check_workers([worker.endpoint], 1.0)
        # The abandoned probe must not kill the worker when it finally reads it (upstream
        # rpc-server dies of SIGPIPE when it answers a client that closed normally).
        time.sleep(0.3)
        assert worker.is_running, worker.logs(5)
        # Once the holder has left, the worker serves the next client again.
        assert worker.info is not None
        assert check_workers([worker.endpoint], WAIT)[0].version == worker.info.version


def test_port_in_use_is_a_clear_start_error(worker_bin):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        with started(RpcWorker(worker_bin, port=port, threads=1)) as worker:
            with pytest.raises(ServerStartError) as err:
                worker.wait_ready(WAIT * 6)
            assert not worker.is_running
    text = str(err.value)
    assert f"127.0.0.1:{port}" in text
    assert "in use" in text
    assert "Failed to create server socket" in "\n".join(err.value.log_tail)


def test_free_port_taken_before_bind_is_retried(worker_bin, monkeypatch):
    from llama_proc._proc import free_port as real_free_port
    from llama_proc.runtime.rpc import worker as rpc

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        monkeypatch.setattr(
            rpc, "free_port", lambda host: next(ports, None) or real_free_port(host)
        )
        with started(RpcWorker(worker_bin, threads=1)) as worker:
            assert worker.port == taken
            info = worker.wait_ready(WAIT * 6)
            assert worker.port != taken
            assert info.port == worker.port
            assert worker.is_running


def test_refusals_before_spawning(worker_bin, tmp_path):
    with pytest.raises(InvalidArgumentError, match="allow-remote"):
        RpcWorker(worker_bin, host="192.0.2.10")
    with pytest.raises(InvalidArgumentError, match="port"):
        RpcWorker(worker_bin, port=70000)
    with pytest.raises(InvalidArgumentError, match="threads"):
        RpcWorker(worker_bin, threads=0)
    with pytest.raises(ServerStartError, match="does not exist"):
        RpcWorker(tmp_path / "nope").start()
    help_text = subprocess.run(
        [str(worker_bin), "--help"], capture_output=True, text=True, timeout=30
    )
    if "--mem" not in help_text.stdout + help_text.stderr:
        with pytest.raises(InvalidArgumentError, match="no --mem option"):
            RpcWorker(worker_bin, mem=1024).start()


def test_unknown_device_fails_fast_with_log(worker_bin):
    worker = RpcWorker(worker_bin, devices=["NoSuchDevice0"])
    with started(worker), pytest.raises(ServerStartError) as err:
        worker.wait_ready(WAIT * 6)
    assert "unknown --device" in str(err.value)
    assert "NoSuchDevice0" in "\n".join(err.value.log_tail)


def test_not_ready_in_time_is_a_timeout(tmp_path):
    # A stand-in that lives but never listens: ServerNotReadyError after the deadline.
    script = tmp_path / "never-listens"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    with started(RpcWorker(script, threads=1)) as worker:
        with pytest.raises(ServerNotReadyError) as err:
            worker.wait_ready(0.5)
        pid = worker.pid
    assert "connection refused" in str(err.value)
    assert pid is not None
    assert wait_gone(pid)


# ----------------------------------------------------------------------------- the CLI
def cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "llama_proc", "rpc-worker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def ready_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the worker's own ready timeout is passed below
    assert line.startswith("llama-proc rpc-worker: ready at "), line
    return line


def worker_pid(line: str) -> int:
    return int(line.split("; pid ")[1].split(";", maxsplit=1)[0])


def test_cli_refuses_non_loopback_in_one_line():
    start = time.monotonic()
    proc = cli("--host", "192.0.2.10", "--port", "50052")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert time.monotonic() - start < 30
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "refusing to bind the RPC worker to 192.0.2.10" in lines[0]
    assert "--allow-remote" in lines[0]
    assert out == ""


def test_cli_allow_remote_warns_loudly(worker_bin):
    # 192.0.2.10 (TEST-NET-1) is on no interface here: the worker warns, then fails to bind,
    # so nothing is ever exposed while the warning and the error path are both checked.
    proc = cli(
        "--host", "192.0.2.10", "--port", str(free_port()), "--allow-remote",
        "--binary", str(worker_bin), "--ready-timeout", "60",
    )  # fmt: skip
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 1
    assert "NO authentication and NO encryption" in err
    assert "WARNING: the RPC worker listens on 192.0.2.10" in err
    assert "could not bind 192.0.2.10" in err
    assert out == ""


def test_cli_runs_worker_and_stops_on_sigterm(worker_bin):
    port = free_port()
    proc = cli("--port", str(port), "--threads", "1", "--binary", str(worker_bin))
    try:
        line = ready_line(proc)
        pid = worker_pid(line)
        assert f"--rpc 127.0.0.1:{port}" in line
        assert probe_worker("127.0.0.1", port, timeout=WAIT).port == port
        assert pid_alive(pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Starting RPC server" in err  # worker log echoed on stderr
    assert "llama-proc rpc-worker: stopped" in err
    assert wait_gone(pid)


def test_cli_owner_sigkill_leaves_no_worker(worker_bin):
    port = free_port()
    proc = cli("--port", str(port), "--threads", "1", "--binary", str(worker_bin))
    try:
        pid = worker_pid(ready_line(proc))
        assert pid_alive(pid)
        proc.kill()  # SIGKILL: no handler, no cleanup code runs in the owner
        proc.communicate(timeout=30)
        assert wait_gone(pid), "the worker outlived its owner"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    with pytest.raises(RpcWorkerError, match="connection refused"):
        probe_worker("127.0.0.1", port, timeout=WAIT)


# ----------------------------------------------------------------------------- LlamaServer(rpc=)
def test_build_version_comes_from_the_sibling_worker(rpc_install, worker_bin, tmp_path):
    assert find_rpc_server(rpc_install.server_binary) == worker_bin
    assert local_rpc_version(rpc_install.server_binary) == rpc_protocol_version(worker_bin)
    lonely = tmp_path / "llama-server"
    lonely.write_text("#!/bin/sh\n")
    assert find_rpc_server(lonely) is None
    assert local_rpc_version(lonely) is None


def test_llama_server_refuses_unreachable_worker_before_spawning(rpc_install, smol_model):
    from llama_proc.server import LlamaServer

    dead = f"127.0.0.1:{free_port()}"
    server = LlamaServer(smol_model, binary=rpc_install.server_binary, rpc=[dead], n_gpu_layers=99)
    start = time.monotonic()
    with pytest.raises(RpcWorkerError) as err:
        server.start(timeout=60)
    assert time.monotonic() - start < 30
    assert dead in str(err.value)
    assert "connection refused" in str(err.value)
    assert server.logs() == []  # llama-server was never spawned


def test_llama_server_refuses_worker_of_another_build(rpc_install, smol_model):
    from llama_proc.server import LlamaServer

    with FakeRpcWorker(version=(6, 1, 0)) as other_build:
        server = LlamaServer(
            smol_model,
            binary=rpc_install.server_binary,
            rpc=[other_build.endpoint],
            n_gpu_layers=99,
        )
        with pytest.raises(ServerStartError) as err:
            server.start(timeout=60)
        server.stop()
    text = str(err.value)
    assert "6.1.0" in text
    assert "same llama.cpp build" in text


def test_llama_server_uses_a_real_worker(rpc_install, smol_model):
    from llama_proc.server import LlamaServer

    with (
        RpcWorker(rpc_install.binary("rpc-server"), threads=1) as worker,
        LlamaServer(
            smol_model,
            binary=rpc_install.server_binary,
            rpc=[worker.endpoint],
            n_gpu_layers=99,
            ctx_size=512,
            extra_args=("-lv", "4"),
            start_timeout=120,
        ) as server,
    ):
        reply = server.chat(
            [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            max_tokens=16,
            temperature=0,
        )
        logs = "\n".join(server.logs())
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert f"[{worker.endpoint}] model buffer size" in logs
