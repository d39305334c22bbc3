"""LlamaServer / AsyncLlamaServer over the fake server: one typed copy of the API per flavour."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest

from llama_proc.errors import ServerExitedError
from llama_proc.runtime.async_client import AsyncLlamaClient, AsyncLlamaEndpoints
from llama_proc.runtime.client import LlamaClient, LlamaEndpoints
from llama_proc.server import AsyncLlamaServer, LlamaServer

FAKE_SERVER = Path(__file__).resolve().parents[1] / "helpers" / "fake_llama_server.py"
ENDPOINTS = (
    "health", "models", "chat", "chat_stream", "complete", "complete_stream", "embeddings",
    "embed", "tokenize", "detokenize", "metrics", "slots", "props",
)  # fmt: skip
posix_only = pytest.mark.skipif(os.name != "posix", reason="shell-script stand-in")


@pytest.mark.parametrize("name", ENDPOINTS)
def test_each_endpoint_is_written_once_per_flavour(name: str) -> None:
    sync = LlamaEndpoints.__dict__[name]
    asynchronous = AsyncLlamaEndpoints.__dict__[name]
    for cls in (LlamaClient, LlamaServer):
        assert getattr(cls, name) is sync, cls
        assert name not in cls.__dict__, f"{cls.__name__} carries its own copy of {name}"
    for acls in (AsyncLlamaClient, AsyncLlamaServer):
        assert getattr(acls, name) is asynchronous, acls
        assert name not in acls.__dict__, f"{acls.__name__} carries its own copy of {name}"


@pytest.fixture
def fake_binary(tmp_path: Path) -> Path:
    shim = tmp_path / "llama-server"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SERVER}" "$@"\n')
    shim.chmod(0o755)
    return shim


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(struct.pack("<4sIQQ", b"GGUF", 3, 0, 0))
    return path


def _kill(pid: int | None) -> None:
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


@posix_only
def test_sync_server_calls_the_api_and_reports_a_crash(fake_binary: Path, model: Path) -> None:
    with LlamaServer(model, binary=fake_binary, request_timeout=5) as server:
        assert server.health() == {"status": "ok"}
        assert "data" in server.models()
        _kill(server.pid)
        with pytest.raises(ServerExitedError, match="exited during the request") as err:
            server.models()
        assert err.value.returncode == -signal.SIGKILL


@posix_only
def test_async_server_calls_the_api_and_reports_a_crash(fake_binary: Path, model: Path) -> None:
    async def scenario() -> None:
        async with AsyncLlamaServer(model, binary=fake_binary, request_timeout=5) as server:
            assert await server.health() == {"status": "ok"}
            assert "data" in await server.models()
            _kill(server.pid)
            with pytest.raises(ServerExitedError, match="exited during the request") as err:
                await server.models()
            assert err.value.returncode == -signal.SIGKILL

    asyncio.run(scenario())
