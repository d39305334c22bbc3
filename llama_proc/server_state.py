"""The state a started LlamaServer shows: its process, port and URLs, devices, logs and client.

A base of :class:`~llama_proc.server.LlamaServer`, read-only: nothing here starts or stops the
server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

from llama_proc.errors import (
    ServerError,
)

if TYPE_CHECKING:
    from llama_proc.devices import Device, Placement
    from llama_proc.runtime.args import ServerArgs
    from llama_proc.runtime.client import LlamaClient
    from llama_proc.runtime.process import (
        ServerProcess,
    )

_NO_KEY: Final = "sk-no-key-required"


class _Holder(Protocol):
    """What the view reads: the attributes :class:`~llama_proc.server.LlamaServer` sets."""

    _proc: ServerProcess | None
    args: ServerArgs
    placement: Placement | None


class ServerView:
    """What a server shows, written once for the sync server and its asyncio twin.

    Its process, port and URLs, key, devices, logs, and whether it is alive.

    Each property reads the object :meth:`_holder` returns: the server itself, or the
    synchronous server inside the twin.
    """

    def _holder(self) -> _Holder:
        raise NotImplementedError

    @property
    def process(self) -> ServerProcess:
        """The running :class:`~llama_proc.runtime.process.ServerProcess`.

        Raises:
            ServerError: the server was never started.
        """
        proc = self._holder()._proc
        if proc is None:
            msg = "the server was not started; call start() or use it as a context manager"
            raise ServerError(msg)
        return proc

    @property
    def is_running(self) -> bool:
        """Whether the child process is alive (False after a crash or stop())."""
        return (proc := self._holder()._proc) is not None and proc.is_running

    @property
    def pid(self) -> int | None:
        """The child's pid (None before start)."""
        return None if (proc := self._holder()._proc) is None else proc.pid

    @property
    def returncode(self) -> int | None:
        """The child's exit status once it exited."""
        return None if (proc := self._holder()._proc) is None else proc.returncode

    @property
    def port(self) -> int:
        """The port the server listens on.

        Raises:
            ServerError: the server was never started.
        """
        return self.process.port

    @property
    def url(self) -> str:
        """``http://host:port`` of the server.

        Raises:
            ServerError: the server was never started.
        """
        return self.process.url

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL (``url`` + ``/v1``) for the ``openai`` SDK."""
        return f"{self.url}/v1"

    @property
    def api_key(self) -> str | None:
        """The key clients must send, if any."""
        return self._holder().args.api_key

    @property
    def ready_after(self) -> float | None:
        """Seconds from spawn to ready for the current process."""
        return None if (proc := self._holder()._proc) is None else proc.ready_after

    @property
    def devices(self) -> tuple[Device, ...]:
        """The devices the running model uses, from its log (empty: the CPU only, or unknown).

        Each has llama.cpp's name (``CUDA0``), its backend, description and free memory.
        """
        return () if (placement := self._holder().placement) is None else placement.devices

    def logs(self, n: int | None = None) -> list[str]:
        """The last ``n`` lines the server printed (all kept when None)."""
        return [] if (proc := self._holder()._proc) is None else proc.logs(n)

    def check_alive(self) -> None:
        """Raise if the server process has exited since it became ready (a crash).

        The API methods call it when a request fails without an HTTP answer, so a crash
        surfaces as the exit status and decoded cause rather than "connection refused".

        Raises:
            ServerError: the server was never started.
            ServerStartError: the process is not running; carries exit code, cause and log.
        """
        self.process.check_alive()


class _StateView(ServerView):
    """Part of :class:`~llama_proc.server.LlamaServer`; the attributes below are set by its ``__init__``."""

    _proc: ServerProcess | None
    _client: LlamaClient | None
    args: ServerArgs
    placement: Placement | None

    def _holder(self) -> _Holder:
        return self

    @property
    def client(self) -> LlamaClient:
        """The HTTP client for the running server.

        Raises:
            ServerError: the server is not started.
        """
        if self._client is None:
            msg = "the server is not running; call start() first"
            raise ServerError(msg)
        return self._client

    def openai_client(self, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` client pointed at this server (needs the ``openai`` package)."""
        from openai import OpenAI  # noqa: PLC0415 - optional dependency

        return OpenAI(base_url=self.base_url, api_key=self.api_key or _NO_KEY, **kwargs)
