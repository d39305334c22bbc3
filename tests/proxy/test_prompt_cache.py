"""Pooled servers' prompt caches are bounded per server and counted in the memory budget."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import MappingProxyType

import pytest
from proxy_fakes import record_server_starts

from llama_proc.proxy.models_config import ModelSpec
from llama_proc.proxy.prompt_cache import (
    POOLED_CACHE_RAM_MIB,
    UNLIMITED_COUNTS_AS_MIB,
    cache_ram_mib,
    prompt_cache_bytes,
    with_cache_ram,
    with_prompt_cache,
)
from llama_proc.proxy.servers import LlamaServerFactory

MIB = 1 << 20


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), None),
        (("--cache-ram", "512"), 512),
        (("-cram=0",), 0),
        (("--cache-ram", "64", "-c", "512", "-cram", "128"), 128),
        (("--cache-ram", "lots"), None),
    ],
)
def test_the_cache_ram_an_argument_list_gives(args: tuple[str, ...], expected: int | None) -> None:
    assert cache_ram_mib(args) == expected


def test_the_pool_sets_a_limit_only_where_none_is_set_and_the_binary_knows_it() -> None:
    assert with_cache_ram(("-c", "512"), 256, accepted=True) == ("-c", "512", "--cache-ram", "256")
    assert with_cache_ram(("-cram", "0"), 256, accepted=True) == ("-cram", "0")
    assert with_cache_ram(("-c", "512"), 256, accepted=False) == ("-c", "512")
    assert with_cache_ram(("-c", "512"), None, accepted=True) == ("-c", "512")


def test_the_estimate_counts_what_the_cache_may_hold() -> None:
    plain = ModelSpec(id="a", path=Path("/m/a.gguf"))
    off = ModelSpec(id="b", path=Path("/m/b.gguf"), extra_args=("-cram", "0"))
    configured = ModelSpec(
        id="c", path=Path("/m/c.gguf"), options=MappingProxyType({"extra_args": ("-cram", "64")})
    )
    assert prompt_cache_bytes(plain, (), POOLED_CACHE_RAM_MIB) == POOLED_CACHE_RAM_MIB * MIB
    assert prompt_cache_bytes(off, (), POOLED_CACHE_RAM_MIB) == 0
    assert prompt_cache_bytes(configured, (), POOLED_CACHE_RAM_MIB) == 64 * MIB
    unlimited = prompt_cache_bytes(plain, ("--cache-ram", "-1"), POOLED_CACHE_RAM_MIB)
    assert unlimited == UNLIMITED_COUNTS_AS_MIB * MIB
    estimate = with_prompt_cache(lambda _spec, _flags: 100 * MIB, POOLED_CACHE_RAM_MIB)
    assert estimate(plain, ()) == (100 + POOLED_CACHE_RAM_MIB) * MIB
    assert estimate(off, ()) == 100 * MIB


def test_the_factory_gives_the_real_binary_its_limit(
    llama_server_bin: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real binary's --help says it knows --cache-ram, so each server gets one."""
    started = record_server_starts(monkeypatch)
    factory = LlamaServerFactory(binary=llama_server_bin, cache_ram=256)
    plain = ModelSpec(id="a", path=tmp_path / "a.gguf")
    own = ModelSpec(id="b", path=tmp_path / "b.gguf", extra_args=("--cache-ram", "0"))
    for spec in (plain, own):
        with pytest.raises(RuntimeError, match="recorded"):
            asyncio.run(factory(spec, ()))
    assert started[0]["extra_args"] == ("--cache-ram", "256")
    assert started[1]["extra_args"] == ("--cache-ram", "0")


def test_a_real_pooled_server_runs_with_its_limit(llama_server_bin: Path, smol_model: Path) -> None:
    async def main() -> list[str]:
        factory = LlamaServerFactory(
            binary=llama_server_bin, cache_ram=POOLED_CACHE_RAM_MIB, start_timeout=120
        )
        spec = ModelSpec(
            id="smol",
            path=smol_model,
            options=MappingProxyType({"ctx_size": 512, "threads": 1, "parallel": 1}),
        )
        handle = await factory(spec, ())
        try:
            pid = handle.pid
            assert pid is not None
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        finally:
            await handle.stop()

    if not Path("/proc/self/cmdline").exists():
        pytest.skip("reads the server's command line from /proc")
    argv = asyncio.run(main())
    at = argv.index("--cache-ram")
    assert argv[at + 1] == str(POOLED_CACHE_RAM_MIB)
