"""What the pool runs: the server handle protocol, the pool's errors, the real factory.

The pool never talks HTTP itself: a *factory* (:data:`ServerFactory`) starts a server for a
model and a tuple of extra flags and returns a :class:`ServerHandle`. The real factory,
:class:`LlamaServerFactory`, runs llama-server through :mod:`llama_proc.server` and adapts
:class:`~llama_proc.server.AsyncLlamaServer` to the protocol; tests inject a fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from llama_proc._childenv import child_environment
from llama_proc.errors import ServerError
from llama_proc.proxy.measure import Measured, SlotUse, measure_process, slot_use
from llama_proc.proxy.prompt_cache import CACHE_RAM_FLAGS, with_cache_ram
from llama_proc.proxy.threads import with_threads
from llama_proc.runtime.flags import BinaryFlags, probe_flags
from llama_proc.server import AsyncLlamaServer

if TYPE_CHECKING:
    from pathlib import Path

    from llama_proc.config import Settings
    from llama_proc.proxy.models_config import ModelSpec

__all__ = [
    "LlamaServerFactory",
    "ModelTooLargeError",
    "PoolBusyError",
    "PoolClosedError",
    "PoolQueueFullError",
    "ServerFactory",
    "ServerHandle",
]

PROPS_TIMEOUT: Final = 10.0
"""Seconds to read a new server's ``/props`` (its slot count)."""


@runtime_checkable
class ServerHandle(Protocol):
    """A started server as the pool sees it.

    Optional extras the pool and proxy use when a handle has them: ``returncode`` (reported
    after a crash), ``logs()`` (a log tail for the crash report), ``api_key`` (sent as a
    Bearer token on every forwarded request), ``slots`` (requests it serves at once: the
    pool's default concurrency for it) and ``async probe(timeout) -> bool`` (whether the
    server's main loop still answers; without it a server is never judged wedged) and
    ``measure() -> Measured | None`` (what it holds now, blocking: the pool runs it in a
    thread and budgets against it instead of the estimate).
    """

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""

    @property
    def is_running(self) -> bool:
        """Whether the process is still alive."""

    @property
    def pid(self) -> int | None:
        """Process id, when there is one."""

    async def stop(self) -> None:
        """Stop the server (idempotent)."""


ServerFactory = Callable[["ModelSpec", tuple[str, ...]], Awaitable[ServerHandle]]
"""Starts a server for (model, extra flags) and returns it once it answers requests."""


class PoolBusyError(ServerError):
    """No server slot freed up in time, or a server is busy and cannot be removed."""


