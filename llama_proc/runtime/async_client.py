"""The asyncio twin of the client: AsyncLlamaEndpoints and AsyncLlamaClient (aiohttp).

The same calls, time limits and errors as :mod:`llama_proc.runtime.client`'s LlamaClient;
aiohttp is imported when a client is first used.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Self

from llama_proc.errors import (
    ServerRequestError,
)
from llama_proc.runtime.request_limits import (
    CONNECT_TIMEOUT,
    EXIT_GRACE,
    EXIT_POLL,
    KEEPALIVE_TIMEOUT,
    REQUEST_TIMEOUT,
    _exited,
    _Limits,
    _worth_checking,
)
from llama_proc.runtime.wire import (
    _ERROR_BODY_LIMIT,
    _STREAM_HEADERS,
    Message,
    _chat_body,
    _completion_body,
    _error_message,
    _vectors,
    is_done,
    parse_metrics,
    parse_sse_line,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
    from types import TracebackType

    import aiohttp


class AsyncLlamaEndpoints:
    """llama-server's HTTP API for asyncio, written once (the twin of :class:`LlamaEndpoints`).

    :class:`AsyncLlamaClient` and :class:`~llama_proc.server.AsyncLlamaServer` both inherit
    these methods; each supplies the client that carries the requests (:meth:`_api`).
    """

    def _api(self) -> AsyncLlamaClient:
        raise NotImplementedError

    async def health(self) -> dict[str, Any]:
        """``GET /health``."""
        result: dict[str, Any] = await self._api()._json("GET", "/health")
        return result

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models``."""
        result: dict[str, Any] = await self._api()._json("GET", "/v1/models")
        return result

    async def chat(self, messages: Sequence[Message], **params: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions``."""
        result: dict[str, Any] = await self._api()._json(
            "POST", "/v1/chat/completions", _chat_body(messages, params, stream=False)
        )
        return result

    def chat_stream(
        self, messages: Sequence[Message], **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream a chat completion (``async for chunk in client.chat_stream(...)``)."""
        return self._api()._stream(
            "/v1/chat/completions", _chat_body(messages, params, stream=True)
        )

    async def complete(self, prompt: str | Sequence[int], **params: Any) -> dict[str, Any]:
        """``POST /v1/completions``."""
        result: dict[str, Any] = await self._api()._json(
            "POST", "/v1/completions", _completion_body(prompt, params, stream=False)
        )
        return result

    def complete_stream(
        self, prompt: str | Sequence[int], **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream a text completion."""
        return self._api()._stream("/v1/completions", _completion_body(prompt, params, stream=True))

    async def embeddings(self, input: str | Sequence[str], **params: Any) -> dict[str, Any]:
        """``POST /v1/embeddings``."""
        result: dict[str, Any] = await self._api()._json(
            "POST", "/v1/embeddings", {"input": input, **params}
        )
        return result

    async def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """Embedding vectors for ``texts``, in order."""
        return _vectors(await self.embeddings(texts))

    async def tokenize(self, content: str, *, add_special: bool = False) -> list[int]:
        """``POST /tokenize``."""
        result = await self._api()._json(
            "POST", "/tokenize", {"content": content, "add_special": add_special}
        )
        return [int(t) for t in result["tokens"]]

    async def detokenize(self, tokens: Iterable[int]) -> str:
        """``POST /detokenize``."""
        result = await self._api()._json("POST", "/detokenize", {"tokens": list(tokens)})
        return str(result["content"])

    async def metrics(self) -> dict[str, float]:
        """``GET /metrics`` parsed."""
        return parse_metrics(await self._api()._text("GET", "/metrics"))

    async def slots(self) -> list[dict[str, Any]]:
        """``GET /slots``."""
        result: list[dict[str, Any]] = await self._api()._json("GET", "/slots")
        return result

    async def props(self) -> dict[str, Any]:
        """``GET /props``."""
        result: dict[str, Any] = await self._api()._json("GET", "/props")
        return result


class AsyncLlamaClient(AsyncLlamaEndpoints):
    """asyncio client for one llama-server (aiohttp); the same calls as :class:`LlamaClient`.

    Args:
        base_url: the server root (no ``/v1``).
        api_key: sent as ``Authorization: Bearer`` when set.
        timeout: the longest silence, in seconds, as for :class:`LlamaClient`.
        total_timeout: the most seconds one request may take in all, as for
            :class:`LlamaClient`.
        on_connection_error: as for :class:`LlamaClient`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | None = REQUEST_TIMEOUT,
        total_timeout: float | None = None,
        on_connection_error: Callable[[ServerRequestError], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.total_timeout = total_timeout
        self.on_connection_error = on_connection_error
        self._session: aiohttp.ClientSession | None = None

    def _api(self) -> AsyncLlamaClient:
        return self

    @property
    def openai_base_url(self) -> str:
        """``base_url`` for the ``openai`` SDK: the server URL + ``/v1``."""
        return f"{self.base_url}/v1"

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            import aiohttp  # noqa: PLC0415 - heavy optional dependency, loaded on first use

            self._session = aiohttp.ClientSession(
                # llama-server (cpp-httplib) closes idle keep-alive connections after 5 s;
                # aiohttp would reuse them for 15 s and fail with "Can not write request body".
                connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_TIMEOUT),
                # sock_read: the longest silence (reset by every byte), like the sync client's
                # read timeout; total: the optional deadline for the whole request.
                timeout=aiohttp.ClientTimeout(
                    total=self.total_timeout, connect=CONNECT_TIMEOUT, sock_read=self.timeout
                ),
                headers={} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"},
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        limits: _Limits | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request; the caller must release the response.

        Raises:
            ServerTimeoutError: the server was silent for ``timeout`` s, or the request took
                ``total_timeout`` s.
            ServerRequestError: the server is unreachable or answered >= 400.
        """
        import aiohttp  # noqa: PLC0415 - heavy optional dependency, loaded on first use

        url = f"{self.base_url}{path}"
        limits = limits or self._limits(method, path)
        try:
            response = await self._get_session().request(
                method, url, json=json_body, headers=headers
            )
        except aiohttp.ConnectionTimeoutError as err:
            msg = f"{method} {url} failed: could not connect within {CONNECT_TIMEOUT:g} s"
            raise ServerRequestError(msg) from err
        except TimeoutError as err:  # sock_read (silence) or total
            raise limits.error() from err
        except aiohttp.ClientError as err:
            msg = f"{method} {url} failed: {err!r}"
            raise ServerRequestError(msg) from err
        if response.status >= 400:
            body = await response.text()
            response.release()
            msg = f"{method} {path} failed: {_error_message(body)}"
            raise ServerRequestError(msg, response.status, body[:_ERROR_BODY_LIMIT])
        return response

    def _limits(self, method: str, path: str) -> _Limits:
        return _Limits(f"{method} {path}", self.timeout, self.total_timeout)

    async def _failed(self, err: ServerRequestError) -> None:
        # A killed server's socket closes a moment before its exit status can be read.
        if not _worth_checking(err, self.on_connection_error):
            return
        deadline = time.monotonic() + EXIT_GRACE
        while (exited := _exited(err, self.on_connection_error)) is None:
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(EXIT_POLL)
        raise exited from err

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = await self.request(method, path, json_body=body)
            async with response:
                try:
                    return await response.json(content_type=None)
                except ValueError as err:
                    msg = f"{method} {path} returned invalid JSON"
                    raise ServerRequestError(msg, response.status) from err
        except ServerRequestError as err:
            await self._failed(err)
            raise

    async def _text(self, method: str, path: str) -> str:
        try:
            response = await self.request(method, path)
            async with response:
                return await response.text()
        except ServerRequestError as err:
            await self._failed(err)
            raise

    async def _stream(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        import aiohttp  # noqa: PLC0415 - heavy optional dependency, loaded on first use

        limits = self._limits("POST", path)
        try:
            response = await self.request(
                "POST", path, json_body=body, headers=_STREAM_HEADERS, limits=limits
            )
            async with response:
                pending = b""
                try:
                    # iter_any(): whatever bytes arrived, no line-length limit of readline().
                    async for data in response.content.iter_any():
                        *lines, pending = (pending + data).split(b"\n")
                        for line in lines:
                            event = parse_sse_line(line)
                            if is_done(event):
                                return
                            if event is not None:
                                yield event
                except TimeoutError as err:  # sock_read (silence) or total
                    raise limits.error() from err
                except aiohttp.ClientError as err:
                    msg = f"POST {path}: the stream broke: {err!r}"
                    raise ServerRequestError(msg) from err
        except ServerRequestError as err:
            await self._failed(err)
            raise

    async def close(self) -> None:
        """Close the HTTP session."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
