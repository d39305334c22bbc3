"""One request's hold on a pooled server (:class:`Lease`) and its ``async with`` form.

Also the request still waiting for one (:class:`Ticket`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:
    import asyncio
    from types import TracebackType

    from llama_proc.proxy.entries import Entry, Healed, HealReason
    from llama_proc.proxy.models_config import ModelSpec
    from llama_proc.proxy.servers import ServerHandle

__all__ = ["Lease", "LeaseContext", "LeasePool", "Ticket"]


class LeasePool(Protocol):
    """What a lease needs of its pool (:class:`~llama_proc.proxy.pool.ServerPool`)."""

    async def acquire(self, spec: ModelSpec, flags: tuple[str, ...] = ()) -> Lease:
        """Wait for a ready server for ``spec`` and ``flags`` and hold it."""
        ...

    def _release(self, entry: Entry) -> None: ...

    def _check_alive(self, entry: Entry) -> bool: ...

    def _heal(self, entry: Entry, reason: HealReason, detail: str | None = None) -> None: ...


@dataclass(eq=False)
class Ticket:
    """One request waiting in the pool."""

    entry: Entry
    seq: int
    arrived: float
    future: asyncio.Future[Lease]
    passed: int = 0
    """Requests that arrived after this one and were served while it waited for room."""


class Lease:
    """One request's hold on a ready server; release it when the response is done."""

    __slots__ = ("_entry", "_handle", "_pool", "_released", "api_key", "key", "restarted", "url")

    def __init__(self, pool: LeasePool, entry: Entry, *, restarted: bool) -> None:
        self._pool = pool
        self._entry = entry
        self._handle = entry.handle
        self._released = False
        self.key: str = entry.key
        self.url: str = entry.handle.url if entry.handle is not None else ""
        self.api_key: str | None = getattr(entry.handle, "api_key", None)
        """Key the server expects (Bearer), when the factory gave it one."""
        self.restarted = restarted
        """True when this request found its server crashed and started it again."""

    def release(self) -> None:
        """Give the server back (idempotent)."""
        if not self._released:
            self._released = True
            self._pool._release(self._entry)

    @property
    def handle(self) -> ServerHandle | None:
        """The leased server (its ``returncode`` and ``logs()`` tell how it exited)."""
        return self._handle

    def check_alive(self) -> bool:
        """After an upstream connection error: is the server still up? Records a crash if not."""
        return self._pool._check_alive(self._entry)

    def healed(self) -> Healed | None:
        """Why the pool stopped this lease's server while it ran (wedged, stalled), if it did.

        A connection broken by that stop is the wedge's doing, not a crash.
        """
        healed = self._entry.healed
        if healed is None or healed[0] is not self._handle:
            return None
        return healed[1]

    def report_stall(self) -> None:
        """The server stopped sending mid-response past the stall limit: restart it."""
        entry = self._entry
        if entry.handle is self._handle and entry.state == "ready":
            self._pool._heal(entry, "stall")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class LeaseContext:
    """``async with pool.lease(spec, flags) as lease``: acquire, then release on exit."""

    __slots__ = ("_flags", "_lease", "_pool", "_spec")

    def __init__(self, pool: LeasePool, spec: ModelSpec, flags: tuple[str, ...]) -> None:
        self._pool, self._spec, self._flags = pool, spec, flags
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._pool.acquire(self._spec, self._flags)
        return self._lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lease is not None:
            self._lease.release()
