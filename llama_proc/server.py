"""The facade: provision a llama-server if needed, run it, and talk to it.

This is the only module that combines :mod:`llama_proc.provision` (where the binary comes from)
and :mod:`llama_proc.runtime` (how it runs)::

    from llama_proc import LlamaServer

    with LlamaServer("model.gguf", ctx_size=4096) as server:
        reply = server.chat([{"role": "user", "content": "Hello"}], max_tokens=32)
        for chunk in server.chat_stream([{"role": "user", "content": "Count to 5"}]):
            ...
        openai_client = server.openai_client()      # the openai SDK on server.base_url

The model is a path or a Hugging Face reference as users copy it (``"org/repo:Q4_K_M"``,
``"hf://org/repo/file.gguf"``; see :class:`~llama_proc.models.hub.ModelRef`): a path that
exists wins, and a reference is downloaded into the shared Hugging Face cache on the first
``start()`` (or :meth:`LlamaServer.fetch_model`), before the start timeout begins to count.

``start()`` fetches a referenced model, checks the model's GGUF header, resolves the binary
(``binary=``, else ``ensure_server(settings)``: explicit, bundled, cache, download, build), reads
which flags that binary accepts, picks a free port (retrying with another one if a different
process takes it first), spawns the server tied to this process's life and waits for
``/health``. Then it reads from the log where the model went (:attr:`LlamaServer.devices`):
GPU layers asked for but loaded on the CPU stop the server with CpuFallbackError naming why
(``cpu_fallback="warn"`` only warns), so a GPU setup never silently runs on the CPU.
:class:`AsyncLlamaServer` is the asyncio twin.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

from llama_proc._proc import free_port
from llama_proc.errors import (
    InvalidArgumentError,
    ServerError,
    ServerRequestError,
    ServerStartError,
)
from llama_proc.models.gguf_header import check_gguf
from llama_proc.models.model_ref import ModelFiles, ModelRef
from llama_proc.runtime.args import ServerArgs
from llama_proc.runtime.async_client import AsyncLlamaClient, AsyncLlamaEndpoints
from llama_proc.runtime.client import LlamaClient, LlamaEndpoints
from llama_proc.runtime.flags import probe_flags, server_command
from llama_proc.runtime.log_buffer import LOG_CAPACITY
from llama_proc.runtime.process import STALL_TIMEOUT, STOP_GRACE, ServerProcess, child_environment
from llama_proc.runtime.request_limits import REQUEST_TIMEOUT
from llama_proc.runtime.rpc import check_workers, local_rpc_version
from llama_proc.server_state import _NO_KEY, ServerView, _StateView
from llama_proc.server_steps import CpuFallback, _StartSteps

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from llama_proc.config import Settings
    from llama_proc.devices import Placement
    from llama_proc.runtime.flags import BinaryFlags
    from llama_proc.runtime.lifetime import Lifetime

__all__ = ["PORT_ATTEMPTS", "AsyncLlamaServer", "LlamaServer", "reserve_port"]

logger = logging.getLogger(__name__)

PORT_ATTEMPTS: Final = 3
"""Starts tried with a fresh free port when another process takes the chosen one first."""


def reserve_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` right now (bind to port 0, read it, close).

    Another process can take it before llama-server binds it; :class:`LlamaServer` detects
    that ("couldn't bind") and retries with a new port.
    """
    return free_port(host.strip("[]"))


