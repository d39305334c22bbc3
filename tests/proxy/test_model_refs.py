"""The proxy serving models its config names by Hugging Face reference.

A loopback fake hub (tests/helpers/fake_hub.py) serves the real SmolLM2 GGUF as
``test/SmolLM2-135M-Instruct-GGUF``; the real proxy runs real llama-servers, asked through the
openai SDK. Downloads happen before a server's start clock and outside the pool, and
``GET /servers`` lists them with their state and percent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest
from fake_hub import FakeHub, sha256_of
from hub_env import SMOL_FILE, SMOL_REPO, use_fake_hub
from huggingface_hub import constants
from proxy_harness import ProxyThread, running_proxy, wait_until

from llama_proc.errors import ConfigError
from llama_proc.models.model_ref import ModelRef
from llama_proc.proxy.models_config import load_models_config
from llama_proc.proxy.servers import LlamaServerFactory

if TYPE_CHECKING:
    from collections.abc import Iterator

    from openai.types.chat import ChatCompletionMessageParam

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]
TRICKLE_CHUNK = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        yield server


@pytest.fixture
def hf_cache(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, tmp_path: Path) -> Path:
    return use_fake_hub(monkeypatch, hub, tmp_path / "hf-home")


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def smol_config(tmp_path: Path, reference: str) -> Path:
    return write_config(
        tmp_path,
        f"""
[defaults]
threads = 1
ctx_size = 512

