"""LlamaServer and AsyncLlamaServer given a Hugging Face reference instead of a path.

A loopback fake hub (tests/helpers/fake_hub.py) serves the real SmolLM2 GGUF as
``test/SmolLM2-135M-Instruct-GGUF``; the real llama-server answers the chat requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fake_hub import FakeHub, sha256_of
from hub_env import SMOL_FILE, SMOL_REPO, use_fake_hub
from huggingface_hub import constants

from llama_proc.errors import InvalidArgumentError, ModelFileError, ServerStartError
from llama_proc.models.model_ref import ModelRef
from llama_proc.server import AsyncLlamaServer, LlamaServer

if TYPE_CHECKING:
    from collections.abc import Iterator

HI = [{"role": "user", "content": "Say hello."}]
SMALL: dict[str, Any] = {"ctx_size": 512, "threads": 1}
TRICKLE_CHUNK = 1 << 20


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    with FakeHub() as server:
        yield server


@pytest.fixture
def hf_cache(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, tmp_path: Path) -> Path:
    return use_fake_hub(monkeypatch, hub, tmp_path / "hf-home")


def _blob_gets(hub: FakeHub) -> list[str]:
    return [h.path for h in hub.storage.log if h.method == "GET"]


def _trickle(hub: FakeHub, seconds_per_mib: float) -> None:
    route = hub.blob_route(SMOL_REPO, SMOL_FILE)
    route.chunk_size = TRICKLE_CHUNK
    route.delay = seconds_per_mib


def _answer(reply: dict[str, Any]) -> str:
    content = reply["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    return content


def test_a_reference_is_fetched_then_served(
    hub: FakeHub, hf_cache: Path, smol_model: Path, llama_server_bin: Path
) -> None:
    hub.add_repo(SMOL_REPO, {SMOL_FILE: smol_model, "SmolLM2-135M-Instruct.Q8_0.gguf": b"GGUF"})
    seen: list[tuple[int, int]] = []
    server = LlamaServer(
        f"{SMOL_REPO}:q4_1",
        binary=llama_server_bin,
        on_download_progress=lambda done, total: seen.append((done, total)),
        **SMALL,
    )
    assert server.model_ref == ModelRef(SMOL_REPO, quant="Q4_1")
    assert _blob_gets(hub) == []  # nothing is fetched before start()
    with server:
        assert _answer(server.chat(HI, max_tokens=8))
        model = server.args.model
        assert isinstance(model, Path)
        assert model.name == SMOL_FILE
        assert model.is_relative_to(hf_cache)
        assert sha256_of(model) == sha256_of(smol_model)
        size = smol_model.stat().st_size
        assert seen[-1] == (size, size)
        hub_calls = len(hub.log)
        server.restart()  # the fetched files are remembered: no second hub round trip
        assert _answer(server.chat(HI, max_tokens=4))
    assert len(hub.log) == hub_calls
    assert _blob_gets(hub) == [hub.blob_path(SMOL_REPO, SMOL_FILE)]
    assert "test/SmolLM2-135M-Instruct-GGUF:Q4_1" in repr(server)


def test_the_start_timeout_does_not_count_the_download(
    hub: FakeHub, hf_cache: Path, smol_model: Path, llama_server_bin: Path
) -> None:
    hub.add_repo(SMOL_REPO, {SMOL_FILE: smol_model})
    _trickle(hub, 0.05)  # ~94 MiB: about 5 s, more than twice the start timeout
    timeout = 2.0
    began = time.monotonic()
    with LlamaServer(
        f"hf://{SMOL_REPO}/{SMOL_FILE}", binary=llama_server_bin, start_timeout=timeout, **SMALL
    ) as server:
        elapsed = time.monotonic() - began
        assert server.ready_after is not None
        assert server.ready_after < timeout
        assert elapsed - server.ready_after > timeout  # the download alone outlasted it
        assert _answer(server.chat(HI, max_tokens=8))


def test_stop_abandons_a_download_and_a_later_start_fetches_it(
    hub: FakeHub,
    hf_cache: Path,
    smol_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    hub.add_repo(SMOL_REPO, {SMOL_FILE: smol_model})
    _trickle(hub, 0.1)  # ~10 s for the whole file
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", TRICKLE_CHUNK)  # progress every MiB
    progressed = threading.Event()
    server = LlamaServer(
        f"{SMOL_REPO}:Q4_1",
        binary=tmp_path / "never-run",  # the start ends before a binary is needed
        on_download_progress=lambda done, total: progressed.set(),
    )
    errors: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as err:  # noqa: BLE001 - inspected below
            errors.append(err)

    thread = threading.Thread(target=start)
    thread.start()
    assert progressed.wait(30)
    stopped_at = time.monotonic()
    server.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - stopped_at < 5
    assert len(errors) == 1
    assert isinstance(errors[0], ServerStartError)
    assert "download" in str(errors[0])
    assert server.pid is None

    assert list(hf_cache.rglob("*.incomplete")) == []  # huggingface_hub drops the part

    hub.blob_route(SMOL_REPO, SMOL_FILE).delay = 0.0
    files = server.fetch_model()
    assert sha256_of(files.model) == sha256_of(smol_model)
    assert len(_blob_gets(hub)) == 2
    assert server.args.model == files.model


def test_mmproj_true_fetches_the_projector(hub: FakeHub, hf_cache: Path) -> None:
    hub.add_repo(
        "org/vision",
        {"v-Q4_K_M.gguf": b"GGUF m", "mmproj-F16.gguf": b"GGUF p16", "mmproj-Q8_0.gguf": b"p8"},
    )
    plain = LlamaServer("org/vision")
    assert plain.fetch_model().mmproj is None
    assert plain.args.mmproj is None
    assert len(_blob_gets(hub)) == 1

    server = LlamaServer("org/vision", mmproj=True)
    files = server.fetch_model()
    assert files.mmproj is not None
    assert files.mmproj.name == "mmproj-F16.gguf"
    assert server.args.mmproj == files.mmproj
    argv = server.args.to_argv()
    assert argv[argv.index("--mmproj") + 1] == str(files.mmproj)
    assert argv[argv.index("--model") + 1] == str(files.model)


def test_mmproj_as_a_path_is_passed_through(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    server = LlamaServer(model, mmproj=tmp_path / "p.gguf")
    assert server.args.mmproj == tmp_path / "p.gguf"
    assert server.model_ref is None


def test_mmproj_true_needs_a_reference(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="mmproj=True") as info:
        LlamaServer(tmp_path / "m.gguf", mmproj=True)
    assert "\n" not in str(info.value)


def test_a_split_reference_passes_the_first_part(
    hub: FakeHub, hf_cache: Path, smol_model: Path
) -> None:
    data = smol_model.read_bytes()
    third = len(data) // 3
    pieces = [data[:third], data[third : 2 * third], data[2 * third :]]
    names = [f"Q4_1/SmolLM2-135M-Instruct-Q4_1-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    hub.add_repo(SMOL_REPO, dict(zip(names, pieces, strict=True)))
    server = LlamaServer(f"{SMOL_REPO}:Q4_1")
    files = server.fetch_model()
    assert server.args.model == files.parts[0]
    assert Path(str(server.args.model)).name == Path(names[0]).name
    assert b"".join(p.read_bytes() for p in files.parts) == data


def test_an_existing_path_wins_over_a_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "repo").write_bytes(b"GGUF")
    server = LlamaServer("org/repo")
    assert server.model_ref is None
    assert server.args.model == Path("org/repo")
    assert server.fetch_model().model == Path("org/repo")


def test_a_missing_quantization_fails_before_anything_runs(
    hub: FakeHub, hf_cache: Path, tmp_path: Path
) -> None:
    hub.add_repo("org/m", {"m-Q4_0.gguf": b"GGUF"})
    server = LlamaServer("org/m:Q8_0", binary=tmp_path / "never-run")
    with pytest.raises(ModelFileError, match="it has: Q4_0") as info:
        server.start()
    assert "\n" not in str(info.value)
    assert server.pid is None


def test_async_server_with_a_reference(
    hub: FakeHub, hf_cache: Path, smol_model: Path, llama_server_bin: Path
) -> None:
    hub.add_repo(SMOL_REPO, {SMOL_FILE: smol_model})

    async def main() -> str:
        async with AsyncLlamaServer(SMOL_REPO, binary=llama_server_bin, **SMALL) as server:
            assert server.server.model_ref == ModelRef(SMOL_REPO)
            return _answer(await server.chat(HI, max_tokens=8))

    assert asyncio.run(main())


def test_async_fetch_model_downloads_ahead_of_start(hub: FakeHub, hf_cache: Path) -> None:
    hub.add_repo("org/m", {"m-Q4_0.gguf": b"GGUF q4"})
    server = AsyncLlamaServer("org/m:q4_0")
    files = asyncio.run(server.fetch_model())
    assert files.model.read_bytes() == b"GGUF q4"
    assert server.args.model == files.model
    assert not server.is_running
