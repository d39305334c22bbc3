"""One model split across two RPC workers on separate hosts, simulated with network namespaces.

Three namespaces are made per run (a client and two workers), each worker joined to the client
by its own veth pair, with addresses (10.77.x.0/24) that exist only inside these namespaces.
The workers are real ``llama-proc rpc-worker`` processes bound to their namespace's address (so
``--allow-remote`` is needed, as on a real LAN); the client is a Python process in the client
namespace running ``LlamaServer(rpc=[...], n_gpu_layers=99)`` so the layers land on the
workers, and SmolLM2 must answer a question correctly. Then one worker host goes away and the
next start must fail before spawning, naming it. Needs root and iproute2 (``ip``); skipped with
the reason otherwise. Everything is torn down in a finalizer, also on failure: processes left
in the namespaces are killed, then the namespaces (and with them the veth pairs) are deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WORKER_PORT = 50052
STEP_TIMEOUT = 60.0
"""Seconds for any single step (namespace command, worker ready, model load, one answer)."""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False
    )


def _ip_ok(*args: str) -> None:
    out = _ip(*args)
    if out.returncode != 0:
        msg = f"ip {' '.join(args)} failed: {out.stderr.strip()}"
        raise RuntimeError(msg)


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    return None


class Netns:
    """A network namespace of this test run."""

    def __init__(self, name: str) -> None:
        self.name = name

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.name)
        return [int(p) for p in out.stdout.split()]


@pytest.fixture
def hosts() -> Iterator[tuple[Netns, list[tuple[Netns, str]]]]:
    """A client namespace and two worker namespaces with their addresses."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}-{secrets.token_hex(3)}"
    client = Netns(f"lp-c-{tag}")
    workers = [(Netns(f"lp-w{i}-{tag}"), f"10.77.{i}.2") for i in (1, 2)]
    made: list[Netns] = []
    try:
        probe = _ip("netns", "add", client.name)
        if probe.returncode != 0:
            pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
        made.append(client)
        _ip_ok("-n", client.name, "link", "set", "lo", "up")
        for i, (ns, address) in enumerate(workers, start=1):
            _ip_ok("netns", "add", ns.name)
            made.append(ns)
            _ip_ok("-n", ns.name, "link", "set", "lo", "up")
            # Create both veth ends directly inside the namespaces: nothing touches the host's.
            near, far = f"to-w{i}", "to-client"
            _ip_ok("link", "add", near, "netns", client.name, "type", "veth",
                   "peer", "name", far, "netns", ns.name)  # fmt: skip
            _ip_ok("-n", client.name, "addr", "add", f"10.77.{i}.1/24", "dev", near)
            _ip_ok("-n", ns.name, "addr", "add", f"{address}/24", "dev", far)
            _ip_ok("-n", client.name, "link", "set", near, "up")
            _ip_ok("-n", ns.name, "link", "set", far, "up")
        yield client, workers
    finally:
        for ns in made:
            for pid in ns.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for ns in made:
            deadline = time.monotonic() + STEP_TIMEOUT
            while ns.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            _ip("netns", "del", ns.name)
        leftover = [ns.name for ns in made if ns.name in _ip("netns", "list").stdout]
        assert not leftover, f"namespaces left behind: {leftover}"


def _start_worker(ns: Netns, address: str, binary: Path) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "llama_proc", "rpc-worker", "--host", address,
        "--port", str(WORKER_PORT), "--allow-remote", "--threads", "1",
        "--binary", str(binary), "--ready-timeout", str(STEP_TIMEOUT),
    ]  # fmt: skip
    return subprocess.Popen(
        ns.exec_argv(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )


def _read_line(stream: IO[str] | None, timeout: float) -> str:
    assert stream is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=STEP_TIMEOUT)


