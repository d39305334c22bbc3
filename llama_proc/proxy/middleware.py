"""The middleware every route goes through: keys and roles, per-key limits, errors, metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from aiohttp import web

from llama_proc.proxy.auth import PUBLIC_PATHS, KeyRing, Role, needs_admin
from llama_proc.proxy.relay import FORWARDED, ROUTER_PATHS, error_response, http_error

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from llama_proc.proxy.state import ProxyState

__all__ = [
    "Gatekeeper",
]

logger = logging.getLogger(__name__)

_ENDPOINTS: Final = frozenset(
    {*FORWARDED, *ROUTER_PATHS, "/v1/models", "/health", "/metrics", "/servers"}
)


class Gatekeeper:
    """Authentication, roles, per-key limits, OpenAI-shaped HTTP errors and request metrics."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self.keys = KeyRing(state.options.api_keys, state.options.admin_keys)
        self._per_key: dict[int, int] = {}
        """In-flight requests per inference key (by its index in the key ring)."""

    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Authentication, roles, OpenAI-shaped HTTP errors and request metrics for every route."""
        began = time.perf_counter()
        endpoint = request.path if request.path in _ENDPOINTS else "other"
        metrics = self.state.metrics
        metrics.in_flight.inc()
        connection = request.protocol
        busy = self.state.busy
        busy[connection] = busy.get(connection, 0) + 1
        try:
            response = await self._guarded(request, handler)
        except asyncio.CancelledError:
            # A client that hangs up right after the last event of a complete stream got its
            # answer; anything else is nginx's 499 "client closed request".
            metrics.requests.inc(endpoint, "200" if id(request) in self.state.complete else "499")
            raise
        finally:
            metrics.in_flight.inc(amount=-1)
            self.state.complete.discard(id(request))
            left = busy.pop(connection, 1) - 1
            if left > 0:
                busy[connection] = left
        if response.status >= 400 and not request.content.is_eof():
            # An early answer (401, 413...) to a body nobody read: drop the connection rather
            # than reading and discarding what the client still sends.
            response.force_close()
        metrics.requests.inc(endpoint, str(response.status))
        metrics.duration.observe(time.perf_counter() - began, endpoint)
        return response

    async def _guarded(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        index: int | None = None
        if path in PUBLIC_PATHS:
            role: Role | None = "inference"
        else:
            role, index = self.keys.match(request)
        if role is None:
            return error_response(
                401,
                "Incorrect API key provided: pass it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
        if role != "admin" and needs_admin(path):
            return error_response(
                403,
                f"{path} needs an admin key (serve --admin-key-file); this key may only use "
                "the API.",
                code="admin_key_required",
                kind="permission_error",
            )
        if role == "inference" and index is not None:
            # One key must not hold the whole proxy (every connection, for the body timeout).
            held = self._per_key.get(index, 0)
            if held >= self.state.options.per_key_limit:
                return error_response(
                    429,
                    f"This key has {held} requests in flight, the most one key may have; retry "
                    "when one finishes.",
                    code="rate_limit_exceeded",
                    kind="requests",
                    headers={"Retry-After": "1"},
                )
            self._per_key[index] = held + 1
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return http_error(exc, self.state.options.max_body_bytes)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            logger.exception("internal error while handling %s %s", request.method, path)
            return error_response(
                500,
                "Internal error in the llama-proc proxy; see its log.",
                code="internal_error",
                kind="server_error",
            )
        finally:
            if role == "inference" and index is not None:
                left = self._per_key.pop(index, 1) - 1
                if left > 0:
                    self._per_key[index] = left
