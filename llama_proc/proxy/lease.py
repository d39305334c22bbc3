"""One request's hold on a pooled server (:class:`Lease`) and its ``async with`` form."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from types import TracebackType

    from llama_proc.proxy.entries import Entry, Healed
    from llama_proc.proxy.models_config import ModelSpec
    from llama_proc.proxy.pool import ServerPool
    from llama_proc.proxy.servers import ServerHandle

__all__ = ["Lease", "LeaseContext"]


class Lease:
    """One request's hold on a ready server; release it when the response is done."""

    __slots__ = ("_entry", "_handle", "_pool", "_released", "api_key", "key", "restarted", "url")

    def __init__(self, pool: ServerPool, entry: Entry, *, restarted: bool) -> None:
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

    def __init__(self, pool: ServerPool, spec: ModelSpec, flags: tuple[str, ...]) -> None:
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