CLIENT_SCRIPT = """
import json, sys, time
from llama_proc.errors import RpcWorkerError
from llama_proc.runtime.rpc import check_workers, local_rpc_version
from llama_proc.server import LlamaServer

mode, server_bin, model, endpoints = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
server = LlamaServer(
    model, binary=server_bin, rpc=endpoints, n_gpu_layers=99, ctx_size=512,
    extra_args=("-lv", "4"), start_timeout=120,
)
if mode == "ask":
    expected = local_rpc_version(server_bin)
    infos = check_workers(endpoints, 10.0, expected=expected)
    with server:
        reply = server.chat(
            [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            max_tokens=16, temperature=0,
        )
        logs = server.logs()
    print(json.dumps({
        "expected": str(expected), "workers": [i.describe() for i in infos],
        "answer": reply["choices"][0]["message"]["content"], "logs": logs,
    }))
else:
    start = time.monotonic()
    try:
        server.start()
    except RpcWorkerError as err:
        print(json.dumps({"error": str(err), "seconds": time.monotonic() - start,
                          "spawned": bool(server.logs())}))
    else:
        print(json.dumps({"error": "", "seconds": 0, "spawned": True}))
    finally:
        server.stop()
"""


def _client(
    client: Netns, mode: str, server_bin: Path, model: Path, endpoints: list[str]
) -> dict[str, Any]:
    argv = [sys.executable, "-c", CLIENT_SCRIPT, mode, str(server_bin), str(model), *endpoints]
    out = subprocess.run(
        client.exec_argv(argv),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=STEP_TIMEOUT * 4,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_model_split_across_two_workers_answers(hosts, rpc_install, smol_model):
    client, workers = hosts
    worker_bin = rpc_install.binary("rpc-server")
    server_bin = rpc_install.server_binary
    endpoints = [f"{address}:{WORKER_PORT}" for _, address in workers]

    procs = [_start_worker(ns, address, worker_bin) for ns, address in workers]
    outputs: list[tuple[str, str] | None] = [None, None]
    try:
        for proc, endpoint in zip(procs, endpoints, strict=True):
            line = _read_line(proc.stdout, STEP_TIMEOUT)
            assert line.startswith(f"llama-proc rpc-worker: ready at {endpoint}"), (
                line or proc.poll()
            )

        # LlamaServer(rpc=...) on the client host: probe, spawn, split the model, answer.
        result = _client(client, "ask", server_bin, smol_model, endpoints)
        assert "Paris" in result["answer"]
        assert [w.split(":")[0] for w in result["workers"]] == [e.split(":")[0] for e in endpoints]
        assert all(f"RPC protocol v{result['expected']}" in w for w in result["workers"])
        server_log = "\n".join(result["logs"])
        for endpoint in endpoints:
            pattern = rf"RPC\d+\[{re.escape(endpoint)}\] model buffer size = +[0-9.]+ MiB"
            assert re.search(pattern, server_log), f"no model buffer on {endpoint}"

        # A worker host that went away: start fails at once, naming it, nothing spawned.
        stopped = outputs[1] = _stop(procs[1])
        assert procs[1].returncode == 0, stopped[1][-2000:]
        result = _client(client, "unreachable", server_bin, smol_model, endpoints)
        assert f"RPC worker {endpoints[1]} is not usable" in result["error"]
        assert "connection refused" in result["error"]
        assert result["seconds"] < 30
        assert not result["spawned"]
    finally:
        for i, proc in enumerate(procs):
            if outputs[i] is None:
                outputs[i] = _stop(proc)
    for proc, output in zip(procs, outputs, strict=True):
        assert output is not None
        assert proc.returncode == 0, output[1][-2000:]
    first_err = outputs[0][1] if outputs[0] else ""
    assert "NO authentication and NO encryption" in first_err
    assert "Accepted client connection" in first_err


def test_skip_reason_without_root_or_iproute2(monkeypatch):
    if not sys.platform.startswith("linux"):
        assert _skip_reason() == "network namespaces need Linux"
        return
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert _skip_reason() == "creating network namespaces needs root"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert _skip_reason() == "iproute2 (the ip command) is not installed"