class LlamaServer(_StartSteps, _StateView, LlamaEndpoints):
    """A llama-server process for one model, with the API client on the same object.

    Args:
        model: path of the GGUF model (or set ``args.model``), or a Hugging Face reference
            (``org/repo[:QUANT][@REV]``, ``hf://org/repo/file.gguf``, a hub link), fetched by
            :meth:`fetch_model` on the first start; a path that exists always wins.
        mmproj: the multimodal projector: a path, or True to fetch the one that the referenced
            repository holds (ignored when it has none).
        on_download_progress: called as ``(bytes_done, bytes_total)`` while a referenced model
            downloads, from the downloading thread.
        args: base options; keyword ``options`` and ``host``/``port``/``api_key`` override it.
        binary: the llama-server to run; None = ``llama_proc.provision.ensure_server(settings)``.
        settings: provisioning settings used when ``binary`` is None (default: from env).
        host: address to listen on (default 127.0.0.1).
        port: TCP port; None = a free one; 0 = let llama-server choose (learned from its log).
        api_key: require this key from clients; passed to the child in its environment.
        start_timeout: default total seconds for ``start()``; None = no total limit.
        stall_timeout: default seconds without server output before a start counts as stalled.
        stop_grace: seconds between SIGTERM and SIGKILL when stopping.
        env: base environment for the child (default ``os.environ``); ``LLAMA_ARG_*`` and
            ``LLAMA_API_KEY`` are always removed from it (see
            :func:`~llama_proc.runtime.process.child_environment`).
        lifetime: how the child is tied to this process ("auto" = the platform's way).
        request_timeout: the longest silence, in seconds, the client waits for (no byte from
            the server for that long fails the request with ServerTimeoutError); a stream that
            keeps producing tokens is never cut. None = wait forever.
        request_total_timeout: the most seconds one request may take in all, streamed body
            included; None (the default) = no limit beyond ``request_timeout``.
        log_capacity: lines of server output kept.
        check_rpc_workers: probe ``rpc`` workers before spawning, for a clear error.
        cpu_fallback: when GPU layers were asked for (``n_gpu_layers`` > 0 or ``"all"``) but
            the log shows the model loaded on the CPU: ``"error"`` stops the server and raises
            CpuFallbackError naming the cause, ``"warn"`` logs a warning and keeps it running.
        **options: :class:`~llama_proc.runtime.args.ServerArgs` fields (ctx_size, threads...).

    Raises:
        InvalidArgumentError: an unknown option or an invalid value.
        ModelFileError: ``model`` starts like a reference (``hf://``, a hub link) but is
            malformed.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        args: ServerArgs | None = None,
        mmproj: bool | str | os.PathLike[str] | None = None,
        on_download_progress: Callable[[int, int], None] | None = None,
        binary: str | os.PathLike[str] | None = None,
        settings: Settings | None = None,
        host: str | None = None,
        port: int | None = None,
        api_key: str | None = None,
        start_timeout: float | None = None,
        stall_timeout: float | None = STALL_TIMEOUT,
        stop_grace: float = STOP_GRACE,
        env: Mapping[str, str] | None = None,
        lifetime: Lifetime = "auto",
        request_timeout: float | None = REQUEST_TIMEOUT,
        request_total_timeout: float | None = None,
        log_capacity: int = LOG_CAPACITY,
        check_rpc_workers: bool = True,
        cpu_fallback: CpuFallback = "error",
        **options: Any,
    ) -> None:
        self.model_ref: ModelRef | None = ModelRef.parse(model) if isinstance(model, str) else None
        """The Hugging Face reference given as ``model`` (None for a path)."""
        self._with_mmproj = mmproj is True
        if self._with_mmproj and self.model_ref is None:
            msg = (
                "mmproj=True fetches the projector of a Hugging Face model reference; for a "
                "local model pass the projector's path as mmproj="
            )
            raise InvalidArgumentError(msg)
        named = {
            "model": None if self.model_ref is not None else model,
            "mmproj": None if isinstance(mmproj, bool) else mmproj,
            "host": host,
            "port": port,
            "api_key": api_key,
        }
        overrides = {**options, **{k: v for k, v in named.items() if v is not None}}
        base = args if args is not None else ServerArgs()
        self.args: ServerArgs = base.replace(**overrides) if overrides else base
        if self.args.model is None and self.model_ref is None:
            msg = (
                "no model given: pass the path of a .gguf file or a Hugging Face reference "
                "(org/repo:QUANT) as the first argument"
            )
            raise InvalidArgumentError(msg)
        self.on_download_progress = on_download_progress
        self._files: ModelFiles | None = None
        self.binary: Path | None = None if binary is None else Path(binary).expanduser()
        self.settings = settings
        self.start_timeout = start_timeout
        self.stall_timeout = stall_timeout
        self.stop_grace = stop_grace
        self.env = None if env is None else dict(env)
        self.lifetime: Lifetime = lifetime
        self.request_timeout = request_timeout
        self.request_total_timeout = request_total_timeout
        self.log_capacity = log_capacity
        self.check_rpc_workers = check_rpc_workers
        if cpu_fallback not in ("error", "warn"):
            msg = f"cpu_fallback must be 'error' or 'warn', not {cpu_fallback!r}"
            raise InvalidArgumentError(msg)
        self.cpu_fallback: CpuFallback = cpu_fallback
        self.placement: Placement | None = None
        """Where the running server put the model (devices, offloaded layers, weight buffers)."""
        self.flags: BinaryFlags | None = None
        """What the binary accepts (after start; None if its --help could not be read)."""
        self._proc: ServerProcess | None = None
        self._client: LlamaClient | None = None
        self._lock = threading.RLock()
        self._abort = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float | None = None, stall_timeout: float | None = None) -> Self:
        """Start the server and wait until it is ready; a no-op when it already runs.

        ``stop()`` or :meth:`abort_start` from another thread abandons a start in progress
        (the half-started child is stopped and ``start()`` raises ServerStartError).

        A referenced model is fetched first (:meth:`fetch_model`); the timeouts count from
        the spawn, so a long download never makes a start time out.

        Args:
            timeout: total seconds allowed (default: ``start_timeout``; None = no limit).
            stall_timeout: seconds without server output (default: ``stall_timeout``).

        Raises:
            ModelFileError: the model is missing or not GGUF, or the reference names no such
                repository, revision or quantization (nothing is spawned).
            DownloadError: fetching a referenced model failed (gated repository, network).
            OfflineError: offline and the referenced model is not in the Hugging Face cache.
            BinaryNotFoundError: ``binary`` does not exist or is not executable.
            ProvisionError: provisioning a binary failed (when ``binary`` is None).
            InvalidArgumentError: an option this binary does not accept.
            ServerStartError: the server exited before it was ready; ``cause`` says why (bad
                flag, bad model, port in use, out of memory) and ``log_tail`` shows its output.
            ServerNotReadyError: the total or stall timeout passed (the child is stopped).
            CpuFallbackError: GPU layers were asked for but loaded on the CPU (the child is
                stopped; ``cause`` says why), unless ``cpu_fallback="warn"``.
        """
        timeout = self.start_timeout if timeout is None else timeout
        stall = self.stall_timeout if stall_timeout is None else stall_timeout
        with self._lock:
            if self._proc is not None and self._proc.is_running:
                return self
            self._abort.clear()
            self._stop_locked(self.stop_grace)
            check_gguf(self._fetch_locked().model)
            binary = self._resolve_binary()
            env = child_environment(self.env, extra=self.args.to_env())
            self.flags = probe_flags(binary, env, settings=self.settings)
            if self.args.rpc and self.check_rpc_workers:
                # Workers must speak this build's protocol: llama-server itself would abort
                # with a backtrace on a mismatch, or hang on a busy worker.
                check_workers(self.args.rpc, expected=local_rpc_version(binary))
            auto_port = self.args.port is None
            attempts = PORT_ATTEMPTS if auto_port else 1
            for attempt in range(1, attempts + 1):
                port = reserve_port(self.args.host) if auto_port else self.args.port
                assert port is not None  # noqa: S101 - reserve_port or explicit
                argv = [
                    *server_command(binary),  # `llama serve` for the installer's one binary
                    *self.args.replace(port=port).to_argv(self.flags),
                    *self._verbosity_args(),
                ]
                proc = ServerProcess(
                    argv,
                    env=env,
                    host=self.args.host,
                    port=port,
                    lifetime=self.lifetime,
                    stop_grace=self.stop_grace,
                    log_capacity=self.log_capacity,
                )
                proc.start()
                self._proc = proc  # pid, logs() and returncode are visible while it loads
                try:
                    proc.wait_ready(timeout, stall, cancel=self._abort)
                except ServerStartError:
                    proc.stop(self.stop_grace)
                    failure = proc.failure
                    if failure is not None and failure.kind == "port_in_use" and attempt < attempts:
                        logger.info(
                            "port %d was taken before llama-server bound it; retrying", port
                        )
                        continue
                    raise
                except BaseException:
                    proc.stop(self.stop_grace)
                    raise
                self._check_placement(proc)
                self._client = LlamaClient(
                    proc.url,
                    api_key=self.args.api_key,
                    timeout=self.request_timeout,
                    total_timeout=self.request_total_timeout,
                    on_connection_error=self._connection_failed,
                )
                return self
            msg = "could not find a free port"  # pragma: no cover - the loop returns or raises
            raise ServerStartError(msg)

    def _connection_failed(self, _err: ServerRequestError) -> None:
        # A request without an HTTP answer: report the crash, if the child died.
        proc = self._proc
        if proc is not None:
            proc.check_alive()

    def abort_start(self) -> None:
        """Make a ``start()`` running in another thread give up (it stops its child)."""
        self._abort.set()

    def stop(self, grace: float | None = None) -> int | None:
        """Stop the server (SIGTERM to its group, then SIGKILL after ``grace``); idempotent.

        Also abandons a ``start()`` in progress in another thread.

        Returns:
            Its exit status, or None if it was never started.
        """
        self._abort.set()
        with self._lock:
            return self._stop_locked(self.stop_grace if grace is None else grace)

    def _stop_locked(self, grace: float) -> int | None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        proc = self._proc
        return None if proc is None else proc.stop(grace)

    def restart(self, timeout: float | None = None, stall_timeout: float | None = None) -> Self:
        """Stop and start again with the same options (a new free port if none was fixed).

        Raises:
            ServerStartError: as :meth:`start`.
            ServerNotReadyError: as :meth:`start`.
        """
        with self._lock:
            self.stop()
            return self.start(timeout, stall_timeout)

    # -- state ---------------------------------------------------------------------------

    def _api(self) -> LlamaClient:
        return self.client

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self._proc.url if self._proc is not None else "not started"
        state = "running" if self.is_running else "stopped"
        model = self.model_ref if self.model_ref is not None else self.args.model
        return f"<LlamaServer {model} {state} {where}>"


class AsyncLlamaServer(ServerView, AsyncLlamaEndpoints):
    """The asyncio twin of :class:`LlamaServer` (same arguments).

    Process management runs in a worker thread (the child itself is forked by the runtime's
    long-lived spawner thread, so it does not die with that worker); API calls use aiohttp.
    Cancelling ``start()`` stops the half-started child before the cancellation propagates.
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        self._server = LlamaServer(model, **kwargs)
        self._client: AsyncLlamaClient | None = None

    @property
    def server(self) -> LlamaServer:
        """The underlying synchronous :class:`LlamaServer`."""
        return self._server

    def _holder(self) -> LlamaServer:
        return self._server

    @property
    def args(self) -> ServerArgs:
        """The server's options."""
        return self._server.args

    @property
    def model_ref(self) -> ModelRef | None:
        """The Hugging Face reference given as ``model`` (None for a path)."""
        return self._server.model_ref

    async def fetch_model(self) -> ModelFiles:
        """Download a referenced model ahead of ``start()`` (see :meth:`LlamaServer.fetch_model`).

        Cancelling it abandons the download (a later call starts it again).

        Raises:
            ModelFileError: as :meth:`LlamaServer.fetch_model`.
            DownloadError: as :meth:`LlamaServer.fetch_model`.
            OfflineError: as :meth:`LlamaServer.fetch_model`.
        """
        import asyncio  # noqa: PLC0415 - ~50 ms to import; only the async twin needs it

        task = asyncio.ensure_future(asyncio.to_thread(self._server.fetch_model))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._server.abort_start()
            with contextlib.suppress(BaseException):
                await task
            raise

    async def start(self, timeout: float | None = None, stall_timeout: float | None = None) -> Self:
        """Start the server and wait until ready (see :meth:`LlamaServer.start`).

        Raises:
            ModelFileError: as :meth:`LlamaServer.start`.
            ServerStartError: as :meth:`LlamaServer.start`.
            ServerNotReadyError: as :meth:`LlamaServer.start`.
        """
        import asyncio  # noqa: PLC0415 - ~50 ms to import; only the async twin needs it

        task = asyncio.ensure_future(asyncio.to_thread(self._server.start, timeout, stall_timeout))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self._server.abort_start()
            with contextlib.suppress(BaseException):
                await task
            await asyncio.to_thread(self._server.stop)
            raise
        self._client = AsyncLlamaClient(
            self._server.url,
            api_key=self._server.api_key,
            timeout=self._server.request_timeout,
            total_timeout=self._server.request_total_timeout,
            on_connection_error=self._connection_failed,
        )
        return self

    async def stop(self, grace: float | None = None) -> int | None:
        """Stop the server; idempotent."""
        import asyncio  # noqa: PLC0415 - ~50 ms to import; only the async twin needs it

        client, self._client = self._client, None
        if client is not None:
            await client.close()
        return await asyncio.to_thread(self._server.stop, grace)

    async def restart(
        self, timeout: float | None = None, stall_timeout: float | None = None
    ) -> Self:
        """Stop and start again."""
        await self.stop()
        return await self.start(timeout, stall_timeout)

    @property
    def client(self) -> AsyncLlamaClient:
        """The aiohttp client for the running server.

        Raises:
            ServerError: the server is not started.
        """
        if self._client is None:
            msg = "the server is not running; await start() first"
            raise ServerError(msg)
        return self._client

    def openai_client(self, **kwargs: Any) -> Any:
        """An ``openai.AsyncOpenAI`` client pointed at this server."""
        from openai import AsyncOpenAI  # noqa: PLC0415 - optional dependency

        return AsyncOpenAI(
            base_url=self.base_url, api_key=self._server.api_key or _NO_KEY, **kwargs
        )

    def _connection_failed(self, _err: ServerRequestError) -> None:
        self._server.check_alive()

    def _api(self) -> AsyncLlamaClient:
        return self.client

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return "<Async" + repr(self._server)[1:]
