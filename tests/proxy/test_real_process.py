"""``python -m llama_proc serve`` as its own process: children die with it, SIGTERM drains."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from proxy_harness import pid_alive, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@contextlib.contextmanager
def serve(
    tmp_path: Path, server_bin: Path, model: Path, *extra: str
) -> Iterator[tuple[subprocess.Popen[str], str, Path, str]]:
    """Run ``python -m llama_proc serve``; yields (process, base URL, its log file, ready line)."""
    config = tmp_path / "models.toml"
    config.write_text(
        "[models.smol]\n"
        f"path = {json.dumps(str(model))}\n"
        'extra_args = ["-c", "2048", "-t", "1", "-np", "1"]\n'
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "LLAMA_PROC_SERVER_BIN": str(server_bin),
    }
    log = tmp_path / "serve.log"
    # The log goes to a file: a pipe nobody reads would fill up and block the proxy.
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_proc", "--log-level", "INFO", "serve", "--config",
             str(config), "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=env,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if match is None:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"serve did not start: {line!r}\n{log.read_text()}")
        yield proc, match.group(1), log, line
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def post_chat(base: str, max_tokens: int = 2, *, stream: bool = False) -> bytes:
    """The raw response body of one chat request ("hi") to the proxy at ``base``."""
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    request = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        data: bytes = resp.read()
    return data


def chat(base: str, max_tokens: int = 2) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(post_chat(base, max_tokens))
    return reply


def server_pid(base: str) -> int:
    with urllib.request.urlopen(base + "/servers", timeout=10) as resp:
        [info] = json.loads(resp.read())["data"]
    return int(info["pid"])


def test_owner_killed_leaves_no_child(
    tmp_path: Path, llama_server_bin: Path, smol_model: Path
) -> None:
    with serve(tmp_path, llama_server_bin, smol_model) as (proc, base, _, _):
        assert chat(base)["choices"]
        pid = server_pid(base)
        assert pid_alive(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_until(lambda: not pid_alive(pid), 5), f"llama-server {pid} outlived its owner"


def test_sigterm_drains_running_stream_then_stops_children(
    tmp_path: Path, llama_server_bin: Path, smol_model: Path
) -> None:
    with serve(tmp_path, llama_server_bin, smol_model, "--drain-timeout", "30") as (
        proc,
        base,
        log,
        _,
    ):
        assert chat(base)["choices"]
        pid = server_pid(base)
        body = {
            "model": "smol",
            "messages": [{"role": "user", "content": "Count to fifty."}],
            "max_tokens": 48,
            "stream": True,
            "ignore_eos": True,
        }
        request = urllib.request.Request(
            base + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as resp:
            first = resp.readline()
            assert first.startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            rest = resp.read()
        assert rest.rstrip().endswith(b"data: [DONE]"), rest[-200:]
        assert proc.wait(30) == 0
        assert wait_until(lambda: not pid_alive(pid), 5)
        assert "llama-proc serve: stopped" in log.read_text()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_each_event_loop_serves_and_times_its_own_work(
    tmp_path: Path, llama_server_bin: Path, smol_model: Path, loop: str
) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")  # a dependency everywhere but Windows
    with serve(tmp_path, llama_server_bin, smol_model, "--event-loop", loop) as (_, base, _, line):
        assert f"{loop} event loop" in line
        assert chat(base)["choices"][0]["message"]["content"]
        events = post_chat(base, 4, stream=True).decode()
        assert events.rstrip().endswith("data: [DONE]")
        with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
            metrics = resp.read().decode().splitlines()
    count = next(m for m in metrics if m.startswith("llama_proc_proxy_overhead_seconds_count"))
    total = next(m for m in metrics if m.startswith("llama_proc_proxy_overhead_seconds_sum"))
    assert count.endswith(" 2"), count  # the plain answer and the stream
    # Two requests of a few milliseconds each; the generation itself is not counted.
    assert 0 < float(total.split()[-1]) < 0.5, total
