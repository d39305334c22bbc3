"""Thread counts for pooled servers: the cores are split between the servers that run at once."""

from __future__ import annotations

import asyncio
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import pytest
from proxy_fakes import record_server_starts

from llama_proc.proxy.models_config import ModelSpec
from llama_proc.proxy.servers import LlamaServerFactory
from llama_proc.proxy.threads import names_threads, split_threads, with_threads

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize(
    ("cpus", "servers", "threads"),
    [
        pytest.param(2, 1, None, id="one-server-keeps-llama-server-default"),
        pytest.param(2, 2, 1, id="two-on-two"),
        pytest.param(16, 2, 8, id="sixteen-on-two"),
        pytest.param(16, 3, 5, id="rounds-down"),
        pytest.param(2, 4, 1, id="never-below-one"),
        pytest.param(1, 1, None, id="one-core"),
    ],
)
def test_split_threads(cpus: int, servers: int, threads: int | None) -> None:
    assert split_threads(cpus, servers) == threads


@pytest.mark.parametrize(
    ("options", "extra", "expected"),
    [
        pytest.param({}, (), 3, id="unset-gets-the-share"),
        pytest.param({"threads": 6}, (), 6, id="config-option-wins"),
        pytest.param({}, ("-t", "6"), None, id="short-flag-wins"),
        pytest.param({}, ("--threads", "6"), None, id="long-flag-wins"),
        pytest.param({}, ("--threads=6",), None, id="joined-flag-wins"),
        pytest.param({}, ("-tb", "6"), 3, id="threads-batch-is-another-flag"),
    ],
)
def test_with_threads(
    options: dict[str, Any], extra: tuple[str, ...], expected: int | None
) -> None:
    assert with_threads(options, extra, 3).get("threads") == expected
    assert with_threads(options, extra, None).get("threads") == options.get("threads")


def test_names_threads() -> None:
    assert names_threads(["-c", "512", "-t", "2"])
    assert not names_threads(["-c", "512", "-tb", "2", "--threads-http", "4"])


def test_factory_gives_each_server_its_share(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started = record_server_starts(monkeypatch)
    factory = LlamaServerFactory(binary=tmp_path / "llama-server", threads=4)
    plain = ModelSpec(id="a", path=tmp_path / "a.gguf")
    pinned = ModelSpec(id="b", path=tmp_path / "b.gguf", options=MappingProxyType({"threads": 1}))

    for spec, flags in ((plain, ()), (pinned, ()), (plain, ("-t", "2"))):
        with pytest.raises(RuntimeError, match="recorded"):
            asyncio.run(factory(spec, flags))
    assert [s.get("threads") for s in started] == [4, 1, None]
    assert started[2]["extra_args"] == ("-t", "2")
