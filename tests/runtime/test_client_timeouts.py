"""The clients' time limits against a fake upstream: the longest silence and the total deadline.

The fake goes silent mid-stream (a fault a healthy llama-server cannot produce); the real
server's long stream is in test_server_real.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest
from proxy_fakes import FakeUpstream, UpstreamBehaviour

from llama_proc.errors import ServerTimeoutError
from llama_proc.runtime.async_client import AsyncLlamaClient
from llama_proc.runtime.client import LlamaClient

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.timeout(60)

HELLO = [{"role": "user", "content": "hi"}]


@contextmanager
def upstream_in_thread(behaviour: UpstreamBehaviour) -> Iterator[FakeUpstream]:
    """A FakeUpstream served by its own event loop in a thread (for the blocking client)."""
    loop = asyncio.new_event_loop()
    fake = FakeUpstream(behaviour=behaviour)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_async_silence_fails_naming_the_limit() -> None:
    async def main() -> tuple[float, int, ServerTimeoutError]:
        fake = FakeUpstream(behaviour=UpstreamBehaviour(tokens=10, stall_after=3))
        await fake.start()
        got = 0

        async def consume(client: AsyncLlamaClient) -> None:
            nonlocal got
            async for _chunk in client.chat_stream(HELLO):
                got += 1

        try:
            async with AsyncLlamaClient(fake.url, timeout=0.5) as client:
                start = time.monotonic()
                with pytest.raises(ServerTimeoutError) as info:
                    await consume(client)
                return time.monotonic() - start, got, info.value
        finally:
            await fake.stop()

    elapsed, got, err = asyncio.run(main())
    assert got == 3
    assert elapsed < 2.0
    assert "sent nothing for 0.5 s" in str(err)
    assert "request_timeout" in str(err)
    assert isinstance(err, TimeoutError)


def test_async_long_stream_is_not_cut_by_the_silence_limit() -> None:
    # 30 tokens 0.1 s apart: 3 s in all, six times the longest silence allowed.
    async def main() -> int:
        fake = FakeUpstream(behaviour=UpstreamBehaviour(tokens=30, token_delay=0.1))
        await fake.start()
        try:
            async with AsyncLlamaClient(fake.url, timeout=0.5) as client:
                return len([c async for c in client.chat_stream(HELLO)])
        finally:
            await fake.stop()

    assert asyncio.run(main()) == 31  # 30 tokens and the finish chunk


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_total_timeout_bounds_a_stream_that_never_stops_producing(mode: str) -> None:
    behaviour = UpstreamBehaviour(tokens=1000, token_delay=0.05)
    if mode == "async":

        async def main() -> ServerTimeoutError:
            fake = FakeUpstream(behaviour=behaviour)
            await fake.start()
            try:
                async with AsyncLlamaClient(fake.url, timeout=5, total_timeout=1.0) as client:
                    with pytest.raises(ServerTimeoutError) as info:
                        async for _chunk in client.chat_stream(HELLO):
                            pass
                    return info.value
            finally:
                await fake.stop()

        start = time.monotonic()
        err = asyncio.run(main())
    else:
        with (
            upstream_in_thread(behaviour) as fake,
            LlamaClient(fake.url, timeout=5, total_timeout=1.0) as client,
        ):
            start = time.monotonic()
            with pytest.raises(ServerTimeoutError) as info:
                for _chunk in client.chat_stream(HELLO):
                    pass
            err = info.value
    assert time.monotonic() - start < 2.0
    assert "total timeout of 1 s" in str(err)


def test_sync_silence_fails_naming_the_limit() -> None:
    behaviour = UpstreamBehaviour(tokens=10, stall_after=3)
    with upstream_in_thread(behaviour) as fake, LlamaClient(fake.url, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(ServerTimeoutError, match=r"sent nothing for 0\.5 s"):
            list(client.chat_stream(HELLO))
        assert time.monotonic() - start < 2.0


def test_sync_total_timeout_cuts_a_silence_shorter_than_the_silence_limit() -> None:
    behaviour = UpstreamBehaviour(tokens=10, stall_after=2)
    with (
        upstream_in_thread(behaviour) as fake,
        LlamaClient(fake.url, timeout=30, total_timeout=1.0) as client,
    ):
        start = time.monotonic()
        with pytest.raises(ServerTimeoutError, match="total timeout of 1 s"):
            list(client.chat_stream(HELLO))
        assert time.monotonic() - start < 2.0