class PoolQueueFullError(PoolBusyError):
    """The model's queue is full; ``retry_after`` says when to try again (seconds)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after)
        self.retry_after = retry_after

    def __str__(self) -> str:
        return str(self.args[0])


class ModelTooLargeError(ServerError):
    """The model's estimated memory exceeds the pool's whole memory budget."""


class PoolClosedError(ServerError):
    """The pool is shutting down and takes no new requests."""


# -- the real factory --------------------------------------------------------------------------


class LlamaServerFactory:
    """Starts real llama-servers through :class:`llama_proc.server.AsyncLlamaServer`.

    Every server gets ``--metrics`` (the proxy's ``/metrics`` merges them) unless a model's
    options say otherwise.

    Args:
        binary: the llama-server to run; None = resolve through provisioning (once).
        settings: provisioning settings when ``binary`` is None.
        start_timeout: seconds a server may take to load before it counts as failed.
        common_options: ServerArgs options applied before each model's own options.
        api_key: a key every server requires (sent by the proxy); set it when the proxy
            itself needs keys, so local users cannot go around it to the servers' ports.
        threads: CPU threads for each server whose model (and request flags) name none
            (``serve`` passes its share of the cores, see :mod:`llama_proc.proxy.threads`);
            None = llama-server's own default.
        cache_ram: ``--cache-ram`` MiB for each server whose model (and request flags) set
            none, where the binary knows the flag (see :mod:`llama_proc.proxy.prompt_cache`);
            None = llama-server's own default.
    """

    def __init__(
        self,
        *,
        binary: Path | None = None,
        settings: Settings | None = None,
        start_timeout: float | None = None,
        common_options: Mapping[str, Any] | None = None,
        api_key: str | None = None,
        threads: int | None = None,
        cache_ram: int | None = None,
    ) -> None:
        self.binary = binary
        self.threads = threads
        self.cache_ram = cache_ram
        self.api_key = api_key
        self.settings = settings
        self.start_timeout = start_timeout
        self.common_options = dict(common_options or {})

    def binary_flags(self) -> BinaryFlags | None:
        """The options ``binary`` accepts (its ``--help``, probed once and cached).

        None when the binary is resolved only at the first start, or is no llama-server.
        """
        if self.binary is None:
            return None
        return probe_flags(self.binary, child_environment(), settings=self.settings)

    async def __call__(self, spec: ModelSpec, flags: tuple[str, ...]) -> ServerHandle:
        """Start llama-server for ``spec`` with ``flags`` appended; return it once ready.

        Raises:
            ServerStartError: the process exited before it was ready.
            ServerNotReadyError: it did not become ready in time.
            ModelFileError: the model file is missing or not GGUF.
            InvalidArgumentError: an option was refused.
        """
        options: dict[str, Any] = {"metrics": True, **self.common_options, **spec.options}
        extra = (*tuple(options.pop("extra_args", ())), *spec.extra_args, *flags)
        options = with_threads(options, extra, self.threads)
        if self.cache_ram is not None:
            known = await asyncio.to_thread(self.binary_flags)
            accepted = known is not None and CACHE_RAM_FLAGS[0] in known
            extra = with_cache_ram(extra, self.cache_ram, accepted=accepted)
        server = AsyncLlamaServer(
            spec.path,
            binary=self.binary,
            settings=self.settings,
            host="127.0.0.1",
            port=None,
            api_key=self.api_key,
            start_timeout=self.start_timeout,
            extra_args=extra,
            **options,
        )
        # AsyncLlamaServer.start() stops a half-started child itself when it fails or is
        # cancelled, so nothing is left behind here.
        await server.start()
        handle = _AsyncServerHandle(server)
        handle.slots = await handle.read_slots()
        return handle


class _AsyncServerHandle:
    """Adapts AsyncLlamaServer to :class:`ServerHandle`."""

    __slots__ = ("_server", "slot_use", "slots")

    def __init__(self, server: AsyncLlamaServer) -> None:
        self._server = server
        self.slots: int | None = None
        self.slot_use: SlotUse | None = None
        """What its ``/slots`` said at the last health probe."""
        """Requests the server serves at once (its ``total_slots``), when known."""

    def _headers(self) -> dict[str, str]:
        key = self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def read_slots(self) -> int | None:
        """The server's slot count from ``GET /props`` (None when it cannot be read)."""
        import aiohttp  # noqa: PLC0415 - heavy: importing the pool stays cheap

        timeout = aiohttp.ClientTimeout(total=PROPS_TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.url + "/props", headers=self._headers()) as resp,
            ):
                props = await resp.json() if resp.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        slots = props.get("total_slots") if isinstance(props, dict) else None
        return slots if isinstance(slots, int) and slots > 0 else None

    async def probe(self, timeout: float) -> bool:
        """Whether the main loop answers: ``GET /slots`` is served between decoding steps.

        Any HTTP answer counts (a server started with ``--no-slots`` answers 501 at once, so
        it is never judged wedged); only silence past ``timeout`` fails.
        """
        import aiohttp  # noqa: PLC0415 - heavy: importing the pool stays cheap

        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(self.url + "/slots", headers=self._headers()) as resp,
        ):
            body = await resp.read()
        if resp.status == 200:
            self.slot_use = slot_use(body)
        return True

    @property
    def url(self) -> str:
        return str(self._server.url)

    @property
    def is_running(self) -> bool:
        return bool(self._server.is_running)

    @property
    def pid(self) -> int | None:
        pid = self._server.pid
        return None if pid is None else int(pid)

    @property
    def returncode(self) -> int | None:
        code = self._server.returncode
        return None if code is None else int(code)

    @property
    def api_key(self) -> str | None:
        key = self._server.api_key
        return None if key is None else str(key)

    def logs(self) -> list[str]:
        return list(self._server.logs())

    def measure(self) -> Measured | None:
        """Memory the server holds now (host PSS, GPU memory through NVML); blocking."""
        return measure_process(self.pid)

    async def stop(self) -> None:
        await self._server.stop()
