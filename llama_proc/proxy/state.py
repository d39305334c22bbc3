"""What the proxy's handlers share: the pool, the upstream session, metrics and checkers.

The state is started with the app (the upstream session opened, the binary's flags probed, the
pool started) and closed with it (every server stopped).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import aiohttp

from llama_proc.proxy.body_policy import BodyChecker
from llama_proc.proxy.downloads import ModelDownloads
from llama_proc.proxy.flag_checker import FlagChecker
from llama_proc.proxy.metrics import ProxyMetrics
from llama_proc.proxy.relay import UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_KEEPALIVE

if TYPE_CHECKING:
    from llama_proc.proxy.models_config import ModelsConfig
    from llama_proc.proxy.options import ProxyOptions
    from llama_proc.proxy.pool import ServerPool
    from llama_proc.proxy.upstream import UpstreamConnections

__all__ = [
    "ProxyState",
]


class ProxyState:
    """The pool, the upstream session, the metrics and the checkers every handler uses."""

    def __init__(
        self,
        models: ModelsConfig,
        pool: ServerPool,
        options: ProxyOptions,
        downloads: ModelDownloads | None = None,
    ) -> None:
        self.models = models
        self.pool = pool
        self.options = options
        self.downloads = downloads if downloads is not None else ModelDownloads()
        self.metrics = ProxyMetrics(pool)
        self.flags = FlagChecker(options.flag_caps)
        self.bodies = BodyChecker(options.body_caps)
        self.session: aiohttp.ClientSession | None = None
        self.created = int(time.time())
        # Client connections with a request in the handler (the rest are idle or still
        # sending headers, and may be closed to make room for a new connection).
        self.busy: dict[object, int] = {}
        self.only_model = next(iter(models)).id if len(models) == 1 else None
        self.shutting_down = False
        # Connections to each server's base URL: kept alive, and opened ahead for streams.
        self.upstreams: dict[str, UpstreamConnections] = {}
        self.background: set[asyncio.Task[None]] = set()
        # ids of requests whose stream went through to its end (a hang-up after that is no
        # client disconnect).
        self.complete: set[int] = set()

    async def startup(self) -> None:
        """Open the upstream session, probe the binary's flags and start the pool."""
        self.session = aiohttp.ClientSession(
            # llama-server drops idle keep-alive connections after 5 s: retire ours first so a
            # request never goes out on a socket the server is closing.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE),
            timeout=aiohttp.ClientTimeout(total=None, connect=UPSTREAM_CONNECT_TIMEOUT),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        # Request flags are checked against the binary's options (its --help, probed once and
        # cached) before the pool sees them.
        binary = await asyncio.to_thread(self.pool.binary_flags)
        self.flags = FlagChecker(self.options.flag_caps, binary)
        await self.pool.start()

    async def shutdown(self) -> None:
        """Refuse new requests and end the ones waiting for a download."""
        self.shutting_down = True
        # Requests waiting for a model download end now, not after the drain timeout.
        await self.downloads.close()

    async def cleanup(self) -> None:
        """Stop every server and close every upstream connection."""
        await self.downloads.close()
        await self.pool.close()
        if self.session is not None:
            await self.session.close()
        upstreams, self.upstreams = list(self.upstreams.values()), {}
        for upstream in upstreams:
            await upstream.close()
