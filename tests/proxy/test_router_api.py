"""``serve``'s router API (llama-server's router-mode shapes): list, load, SSE, unload, ``?model=``.

The client flow runs against a real llama-server and model; the shapes are compared with those
the real binary answers in router mode (recorded in ``data/router_shapes.json``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import openai
import pytest
from fake_hub import FakeHub
from hub_env import SMOL_FILE, SMOL_REPO, use_fake_hub
from huggingface_hub import constants
from proxy_harness import running_proxy, wait_until

from llama_proc.proxy.events import ModelEvents, status_events
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec, load_models_config
from llama_proc.proxy.options import ProxyOptions
from llama_proc.proxy.servers import LlamaServerFactory

if TYPE_CHECKING:
    from collections.abc import Iterator

SHAPES: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "router_shapes.json").read_text()
)


@pytest.fixture
def factory(llama_server_bin: Path) -> LlamaServerFactory:
    return LlamaServerFactory(binary=llama_server_bin, start_timeout=120)


def smol(model: Path) -> ModelsConfig:
    options = MappingProxyType({"threads": 1, "parallel": 1, "ctx_size": 512})
    return ModelsConfig({"smol": ModelSpec(id="smol", path=model, options=options)})


def call(
    base: str, method: str, path: str, body: object = None, key: str | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class EventReader:
    """Reads ``GET /models/sse`` in a thread, collecting each ``data:`` event."""

    def __init__(self, url: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._resp = urllib.request.urlopen(url, timeout=120)
        self.content_type = self._resp.headers.get("Content-Type", "")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for raw in self._resp:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
        except (OSError, ValueError):
            return

    def statuses(self, model: str) -> list[str]:
        return [e["data"].get("status", "") for e in self.events if e["model"] == model]

    def close(self) -> None:
        self._resp.close()


@pytest.fixture
def events() -> Iterator[list[EventReader]]:
    readers: list[EventReader] = []
    yield readers
    for reader in readers:
        reader.close()


def test_router_client_flow_list_load_sse_chat_unload(
    smol_model: Path, factory: LlamaServerFactory, events: list[EventReader]
) -> None:
    with running_proxy(smol(smol_model), factory, max_servers=1, idle_ttl=0) as proxy:
        base = proxy.base_url
        status, listed = call(base, "GET", "/models")
        assert status == 200
        upstream = SHAPES["list"]
        assert set(listed) == set(upstream)
        (entry,) = listed["data"]
        assert set(entry) == set(upstream["data"][0])
        assert entry["id"] == "smol"
        assert entry["status"] == {"value": "unloaded"}
        # /props without ?model= describes the router, as llama-server's does.
        status, props = call(base, "GET", "/props")
        assert status == 200
        assert set(props) == set(SHAPES["props"])
        assert props["role"] == "router"
        assert props["max_instances"] == 1
        # The OpenAI list stays as it was, beside the router's.
        assert call(base, "GET", "/v1/models")[1]["data"][0]["id"] == "smol"

        reader = EventReader(base + "/models/sse")
        events.append(reader)
        assert reader.content_type.startswith("text/event-stream")
        time.sleep(0.3)  # the stream's baseline is taken before the load starts
        assert call(base, "POST", "/models/load", {"model": "smol"}) == (200, SHAPES["load_ok"])
        assert wait_until(
            lambda: call(base, "GET", "/models")[1]["data"][0]["status"]["value"] == "loaded", 120
        )
        assert wait_until(lambda: "loaded" in reader.statuses("smol"), 10), reader.events
        seen = reader.statuses("smol")
        assert seen.index("loading") < seen.index("loaded"), seen
        names = [e["event"] for e in reader.events]
        assert names[0] == "model_status"
        assert "status_change" in names
        for event in reader.events:
            assert set(event) == set(SHAPES["sse_events"][0]), event
        # Loading a loaded model is refused as the router refuses it.
        status, body = call(base, "POST", "/models/load", {"model": "smol"})
        assert status == SHAPES["load_running"]["status"]
        assert body["error"]["message"] == SHAPES["load_running"]["error"]["message"]
        (server,) = proxy.servers()

        # Chat goes to the server the load started (no second start).
        sdk = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = sdk.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert (reply.choices[0].message.content or "").strip()
        assert [s["key"] for s in proxy.servers()] == [server["key"]]
        assert proxy.servers()[0]["starts"] == 1

        # GET endpoints route by ?model= to that server.
        status, props = call(base, "GET", "/props?model=smol")
        assert status == 200
        assert props["default_generation_settings"]["n_ctx"] == 512
        status, slots = call(base, "GET", "/slots?model=smol")
        assert status == 200
        assert len(slots) == 1
        with urllib.request.urlopen(base + "/metrics?model=smol", timeout=30) as resp:
            text = resp.read().decode()
        assert "llamacpp:prompt_tokens_total" in text
        assert "llama_proc_proxy_requests_total" not in text  # the server's own, not the proxy's
        assert call(base, "GET", "/props?model=nope")[0] == 404

        assert call(base, "POST", "/models/unload", {"model": "smol"}) == (
            200,
            SHAPES["unload_ok"],
        )
        assert call(base, "GET", "/models")[1]["data"][0]["status"] == {"value": "unloaded"}
        assert wait_until(lambda: reader.statuses("smol")[-1:] == ["unloaded"], 10)
        status, body = call(base, "POST", "/models/unload", {"model": "smol"})
        assert status == SHAPES["unload_not_running"]["status"]
        assert body["error"]["message"] == SHAPES["unload_not_running"]["error"]["message"]
        assert proxy.servers() == []
        assert call(base, "POST", "/models/load", {"model": "nope"})[0] == 404


def test_failed_load_is_listed_as_failed(
    tmp_path: Path, factory: LlamaServerFactory, events: list[EventReader]
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(4096))
    models = ModelsConfig({"bad": ModelSpec(id="bad", path=bad, options={"threads": 1})})
    with running_proxy(models, factory, max_servers=1) as proxy:
        base = proxy.base_url
        reader = EventReader(base + "/models/sse")
        events.append(reader)
        time.sleep(0.3)
        assert call(base, "POST", "/models/load", {"model": "bad"})[0] == 200

        def failed() -> bool:
            status = call(base, "GET", "/models")[1]["data"][0]["status"]
            return bool(status.get("failed"))

        assert wait_until(failed, 60)
        status = call(base, "GET", "/models")[1]["data"][0]["status"]
        assert status["value"] == "unloaded"
        assert set(status) <= set(SHAPES["status_failed"])
        assert wait_until(lambda: "unloaded" in reader.statuses("bad"), 10), reader.events
        assert "loading" in reader.statuses("bad")


def test_load_and_unload_need_an_admin_key(smol_model: Path, factory: LlamaServerFactory) -> None:
    options = ProxyOptions(api_keys=("user-key",), admin_keys=("admin-key",))
    with running_proxy(smol(smol_model), factory, options=options) as proxy:
        base = proxy.base_url
        assert call(base, "GET", "/models", key="user-key")[0] == 200
        assert call(base, "GET", "/models")[0] == 401
        status, body = call(base, "POST", "/models/load", {"model": "smol"}, key="user-key")
        assert status == 403
        assert body["error"]["code"] == "admin_key_required"
        assert call(base, "POST", "/models/unload", {"model": "smol"}, key="user-key")[0] == 403
        status, _ = call(base, "POST", "/models/unload", {"model": "smol"}, key="admin-key")
        assert status == 400  # allowed, and nothing is running


def test_loading_a_hub_model_streams_its_download_progress(
    smol_model: Path,
    factory: LlamaServerFactory,
    events: list[EventReader],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeHub() as hub:
        use_fake_hub(monkeypatch, hub, tmp_path / "hf-home")
        hub.add_repo(SMOL_REPO, {SMOL_FILE: smol_model})
        route = hub.blob_route(SMOL_REPO, SMOL_FILE)
        route.chunk_size, route.delay = 1 << 20, 0.03  # ~94 MiB in about 3 s
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)
        config = tmp_path / "models.toml"
        config.write_text(
            f"[defaults]\nthreads = 1\nctx_size = 512\n\n"
            f'[models.smol]\nmodel = "hf://{SMOL_REPO}/{SMOL_FILE}"\n'
        )
        with running_proxy(load_models_config(config), factory, max_servers=1) as proxy:
            base = proxy.base_url
            reader = EventReader(base + "/models/sse")
            events.append(reader)
            time.sleep(0.3)
            assert call(base, "POST", "/models/load", {"model": "smol"})[0] == 200
            assert wait_until(lambda: "loaded" in reader.statuses("smol"), 120), reader.events
            progress = [
                e["data"]["progress"]["value"]
                for e in reader.events
                if e["event"] == "download_progress"
            ]
            assert len(progress) >= 3, reader.events
            assert progress == sorted(progress)
            assert any(0 < value < 1 for value in progress), progress
            seen = reader.statuses("smol")
            assert seen.index("downloading") < seen.index("loaded")
            assert call(base, "GET", "/models")[1]["data"][0]["status"] == {"value": "loaded"}


def test_a_slow_listener_is_dropped_and_listeners_are_bounded() -> None:
    async def main() -> None:
        current: dict[str, dict[str, Any]] = {"m": {"value": "unloaded"}}
        hub = ModelEvents(lambda: dict(current), interval=60, max_subscribers=2, queue_size=4)
        slow = hub.subscribe()
        fast = hub.subscribe()
        assert slow is not None
        assert fast is not None
        assert hub.subscribe() is None  # the third is refused
        for i in range(3):
            hub.publish({"model": "m", "event": "status_change", "data": {"i": i}})
        while not fast.queue.empty():
            fast.queue.get_nowait()
        for i in range(3, 6):
            hub.publish({"model": "m", "event": "status_change", "data": {"i": i}})
        # The slow one had 4 unread: it is dropped, its stream ends, nothing more is held.
        assert slow.dropped
        assert slow.queue.qsize() == 1
        assert slow.queue.get_nowait() is None
        assert hub.subscribers == 1
        assert hub.dropped == 1
        assert hub.subscribe() is not None  # its place is free again
        await hub.close()
        assert fast.queue.get_nowait() is None  # closing ends every stream

    asyncio.run(main())


def test_status_changes_become_upstreams_events() -> None:
    before: dict[str, dict[str, Any]] = {"a": {"value": "unloaded"}, "gone": {"value": "loaded"}}
    after: dict[str, dict[str, Any]] = {
        "a": {"value": "loading"},
        "b": {"value": "downloading", "progress": {"value": 0.5}},
    }
    events = status_events(before, after)
    assert events == [
        {"model": "a", "event": "model_status", "data": {"status": "loading"}},
        {"model": "a", "event": "status_change", "data": {"status": "loading"}},
        {
            "model": "b",
            "event": "download_progress",
            "data": {"status": "downloading", "progress": {"value": 0.5}},
        },
        {"model": "gone", "event": "model_remove", "data": {}},
    ]
    assert status_events(after, after) == []
