"""What a tenant learns when its model cannot be served: the model and what went wrong, never
the host's paths, pids or llama-server's log (the operator's log keeps them)."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from huggingface_hub import constants
from proxy_harness import running_proxy

from llama_proc.errors import ModelFileError, ServerStartError
from llama_proc.models.model_ref import ModelRef
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec

if TYPE_CHECKING:
    from llama_proc.proxy.servers import ServerHandle

SECRET = "/srv/operator-only/models"
PID = "48213"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class _FailingFactory:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def __call__(self, spec: ModelSpec, flags: tuple[str, ...]) -> ServerHandle:
        raise self.error


def _chat(base_url: str, model: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        base_url + "/v1/chat/completions",
        data=json.dumps({**CHAT, "model": model}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(
            ServerStartError(
                f"llama-server (pid {PID}) exited before it was ready",
                1,
                f"{SECRET}/a.gguf is not a GGUF model file",
                [f"E llama_model_load: failed to load {SECRET}/a.gguf", "E exiting"],
            ),
            id="start",
        ),
        pytest.param(ModelFileError(f"model file {SECRET}/a.gguf does not exist"), id="model-file"),
    ],
)
def test_a_failed_start_tells_the_tenant_no_host_details(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    models = ModelsConfig({"a": ModelSpec(id="a", path=Path(f"{SECRET}/a.gguf"))})
    caplog.set_level(logging.WARNING, logger="llama_proc")
    with running_proxy(models, _FailingFactory(error)) as proxy:
        status, body = _chat(proxy.base_url, "a")

    message = body["error"]["message"]
    assert status == 503
    assert "'a'" in message
    assert SECRET not in message
    assert PID not in message
    assert "\n" not in message
    assert SECRET in caplog.text  # the operator still sees everything


def test_a_failed_download_tells_the_tenant_no_host_details(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "operator-only-hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models = ModelsConfig({"h": ModelSpec(id="h", ref=ModelRef("org/m", quant="Q4_0"))})
    caplog.set_level(logging.WARNING, logger="llama_proc")
    with running_proxy(models, _FailingFactory(AssertionError("never started"))) as proxy:
        status, body = _chat(proxy.base_url, "h")

    message = body["error"]["message"]
    assert status == 503
    assert "'h'" in message
    assert str(tmp_path) not in message
    assert str(cache) in caplog.text