[models.smol]
model = "{reference}"
""",
    )


def sdk(proxy: ProxyThread, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="unused", max_retries=0, **kwargs)


async def no_server(spec: Any, flags: tuple[str, ...]) -> Any:
    msg = f"no server may start (asked for {spec.id})"
    raise AssertionError(msg)


def downloads(proxy: ProxyThread) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = proxy.get_json("/servers")["downloads"]
    return listed


# -- the config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("org/repo:q4_k_m", ModelRef("org/repo", quant="Q4_K_M"), id="quant"),
        pytest.param(
            "hf://org/repo/dir/m.Q4_1.gguf@v1",
            ModelRef("org/repo", file="dir/m.Q4_1.gguf", revision="v1"),
            id="hf-file",
        ),
        pytest.param("hf://org/repo:Q8_0", ModelRef("org/repo", quant="Q8_0"), id="hf-repo"),
    ],
)
def test_model_key_takes_a_reference(tmp_path: Path, text: str, expected: ModelRef) -> None:
    config = load_models_config(smol_config(tmp_path, text))
    spec = config.resolve("smol")
    assert spec is not None
    assert spec.ref == expected
    assert spec.path is None
    assert dict(spec.options) == {"threads": 1, "ctx_size": 512}


def test_model_key_takes_a_path_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "repo").write_bytes(b"GGUF")
    config = load_models_config(
        write_config(tmp_path, '[models.a]\nmodel = "m/x.gguf"\n[models.b]\nmodel = "org/repo"\n')
    )
    a, b = config.resolve("a"), config.resolve("b")
    assert a is not None
    assert b is not None
    assert (a.ref, a.path) == (None, tmp_path / "m" / "x.gguf")
    assert (b.ref, b.path) == (None, tmp_path / "org" / "repo")  # an existing path wins


def test_mmproj_true_asks_for_the_projector(tmp_path: Path) -> None:
    config = load_models_config(
        write_config(tmp_path, '[models.v]\nmodel = "org/vision:Q4_K_M"\nmmproj = true\n')
    )
    spec = config.resolve("v")
    assert spec is not None
    assert spec.mmproj is True
    assert "mmproj" not in spec.options


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param(
            '[models.a]\nmodel = "o/r"\npath = "a.gguf"\n', "path or model, not both", id="both"
        ),
        pytest.param('[models.a]\nmodel = "hf://org"\n', r"\[models.a\].*hf://org", id="bad-ref"),
        pytest.param("[models.a]\nmodel = 3\n", "model must be", id="not-a-string"),
        pytest.param(
            '[defaults]\nmodel = "o/r"\n[models.a]\nmodel = "o/r"\n', r"\[models.<id>\]", id="dflt"
        ),
        pytest.param(
            '[models.a]\npath = "a.gguf"\nmmproj = true\n', "mmproj = true", id="mmproj-path"
        ),
    ],
)
def test_bad_model_keys_are_one_line_config_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_models_config(write_config(tmp_path, text))
    assert "\n" not in str(info.value)


# -- the real proxy -----------------------------------------------------------------------------


def test_a_config_naming_a_repo_answers_a_chat_request(
    hub: FakeHub, hf_cache: Path, smol_model: Path, llama_server_bin: Path, tmp_path: Path
) -> None:
    hub.add_repo(SMOL_REPO, {SMOL_FILE: smol_model, "SmolLM2-135M-Instruct.Q8_0.gguf": b"GGUF"})
    models = load_models_config(smol_config(tmp_path, f"{SMOL_REPO}:Q4_1"))
    factory = LlamaServerFactory(binary=llama_server_bin, start_timeout=120)
    with running_proxy(models, factory, max_servers=1) as proxy:
        assert downloads(proxy) == []  # nothing is fetched before the model is asked for
        client = sdk(proxy, timeout=120)
        reply = client.chat.completions.create(model="smol", messages=HI, max_tokens=8)
        assert reply.choices[0].message.content
        again = client.chat.completions.create(model="smol", messages=HI, max_tokens=4)
        assert again.choices[0].message.content
        (done,) = downloads(proxy)
        assert done["ref"] == f"{SMOL_REPO}:Q4_1"
        assert done["models"] == ["smol"]
        assert done["state"] == "ready"
        assert done["percent"] == 100.0
        local = Path(done["path"])
        assert local.is_relative_to(hf_cache)
        assert sha256_of(local) == sha256_of(smol_model)
        (server,) = proxy.servers()
        assert server["model"] == "smol"
        assert server["state"] == "ready"
    assert [h.method for h in hub.storage.log] == ["GET"]  # one download for both requests


def test_a_download_longer_than_the_start_timeout_still_serves(
    hub: FakeHub,
    hf_cache: Path,
    smol_model: Path,
    llama_server_bin: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub.add_repo(SMOL_REPO, {SMOL_FILE: smol_model})
    route = hub.blob_route(SMOL_REPO, SMOL_FILE)
    route.chunk_size, route.delay = TRICKLE_CHUNK, 0.05  # ~94 MiB in about 5 s
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", TRICKLE_CHUNK)  # progress every MiB
    models = load_models_config(smol_config(tmp_path, f"hf://{SMOL_REPO}/{SMOL_FILE}"))
    start_timeout = 2.0
    factory = LlamaServerFactory(binary=llama_server_bin, start_timeout=start_timeout)
    with running_proxy(models, factory, max_servers=1) as proxy:
        replies: list[Any] = []
        began = time.monotonic()
        worker = threading.Thread(
            target=lambda: replies.append(
                sdk(proxy, timeout=120).chat.completions.create(
                    model="smol", messages=HI, max_tokens=8
                )
            )
        )
        worker.start()
        seen: list[dict[str, Any]] = []

        def midway() -> bool:
            listed = downloads(proxy)
            seen.extend(listed)
            return any(
                d["state"] == "downloading" and 0 < (d["percent"] or 0) < 100 for d in listed
            )

        assert wait_until(midway, timeout=30, interval=0.1)
        assert proxy.servers() == []  # the download holds no server slot
        assert [d["bytes_total"] for d in seen if d["bytes_total"]][-1] == smol_model.stat().st_size
        worker.join(120)
        assert not worker.is_alive()
        assert time.monotonic() - began > start_timeout
        (reply,) = replies
        assert reply.choices[0].message.content
        assert downloads(proxy)[0]["state"] == "ready"


def test_a_failed_download_is_an_error_reply_and_starts_nothing(
    hub: FakeHub, hf_cache: Path, tmp_path: Path
) -> None:
    hub.add_repo("org/m", {"m-Q4_0.gguf": b"GGUF"})
    models = load_models_config(smol_config(tmp_path, "org/m:Q8_0"))
    with running_proxy(models, no_server, max_servers=1) as proxy:
        with pytest.raises(openai.APIStatusError) as info:
            sdk(proxy).chat.completions.create(model="smol", messages=HI, max_tokens=8)
        assert info.value.status_code == 503
        body = info.value.body
        assert isinstance(body, dict)
        assert body["code"] == "model_download_failed"
        assert "it has: Q4_0" in body["message"]
        (failed,) = downloads(proxy)
        assert failed["state"] == "failed"
        assert "it has: Q4_0" in failed["error"]
        assert proxy.servers() == []


def test_stopping_the_proxy_abandons_a_download(
    hub: FakeHub,
    hf_cache: Path,
    smol_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub.add_repo(SMOL_REPO, {SMOL_FILE: smol_model})
    route = hub.blob_route(SMOL_REPO, SMOL_FILE)
    route.chunk_size, route.delay = TRICKLE_CHUNK, 1.0  # ~94 s for the whole file
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", TRICKLE_CHUNK)
    models = load_models_config(smol_config(tmp_path, SMOL_REPO))
    proxy = ProxyThread(models, no_server, max_servers=1).start()
    client = sdk(proxy, timeout=60)

    def ask() -> None:
        with pytest.raises(openai.APIError):
            client.chat.completions.create(model="smol", messages=HI)

    try:
        threading.Thread(target=ask, daemon=True).start()
        assert wait_until(
            lambda: any(d["bytes_done"] > 0 for d in downloads(proxy)), timeout=30, interval=0.1
        )
    finally:
        began = time.monotonic()
        proxy.stop()
    assert time.monotonic() - began < 5  # neither the drain timeout (10 s) nor the download
    # The download thread stops at its next chunk; huggingface_hub then drops the partial file.
    assert wait_until(lambda: not list(hf_cache.rglob("*.incomplete")), timeout=15)


# -- `llama-proc serve` as its own process, configured through the environment -----------------


def serve_process(
    config: Path, env: dict[str, str], log: Path, *flags: str
) -> tuple[subprocess.Popen[str], str]:
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_proc", "--log-level", "INFO", "serve", "--config",
             str(config), "--port", "0", *flags],
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if match is None:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"serve did not start: {line!r}\n{log.read_text()}")
    return proc, match.group(1)


def post_chat(base: str) -> tuple[int, dict[str, Any]]:
    body = {"model": "smol", "messages": HI, "max_tokens": 4}
    request = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            reply: dict[str, Any] = json.loads(resp.read())
            return resp.status, reply
    except urllib.error.HTTPError as err:
        error: dict[str, Any] = json.loads(err.read())
        return err.code, error


def test_serve_reads_hf_endpoint_and_honours_offline(
    hub: FakeHub, smol_model: Path, llama_server_bin: Path, tmp_path: Path
) -> None:
    hub.add_repo(SMOL_REPO, {SMOL_FILE: smol_model})
    config = smol_config(tmp_path, f"{SMOL_REPO}:Q4_1")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))},
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "LLAMA_PROC_SERVER_BIN": str(llama_server_bin),
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    for flags, expected in ((("--offline",), 503), ((), 200)):
        proc, base = serve_process(config, env, tmp_path / "serve.log", *flags)
        try:
            status, reply = post_chat(base)
        finally:
            proc.terminate()
            proc.wait(30)
            assert proc.stdout is not None
            proc.stdout.close()
        assert status == expected, reply
        if flags:
            assert reply["error"]["code"] == "model_download_failed"
            assert "offline" in reply["error"]["message"]
            assert hub.storage.log == []  # --offline reached the download: nothing fetched
        else:
            assert reply["choices"][0]["message"]["content"]
    assert (tmp_path / "hf-home" / "hub").is_dir()
