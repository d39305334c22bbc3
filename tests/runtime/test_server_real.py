"""LlamaServer / AsyncLlamaServer against the real llama-server and SmolLM2-135M-Instruct."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from llama_proc import server as server_module
from llama_proc.errors import (
    BinaryNotFoundError,
    InvalidArgumentError,
    ModelFileError,
    ServerExitedError,
    ServerNotReadyError,
    ServerRequestError,
    ServerStartError,
)
from llama_proc.runtime.async_client import AsyncLlamaClient
from llama_proc.runtime.health import probe_health
from llama_proc.server import AsyncLlamaServer, LlamaServer

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.timeout(300)

START_TIMEOUT = 120
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def server(llama_server_bin: Path, smol_model: Path) -> Iterator[LlamaServer]:
    """One shared server for the API tests (loading is the slow part)."""
    srv = LlamaServer(
        smol_model, binary=llama_server_bin, ctx_size=2048, parallel=2, metrics=True,
        start_timeout=START_TIMEOUT,
    )  # fmt: skip
    with srv:
        yield srv


def _new(llama_server_bin: Path, smol_model: Path, **options: object) -> LlamaServer:
    options.setdefault("ctx_size", 512)
    return LlamaServer(smol_model, binary=llama_server_bin, start_timeout=START_TIMEOUT, **options)  # type: ignore[arg-type]


# -- answers ---------------------------------------------------------------------------------


def test_real_answer(server: LlamaServer) -> None:
    reply = server.chat(CAPITAL, temperature=0, max_tokens=24)
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] > 0
    text = server.complete("The capital of France is", temperature=0, max_tokens=6)
    assert "Paris" in text["choices"][0]["text"]


def test_streaming_chunks_arrive_incrementally(server: LlamaServer) -> None:
    arrivals: list[float] = []
    pieces: list[str] = []
    usage = None
    for chunk in server.chat_stream(CAPITAL, temperature=0, max_tokens=16):
        arrivals.append(time.monotonic())
        pieces.extend(choice["delta"].get("content") or "" for choice in chunk["choices"])
        usage = chunk.get("usage") or usage
    content_chunks = [p for p in pieces if p]
    assert len(content_chunks) >= 5
    assert "Paris" in "".join(pieces)
    assert usage is not None
    # one chunk per generated token; the end-of-generation token counts but has no text
    assert usage["completion_tokens"] in (len(content_chunks), len(content_chunks) + 1)
    # tokens are generated one by one: chunk arrival times are spread, not one burst
    distinct = {round(t, 4) for t in arrivals}
    assert len(distinct) >= len(content_chunks) // 2
    assert arrivals[-1] - arrivals[0] > 0.01


def test_completion_stream(server: LlamaServer) -> None:
    chunks = list(server.complete_stream("Once upon a time", max_tokens=8, temperature=0))
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text
    assert chunks[-1]["usage"]["completion_tokens"] == 8


def test_tokenize_models_metrics_slots_props(server: LlamaServer) -> None:
    tokens = server.tokenize("Hello world")
    assert len(tokens) == 2
    assert server.detokenize(tokens) == "Hello world"
    models = server.models()
    assert models["data"][0]["id"]
    server.chat(CAPITAL, max_tokens=4)
    metrics = server.metrics()
    assert metrics["llamacpp:tokens_predicted_total"] >= 4
    assert "llamacpp:prompt_tokens_total" in metrics
    slots = server.slots()
    assert len(slots) == 2
    props = server.props()
    assert props["total_slots"] == 2
    assert Path(props["model_path"]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert server.health() == {"status": "ok"}
    assert any("model loaded" in line for line in server.logs())


def test_openai_sdk_against_base_url(server: LlamaServer) -> None:
    client = server.openai_client()
    try:
        reply = client.chat.completions.create(
            model="any", messages=CAPITAL, temperature=0, max_tokens=24
        )
        assert "Paris" in (reply.choices[0].message.content or "")
        stream = client.chat.completions.create(
            model="any", messages=CAPITAL, temperature=0, max_tokens=8, stream=True
        )
        deltas = [c.choices[0].delta.content for c in stream if c.choices]
        assert len([d for d in deltas if d]) >= 3
    finally:
        client.close()
    assert server.base_url == server.url + "/v1"


def test_async_server(llama_server_bin: Path, smol_model: Path) -> None:
    async def main() -> None:
        async with AsyncLlamaServer(
            smol_model, binary=llama_server_bin, ctx_size=512, start_timeout=START_TIMEOUT
        ) as srv:
            assert srv.is_running
            reply = await srv.chat(CAPITAL, temperature=0, max_tokens=24)
            assert "Paris" in reply["choices"][0]["message"]["content"]
            chunks = [c async for c in srv.chat_stream(CAPITAL, temperature=0, max_tokens=6)]
            assert chunks[-1]["usage"]["completion_tokens"] == 6
            assert await srv.tokenize("Hello world") == [19556, 905]
            pid = srv.pid
        assert not srv.is_running
        assert pid is not None

    asyncio.run(main())


def test_async_stream_longer_than_request_timeout_completes(
    llama_server_bin: Path, smol_model: Path
) -> None:
    # request_timeout is the longest silence, not a total: a stream that keeps producing
    # tokens for longer must finish (with a total deadline it broke at request_timeout). The
    # length is sized from the rate measured first, so a loaded machine does not flake it.
    silence = 6.0
    story = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]

    async def main() -> tuple[int, float, list[dict[str, object]]]:
        async with AsyncLlamaServer(
            smol_model, binary=llama_server_bin, ctx_size=2048, request_timeout=silence,
            start_timeout=START_TIMEOUT,
        ) as srv:  # fmt: skip
            probe = 32
            # Warm up and measure with a patient client: a fresh server's first answer can
            # take seconds on a loaded machine, which the silence limit would rightly refuse.
            async with AsyncLlamaClient(srv.url, timeout=START_TIMEOUT) as patient:
                [c async for c in patient.chat_stream(story, max_tokens=4, ignore_eos=True)]
                start = time.monotonic()
                [c async for c in patient.chat_stream(story, max_tokens=probe, ignore_eos=True)]
                rate = probe / (time.monotonic() - start)
            tokens = min(max(int(rate * 2.5 * silence), 40), 1900)
            start = time.monotonic()
            stream = srv.chat_stream(story, temperature=0, max_tokens=tokens, ignore_eos=True)
            chunks = [c async for c in stream]
            return tokens, time.monotonic() - start, chunks

    tokens, elapsed, chunks = asyncio.run(main())
    usage = chunks[-1]["usage"]
    assert isinstance(usage, dict)
    assert usage["completion_tokens"] == tokens
    assert elapsed > silence, (elapsed, tokens)


def test_async_start_cancelled_stops_the_child(llama_server_bin: Path, smol_model: Path) -> None:
    async def main() -> AsyncLlamaServer:
        srv = AsyncLlamaServer(smol_model, binary=llama_server_bin, ctx_size=512)
        task = asyncio.ensure_future(srv.start())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return srv

    srv = asyncio.run(main())
    assert not srv.is_running


def test_embeddings(llama_server_bin: Path, smol_model: Path) -> None:
    with _new(llama_server_bin, smol_model, embeddings=True, pooling="mean") as srv:
        vectors = srv.embed(["hello", "a completely different sentence"])
        assert len(vectors) == 2
        assert len(vectors[0]) == len(vectors[1]) == 576  # SmolLM2-135M hidden size
        assert vectors[0] != vectors[1]
        raw = srv.embeddings("hello")
        assert raw["data"][0]["embedding"] == pytest.approx(vectors[0], abs=1e-4)


# -- lifecycle -------------------------------------------------------------------------------


def test_start_stop_cycles(llama_server_bin: Path, smol_model: Path) -> None:
    srv = _new(llama_server_bin, smol_model)
    pids = []
    try:
        for _ in range(3):
            srv.start()
            assert srv.is_running
            assert probe_health("127.0.0.1", srv.port) == 200
            pids.append(srv.pid)
            # stopping right after ready hits llama-server's lost-SIGTERM window; the
            # repeated SIGTERM must keep this far below the 10 s grace
            started = time.monotonic()
            srv.stop()
            assert time.monotonic() - started < 5
        srv.restart()
        assert srv.start() is srv  # already running: a no-op
    finally:
        code = srv.stop()
    assert not srv.is_running
    assert code in (0, 1)  # 1: llama-server's "second interrupt" exit (see ServerProcess.stop)
    assert srv.stop() == code  # idempotent
    assert len(set(pids)) == 3


def test_stopping_a_sigstopped_server_is_quick(llama_server_bin: Path, smol_model: Path) -> None:
    # SIGTERM waits while a process is stopped: stop() must not wait out its 10 s grace.
    srv = _new(llama_server_bin, smol_model)
    srv.start()
    try:
        assert srv.pid is not None
        os.kill(srv.pid, signal.SIGSTOP)
        started = time.monotonic()
        code = srv.stop()
        elapsed = time.monotonic() - started
    finally:
        srv.stop()
    assert elapsed < 3, (elapsed, code)
    assert code is not None
    assert srv.stop_grace >= 10


def test_a_start_stalled_by_sigstop_fails_at_the_stall_timeout(
    llama_server_bin: Path, smol_model: Path
) -> None:
    # Stopped while loading: the stall is found after stall_timeout, and stopping the stopped
    # child must not add the 10 s grace to the error (it came at 15 s with stall_timeout=5).
    srv = _new(llama_server_bin, smol_model, stall_timeout=2)
    failure: list[BaseException] = []

    def start() -> None:
        try:
            srv.start()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            failure.append(err)

    thread = threading.Thread(target=start)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while srv.pid is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert srv.pid is not None
        os.kill(srv.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        thread.join(60)
        elapsed = time.monotonic() - stopped_at
    finally:
        srv.stop()
    assert failure, "the start should have stalled"
    assert isinstance(failure[0], ServerNotReadyError), failure[0]
    assert elapsed < 2 + 3, elapsed


def test_two_servers_at_once(llama_server_bin: Path, smol_model: Path) -> None:
    servers = [_new(llama_server_bin, smol_model) for _ in range(2)]
    threads = [threading.Thread(target=s.start) for s in servers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(s.is_running for s in servers)
        assert servers[0].port != servers[1].port
        for s in servers:
            assert s.tokenize("Hello world") == [19556, 905]
    finally:
        for s in servers:
            s.stop()


def test_port_zero_lets_the_server_choose(llama_server_bin: Path, smol_model: Path) -> None:
    with _new(llama_server_bin, smol_model, port=0) as srv:
        assert srv.port != 0
        assert srv.health() == {"status": "ok"}


def test_crash_is_detected(llama_server_bin: Path, smol_model: Path) -> None:
    srv = _new(llama_server_bin, smol_model).start()
    try:
        assert srv.pid is not None
        os.kill(srv.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while srv.is_running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not srv.is_running
        with pytest.raises(ServerExitedError, match="exited during the request") as info:
            srv.chat(CAPITAL, max_tokens=2)
        assert info.value.returncode == -signal.SIGKILL
        assert "SIGKILL" in info.value.cause
    finally:
        assert srv.stop() == -signal.SIGKILL


def test_inherited_llama_arg_variables_are_ignored(
    llama_server_bin: Path, smol_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a malformed one would abort llama-server; a valid one would silently change the port
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "not-a-number")
    monkeypatch.setenv("LLAMA_ARG_PORT", "1")
    with _new(llama_server_bin, smol_model) as srv:
        assert srv.health() == {"status": "ok"}


# -- failures --------------------------------------------------------------------------------


def test_non_gguf_model_is_refused_before_spawning(llama_server_bin: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(os.urandom(4096))
    srv = LlamaServer(bad, binary=llama_server_bin)
    with pytest.raises(ModelFileError, match="not a GGUF model file"):
        srv.start()
    assert srv.pid is None
    with pytest.raises(ModelFileError, match="does not exist"):
        LlamaServer(tmp_path / "missing.gguf", binary=llama_server_bin).start()


def test_broken_gguf_is_decoded(llama_server_bin: Path, smol_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "truncated.gguf"
    with smol_model.open("rb") as fh:
        broken.write_bytes(fh.read(4096))
    with pytest.raises(ServerStartError) as info:
        LlamaServer(broken, binary=llama_server_bin, start_timeout=START_TIMEOUT).start()
    err = info.value
    assert err.returncode == 1
    assert err.cause.startswith("bad model file")
    assert any("failed to load model" in line for line in err.log_tail)


def test_bad_flag_is_decoded(llama_server_bin: Path, smol_model: Path) -> None:
    srv = _new(llama_server_bin, smol_model, extra_args=["--definitely-not-a-flag"])
    with pytest.raises(ServerStartError) as info:
        srv.start()
    assert info.value.returncode == 1
    assert info.value.cause == "bad flag: llama-server does not know --definitely-not-a-flag"
    assert not srv.is_running
    assert srv.returncode == 1
    assert any("invalid argument" in line for line in srv.logs())  # kept after a failed start


def test_port_taken_is_decoded(llama_server_bin: Path, smol_model: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(ServerStartError) as info:
            _new(llama_server_bin, smol_model, port=port).start()
    assert info.value.cause.startswith("port in use")
    assert str(port) in info.value.cause


def test_auto_port_retries_when_the_port_is_taken_first(
    llama_server_bin: Path, smol_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        real = server_module.reserve_port
        monkeypatch.setattr(
            server_module, "reserve_port", lambda host: next(picks, None) or real(host)
        )
        with _new(llama_server_bin, smol_model) as srv:
            assert srv.port != taken
            assert srv.health() == {"status": "ok"}


def test_missing_binary(smol_model: Path, tmp_path: Path) -> None:
    with pytest.raises(BinaryNotFoundError, match="does not exist"):
        LlamaServer(smol_model, binary=tmp_path / "llama-server").start()
    with pytest.raises(InvalidArgumentError, match="no model given"):
        LlamaServer()
    with pytest.raises(InvalidArgumentError, match="unknown llama-server option"):
        LlamaServer(smol_model, context=5)


# -- API key ---------------------------------------------------------------------------------


def test_api_key_enforced_and_absent_from_ps(llama_server_bin: Path, smol_model: Path) -> None:
    key = "lp-test-key-6c1f0e"
    with _new(llama_server_bin, smol_model, api_key=key) as srv:
        assert srv.pid is not None
        cmdline = Path(f"/proc/{srv.pid}/cmdline").read_bytes()
        assert key.encode() not in cmdline
        ps = subprocess.run(
            ["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True
        )
        assert key not in ps.stdout
        assert "llama-server" in ps.stdout
        environ = Path(f"/proc/{srv.pid}/environ").read_bytes().split(b"\0")
        assert f"LLAMA_API_KEY={key}".encode() in environ  # how it gets there instead
        # without the key: 401; /health needs none
        anonymous = requests.post(f"{srv.url}/tokenize", json={"content": "hi"}, timeout=30)
        assert anonymous.status_code == 401
        assert requests.get(f"{srv.url}/health", timeout=30).status_code == 200
        wrong = requests.get(
            f"{srv.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30
        )
        assert wrong.status_code == 401
        # the built-in client sends it
        assert srv.tokenize("Hello world") == [19556, 905]
        from llama_proc.runtime.client import LlamaClient

        with pytest.raises(ServerRequestError) as info:
            LlamaClient(srv.url).models()
        assert info.value.status == 401


def test_unreachable_rpc_worker_is_named_before_spawning(
    llama_server_bin: Path, smol_model: Path
) -> None:
    closed = server_module.reserve_port()  # nothing listens there
    srv = _new(llama_server_bin, smol_model, rpc=[f"127.0.0.1:{closed}"])
    with pytest.raises(ServerStartError, match=f"RPC worker 127.0.0.1:{closed}") as info:
        srv.start()
    assert "connection refused" in info.value.cause
    assert srv.pid is None


def test_binary_resolved_through_provisioning(
    llama_server_bin: Path, smol_model: Path, tmp_path: Path
) -> None:
    from llama_proc.config import Settings

    settings = Settings.from_env(cache_dir=tmp_path / "cache", server_binary=llama_server_bin)
    with LlamaServer(smol_model, settings=settings, ctx_size=512) as srv:
        assert srv.binary is not None
        assert srv.binary.resolve() == llama_server_bin.resolve()
        assert srv.health() == {"status": "ok"}


def test_stop_from_another_thread_abandons_a_start(
    llama_server_bin: Path, smol_model: Path
) -> None:
    srv = _new(llama_server_bin, smol_model)
    errors: list[BaseException] = []

    def starter() -> None:
        try:
            srv.start()
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    worker = threading.Thread(target=starter)
    worker.start()
    while srv.pid is None and worker.is_alive():
        time.sleep(0.001)
    started = time.monotonic()
    srv.stop()
    worker.join(30)
    assert not worker.is_alive()
    assert time.monotonic() - started < 5
    assert not srv.is_running
    assert len(errors) == 1
    assert isinstance(errors[0], ServerStartError)
    assert "cancelled" in str(errors[0])


def test_async_twin_shows_all_the_server_shows(llama_server_bin: Path, smol_model: Path) -> None:
    """One view for both: every read-only property of the server is on its async twin too."""
    from llama_proc.server_state import ServerView

    shared = [n for n, v in vars(ServerView).items() if isinstance(v, property)]
    assert {"port", "api_key", "process", "url", "devices"} <= set(shared)

    async def main() -> None:
        async with AsyncLlamaServer(
            smol_model,
            binary=llama_server_bin,
            ctx_size=512,
            api_key="k-test",
            start_timeout=START_TIMEOUT,
        ) as srv:
            for name in shared:
                assert getattr(srv, name) == getattr(srv.server, name), name
            assert srv.api_key == "k-test"
            assert srv.url.endswith(f":{srv.port}")
            srv.check_alive()
            assert srv.logs(3) == srv.server.logs(3)

    asyncio.run(main())
