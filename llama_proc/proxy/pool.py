"""A pool of llama-servers keyed on (model, flags), started on demand.

The pool never talks HTTP itself: a *factory* starts a server for a :class:`ModelSpec` and a
tuple of extra flags and returns a :class:`ServerHandle` (url, liveness, stop, and optionally a
health probe and its slot count). The real factory (:class:`LlamaServerFactory`) runs
llama-server through :mod:`llama_proc.server`; tests inject a fake.

Rules the pool keeps:

* One server per key. Concurrent first requests for a key wait on one start.
* Each server takes at most ``concurrency`` requests at once (default: its slot count, when the
  handle reports one); more wait in that model's queue, which holds at most ``max_queue``
  requests (:class:`PoolQueueFullError` beyond it, answered 429).
* At most ``max_servers`` servers are up or starting, and with a ``memory_budget`` their
  estimated memory stays within it; a model that cannot fit even alone is refused at once
  (:class:`ModelTooLargeError`). A request that needs room stops least recently used idle
  servers, else marks busy ones *draining* (no new requests; stopped when the last one ends).
  A server that is loading or has requests in flight is never stopped to make room.
* No thrashing: a server whose model still has requests waiting is not drained, so waiting
  requests for a loaded model go first. The fairness bound: once a request waiting for another
  model has seen ``fair_share`` requests that arrived after it served first, servers take no
  more requests newer than it, and it gets the next free room.
* A server found dead (crash), failing ``wedge_after`` health probes in a row although its
  process lives (wedge), or reported stalled mid-stream (stall) is stopped and started again
  by the next request for its key, with exponential backoff when it keeps failing.
* A server idle for longer than its TTL is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Self

from llama_proc.errors import ServerStartError
from llama_proc.proxy.budget import MemoryEstimate, estimate_server_memory
from llama_proc.proxy.metrics import PoolMetrics
from llama_proc.proxy.serve_options import (
    DEFAULT_IDLE_TTL,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SERVERS,
    DEFAULT_QUEUE_TIMEOUT,
)
from llama_proc.proxy.servers import (
    ModelTooLargeError,
    PoolBusyError,
    PoolClosedError,
    PoolQueueFullError,
    ServerFactory,
    ServerHandle,
)
from llama_proc.runtime.flags import BinaryFlags

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from types import TracebackType

    from llama_proc.proxy.models_config import ModelSpec

__all__ = [
    "DEFAULT_FAIR_SHARE",
    "DEFAULT_MAX_QUEUE",
    "Healed",
    "Lease",
    "ServerInfo",
    "ServerPool",
    "server_key",
]

logger = logging.getLogger(__name__)

DEFAULT_FAIR_SHARE: Final = 16
"""Newer requests a request waiting for an unloaded model lets go first (the fairness bound)."""
DEFAULT_PROBE_INTERVAL: Final = 10.0
"""Seconds between health probes of each ready server (0 = no probing)."""
DEFAULT_PROBE_TIMEOUT: Final = 10.0
"""Seconds a probe may take: llama-server answers it between two decoding steps."""
DEFAULT_WEDGE_AFTER: Final = 3
"""Failed probes in a row after which a live server counts as wedged and is restarted."""
RESTART_BACKOFF_BASE: Final = 1.0
"""Delay before the second restart of a server that keeps failing; it doubles each time."""
RESTART_BACKOFF_MAX: Final = 60.0
STABLE_AFTER: Final = 60.0
"""A server up this long before it fails is no crash loop: its backoff starts over."""
QUEUE_FULL_RETRY_AFTER: Final = 1.0
"""Seconds a client is told to wait (Retry-After) when a model's queue is full."""
START_WAIT_POLL: Final = 1.0
"""A request waiting on a load in progress waits on past its queue timeout, this often checking."""

STOP_TIMEOUT: Final = 30.0
"""Seconds to wait for one server's stop() before giving up on it (the pool logs it)."""
MAX_FORGOTTEN_KEYS: Final = 256
"""Stopped entries kept for ``/servers`` history; older ones are dropped."""

State = Literal["stopped", "queued", "starting", "ready", "stopping"]
EvictReason = Literal["lru", "memory", "idle", "manual"]
HealReason = Literal["crash", "wedge", "stall"]


@dataclass(frozen=True)
class Healed:
    """Why the pool stopped a server that was still running (see :meth:`Lease.healed`)."""

    reason: Literal["wedge", "stall"]
    what: str
    """What it did, e.g. ``stopped answering (3 health probes failed)``."""


@functools.lru_cache(maxsize=1024)
def server_key(model_id: str, flags: tuple[str, ...]) -> str:
    """A stable short key for (model id, normalized flags): same inputs, same key, any process."""
    blob = json.dumps([model_id, list(flags)], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ServerInfo:
    """A snapshot of one pool entry (for ``GET /servers`` and metrics)."""

    key: str
    model: str
    flags: tuple[str, ...]
    state: State
    url: str | None
    pid: int | None
    active: int
    draining: bool
    requests: int
    starts: int
    crashes: int
    last_used: float | None
    """Seconds since the last request ended (None if never used)."""
    last_error: str | None
    queued: int = 0
    """Requests waiting for this server."""
    restarts: int = 0
    """Times it was replaced for being unhealthy (crash, wedge, stall)."""
    memory: int = 0
    """Estimated bytes (0 = unknown or no budget)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "key": self.key,
            "model": self.model,
            "flags": list(self.flags),
            "state": self.state,
            "url": self.url,
            "pid": self.pid,
            "active_requests": self.active,
            "queued_requests": self.queued,
            "draining": self.draining,
            "requests": self.requests,
            "starts": self.starts,
            "crashes": self.crashes,
            "restarts": self.restarts,
            "memory_estimate": self.memory or None,
            "idle_seconds": None if self.last_used is None else round(self.last_used, 3),
            "last_error": self.last_error,
        }


@dataclass(eq=False)
class _Entry:
    key: str
    spec: ModelSpec
    flags: tuple[str, ...]
    state: Literal["stopped", "starting", "ready", "stopping"] = "stopped"
    handle: ServerHandle | None = None
    active: int = 0
    queued: int = 0
    concurrency: int | None = None
    memory: int = 0
    draining: bool = False
    evict_reason: EvictReason = "lru"
    last_used: float = 0.0
    used: bool = False
    requests: int = 0
    starts: int = 0
    crashes: int = 0
    restarts: int = 0
    last_error: str | None = None
    failures: int = 0
    streak: int = 0
    retry_at: float = 0.0
    ready_since: float | None = None
    probe_failures: int = 0
    crash_unseen: bool = False
    healed: tuple[ServerHandle, Healed] | None = None
    """The handle last stopped for a wedge or stall, and why."""
    start_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None

    def has_room(self) -> bool:
        return self.concurrency is None or self.active < self.concurrency


@dataclass(eq=False)
class _Ticket:
    """One request waiting in the pool."""

    entry: _Entry
    seq: int
    arrived: float
    future: asyncio.Future[Lease]
    passed: int = 0
    """Requests that arrived after this one and were served while it waited for room."""


class Lease:
    """One request's hold on a ready server; release it when the response is done."""

    __slots__ = ("_entry", "_handle", "_pool", "_released", "api_key", "key", "restarted", "url")

    def __init__(self, pool: ServerPool, entry: _Entry, *, restarted: bool) -> None:
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


class ServerPool:
    """Servers keyed on (model, flags): on-demand start, queues, eviction, healing, idle unload.

    Use from one event loop. Call :meth:`start` (starts the idle reaper and the health
    watchdog) and :meth:`close`.

    Args:
        factory: starts a server; see :data:`ServerFactory`.
        max_servers: most servers up or starting at once.
        idle_ttl: seconds an unused server stays up (a model's own ``idle_ttl`` wins; 0 or
            None = never unload).
        queue_timeout: seconds a request waits for room before :class:`PoolBusyError` (time
            spent waiting on a load in progress does not run out).
        max_queue: requests one model may have waiting, across all its flag sets
            (:class:`PoolQueueFullError`).
        concurrency: requests one server takes at once; None = the slot count its handle
            reports, else no limit.
        fair_share: the fairness bound (see the module docstring).
        memory_budget: bytes all servers together may use by estimate; None = no budget.
        memory_estimate: estimates one server's bytes (see :func:`estimate_server_memory`).
        probe_interval: seconds between health probes of ready servers (0 = none).
        probe_timeout: seconds one probe may take.
        wedge_after: failed probes in a row that make a live server count as wedged.
        metrics: where per-model series go (a fresh :class:`PoolMetrics` by default).
        clock: monotonic clock (injectable for tests) for idle times and backoff.
    """

    def __init__(
        self,
        factory: ServerFactory,
        *,
        max_servers: int = DEFAULT_MAX_SERVERS,
        idle_ttl: float | None = DEFAULT_IDLE_TTL,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
        max_queue: int = DEFAULT_MAX_QUEUE,
        concurrency: int | None = None,
        fair_share: int = DEFAULT_FAIR_SHARE,
        memory_budget: int | None = None,
        memory_estimate: MemoryEstimate = estimate_server_memory,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
        wedge_after: int = DEFAULT_WEDGE_AFTER,
        metrics: PoolMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("max_servers", max_servers),
            ("max_queue", max_queue),
            ("wedge_after", wedge_after),
            ("concurrency", 1 if concurrency is None else concurrency),
            ("memory_budget", 1 if memory_budget is None else memory_budget),
        ):
            if value < 1:
                msg = f"{name}={value} must be at least 1"
                raise ValueError(msg)
        self._factory = factory
        self.max_servers = max_servers
        self.idle_ttl = idle_ttl or 0.0
        self.queue_timeout = queue_timeout
        self.max_queue = max_queue
        self.concurrency = concurrency
        self.fair_share = max(0, fair_share)
        self.memory_budget = memory_budget
        self._estimate = memory_estimate
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.wedge_after = wedge_after
        self.metrics = metrics if metrics is not None else PoolMetrics()
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._tickets: list[_Ticket] = []
        self._seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.stats: dict[str, int] = {
            "starts": 0,
            "start_failures": 0,
            "crashes": 0,
            "wedges": 0,
            "stalls": 0,
            "evictions_lru": 0,
            "evictions_memory": 0,
            "evictions_idle": 0,
            "evictions_manual": 0,
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the idle reaper and the health watchdog (needs a running loop)."""
        if not self._tasks:
            self._tasks.append(asyncio.create_task(self._reap_forever(), name="llama-proc-reaper"))
            if self.probe_interval > 0:
                self._tasks.append(
                    asyncio.create_task(self._watch_forever(), name="llama-proc-watchdog")
                )

    async def close(self) -> None:
        """Refuse new requests, then stop every server (including ones still starting)."""
        self._closing = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._schedule()
        # A server still loading is abandoned: the factory stops what it spawned on cancel.
        starting = [e.start_task for e in self._entries.values() if e.start_task is not None]
        for start_task in starting:
            start_task.cancel()
        if starting:
            await asyncio.wait(starting)
        stops = [self._stop_entry(e, reason=None) for e in self._entries.values()]
        await asyncio.gather(*stops)
        pending = [e.stop_task for e in self._entries.values() if e.stop_task is not None]
        if pending:
            await asyncio.wait(pending)

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closing

    # -- requests --------------------------------------------------------------------------

    async def acquire(self, spec: ModelSpec, flags: tuple[str, ...] = ()) -> Lease:
        """Get a ready server for (spec, flags), starting one if needed.

        Args:
            spec: the model.
            flags: extra llama-server flags, already validated and normalized.

        Raises:
            ServerStartError: the server failed to start (also ModelFileError,
                ServerNotReadyError, InvalidArgumentError from the factory).
            PoolQueueFullError: the model already has ``max_queue`` requests waiting.
            ModelTooLargeError: the model cannot fit the memory budget even alone.
            PoolBusyError: no room freed up within ``queue_timeout``.
            PoolClosedError: the pool is shutting down.
        """
        if self._closing:
            msg = "llama-proc proxy is shutting down"
            raise PoolClosedError(msg)
        key = server_key(spec.id, flags)
        entry = self._entries.get(key)
        # Fast path: the usual case of a warm server with room takes no await at all.
        if (
            entry is not None
            and not self._tickets
            and entry.state == "ready"
            and not entry.draining
            and entry.handle is not None
            and entry.handle.is_running
            and entry.has_room()
        ):
            return self._grant(entry, waited=0.0)
        if entry is None:
            memory = 0
            if self.memory_budget is not None:
                # Reading the header is file I/O and parsing: off the event loop, so a slow
                # disk or a hostile header stalls this request only, never /health or others.
                memory = await asyncio.to_thread(self._estimate, spec, flags)
                if self._closing:
                    msg = "llama-proc proxy is shutting down"
                    raise PoolClosedError(msg)
            entry = self._entries.get(key)  # another request may have made it meanwhile
            if entry is None:
                entry = self._entries[key] = _Entry(key=key, spec=spec, flags=flags)
                entry.memory = memory
        if self.memory_budget is not None and entry.memory > self.memory_budget:
            self.metrics.rejected.inc(spec.id, "too_large")
            msg = (
                f"model {spec.id!r} needs about {_gib(entry.memory)} but the memory budget for "
                f"all servers is {_gib(self.memory_budget)}; raise --memory-budget or use a "
                "smaller quantization"
            )
            raise ModelTooLargeError(msg)
        # The cap is the model's, whatever flags its requests carry: cycling an allowed flag
        # must not open a fresh queue per value.
        waiting = sum(e.queued for e in self._entries.values() if e.spec.id == spec.id)
        if waiting >= self.max_queue:
            self.metrics.rejected.inc(spec.id, "queue_full")
            msg = (
                f"model {spec.id!r} has {waiting} requests waiting (the most allowed); "
                f"retry after {QUEUE_FULL_RETRY_AFTER:g}s"
            )
            raise PoolQueueFullError(msg, QUEUE_FULL_RETRY_AFTER)
        loop = asyncio.get_running_loop()
        self._seq += 1
        ticket = _Ticket(entry, self._seq, self._clock(), loop.create_future())
        self._tickets.append(ticket)
        entry.queued += 1
        self._schedule()
        try:
            return await self._wait(ticket)
        except BaseException:
            self._abandon(ticket)
            raise

    async def _wait(self, ticket: _Ticket) -> Lease:
        loop = asyncio.get_running_loop()
        future, entry = ticket.future, ticket.entry
        deadline = loop.time() + self.queue_timeout
        while not future.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                if entry.state != "starting":
                    self.metrics.rejected.inc(entry.spec.id, "busy")
                    raise PoolBusyError(self._busy_message(entry))
                remaining = START_WAIT_POLL
            await asyncio.wait((future,), timeout=remaining)
        return future.result()

    def binary_flags(self) -> BinaryFlags | None:
        """What the factory's llama-server accepts, when the factory can tell.

        A factory may offer ``binary_flags()`` (:class:`LlamaServerFactory` does); the proxy
        checks request flags against it before acquiring, so a flag the build lacks never
        evicts or starts anything.
        """
        probe = getattr(self._factory, "binary_flags", None)
        flags = probe() if callable(probe) else None
        return flags if isinstance(flags, BinaryFlags) else None

    def lease(self, spec: ModelSpec, flags: tuple[str, ...] = ()) -> _LeaseContext:
        """``async with pool.lease(spec, flags) as lease:`` -- acquire, then release on exit."""
        return _LeaseContext(self, spec, flags)

    def _abandon(self, ticket: _Ticket) -> None:
        """A waiting request leaves unserved (failed, timed out or cancelled)."""
        if ticket in self._tickets:
            self._tickets.remove(ticket)
            ticket.entry.queued -= 1
        future = ticket.future
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            # Granted just as the waiter was cancelled: give the server back.
            future.result().release()
        self._schedule()

    def _grant(self, entry: _Entry, *, waited: float) -> Lease:
        entry.active += 1
        entry.requests += 1
        model = entry.spec.id
        self.metrics.requests.inc(model)
        self.metrics.queue_wait.observe(waited, model)
        # The first request served after a crash is told so (whoever noticed the crash).
        lease = Lease(self, entry, restarted=entry.crash_unseen)
        entry.crash_unseen = False
        return lease

    def _release(self, entry: _Entry) -> None:
        entry.active -= 1
        entry.last_used = self._clock()
        entry.used = True
        if self._tickets or entry.draining:
            self._schedule()

    # -- scheduling ------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Decide starts, room and grants after any change (synchronous, never awaits)."""
        if self._closing:
            for ticket in self._tickets:
                if not ticket.future.done():
                    ticket.future.set_exception(
                        PoolClosedError("llama-proc proxy is shutting down")
                    )
            return
        for _ in range(3):
            self._start_waiting()
            self._make_room()
            if not self._grant_waiting():
                break

    def _waiting_entries(self) -> Iterator[tuple[_Entry, _Ticket]]:
        """Entries that need a start, each with its oldest ticket, oldest first."""
        seen: set[str] = set()
        for ticket in self._tickets:
            entry = ticket.entry
            if entry.state == "stopped" and entry.key not in seen and not ticket.future.done():
                seen.add(entry.key)
                yield entry, ticket

    def _usage(self) -> tuple[int, int, int, int]:
        """(slots used, memory reserved, slots and memory about to be freed by stops)."""
        used = reserved = leaving = leaving_memory = 0
        for e in self._entries.values():
            if e.state in ("starting", "ready", "stopping"):
                used += 1
                reserved += e.memory
            if e.state == "stopping":
                leaving += 1
                leaving_memory += e.memory
        return used, reserved, leaving, leaving_memory

    def _fits(self, entry: _Entry) -> bool:
        used, reserved, _, _ = self._usage()
        if used >= self.max_servers:
            return False
        return self.memory_budget is None or reserved + entry.memory <= self.memory_budget

    def _start_waiting(self) -> None:
        # Strictly in arrival order: a small model does not overtake a big one forever.
        for entry, _ in list(self._waiting_entries()):
            if not self._fits(entry):
                return
            self._begin_start(entry)

    def _make_room(self) -> None:
        head = next(self._waiting_entries(), None)
        if head is None:
            # Nobody needs room: servers that were draining for nobody take requests again.
            for e in self._entries.values():
                e.draining = False
            return
        needy, ticket = head
        exhausted = ticket.passed >= self.fair_share
        used, reserved, leaving, leaving_memory = self._usage()
        slots_short = used - leaving + 1 - self.max_servers
        memory_short = (
            0
            if self.memory_budget is None
            else reserved - leaving_memory + needy.memory - self.memory_budget
        )
        for e in self._entries.values():
            if e.draining:
                slots_short -= 1
                memory_short -= e.memory
        if slots_short <= 0 and memory_short <= 0:
            self._stop_idle_draining()
            return
        candidates = [
            e
            for e in self._entries.values()
            if e.state == "ready"
            and not e.draining
            and e is not needy
            and (exhausted or e.queued == 0)
            and not any(t.entry is e and t.seq < ticket.seq for t in self._tickets)
        ]
        if needy.flags and any(
            e.spec.id == needy.spec.id and e is not needy and e.state in ("starting", "ready")
            for e in self._entries.values()
        ):
            # Another flag set of a model that is already served makes room among that
            # model's own servers only: cycling an allowed flag value churns the tenant's own
            # model, never other models' servers.
            candidates = [e for e in candidates if e.spec.id == needy.spec.id]
        # Idle servers first, then the least recently used.
        candidates.sort(key=lambda e: (e.active > 0, e.last_used))
        victims: list[_Entry] = []
        for e in candidates:
            if slots_short <= 0 and memory_short <= 0:
                break
            victims.append(e)
            slots_short -= 1
            memory_short -= e.memory
        if slots_short > 0 or memory_short > 0:
            # Not enough can leave yet; stopping some now would only waste their warm state.
            self._stop_idle_draining()
            return
        reason: EvictReason = "lru" if used - leaving >= self.max_servers else "memory"
        for victim in victims:
            if victim.active:
                logger.info(
                    "draining server %s (%s) to make room: %d request(s) still running",
                    victim.key,
                    victim.spec.id,
                    victim.active,
                )
            victim.draining = True
            victim.evict_reason = reason
        self._stop_idle_draining()

    def _stop_idle_draining(self) -> None:
        for e in list(self._entries.values()):
            if e.draining and e.state == "ready" and e.active == 0:
                self._begin_stop(e, reason=e.evict_reason)

    def _grant_waiting(self) -> bool:
        """Serve waiting requests whose server is ready; True when the fairness state moved."""
        limit = math.inf
        blocked: list[_Ticket] = []
        for t in self._tickets:
            if t.entry.state in ("stopped", "stopping") and not t.future.done():
                blocked.append(t)
                if t.passed >= self.fair_share:
                    limit = min(limit, t.seq)
        moved = False
        for ticket in list(self._tickets):
            if ticket.seq > limit:
                break
            entry = ticket.entry
            if ticket.future.done() or entry.state != "ready" or entry.draining:
                continue
            if not entry.has_room() or not self._check_alive(entry):
                continue
            self._tickets.remove(ticket)
            entry.queued -= 1
            ticket.future.set_result(self._grant(entry, waited=self._clock() - ticket.arrived))
            for other in blocked:
                if other.seq < ticket.seq and other.entry is not entry:
                    other.passed += 1
                    moved |= other.passed == self.fair_share
        return moved

    def _busy_message(self, entry: _Entry) -> str:
        busy = ", ".join(
            f"{e.spec.id} ({e.active} running)"
            for e in self._entries.values()
            if e.state in ("ready", "starting", "stopping")
        )
        return (
            f"no server slot for {entry.spec.id!r} within {self.queue_timeout:g}s: "
            f"all {self.max_servers} slot(s) busy ({busy}); raise --max-servers or retry"
        )

    # -- health ----------------------------------------------------------------------------

    def _check_alive(self, entry: _Entry) -> bool:
        """Record a crash and free the slot when a ready server's process has died."""
        handle = entry.handle
        if entry.state != "ready" or handle is None:
            return entry.state == "ready"
        if handle.is_running:
            return True
        code = getattr(handle, "returncode", None)
        detail = f"exit code {code}" if code is not None else "process gone"
        entry.crashes += 1
        self.stats["crashes"] += 1
        self._heal(entry, "crash", f"exited unexpectedly ({detail})")
        return False

    def _heal(self, entry: _Entry, reason: HealReason, detail: str | None = None) -> None:
        """Stop an unhealthy server; the next request for its key starts it again."""
        if entry.state != "ready":
            return
        if reason != "crash":
            self.stats[f"{reason}s"] += 1
        entry.restarts += 1
        entry.crash_unseen = True
        self.metrics.restarts.inc(entry.spec.id, reason)
        now = self._clock()
        if entry.ready_since is not None and now - entry.ready_since >= STABLE_AFTER:
            entry.streak = 0
        if reason == "crash" and entry.active > 0:
            # It died serving a request: that request is the likely cause, not a server that
            # cannot run, and a restart serves the next one, which must not wait on backoff.
            entry.streak = 0
        entry.streak += 1
        backoff = _backoff(entry.streak)
        entry.retry_at = now + backoff
        what = detail or {
            "wedge": f"stopped answering ({entry.probe_failures} health probes failed)",
            "stall": "stalled mid-response",
        }.get(reason, reason)
        entry.last_error = f"llama-server for {entry.spec.id!r} {what}"
        if reason != "crash" and entry.handle is not None:
            entry.healed = (entry.handle, Healed(reason, what))
        tail = _log_tail(entry.handle)
        logger.warning(
            "%s [key %s]; it restarts on the next request%s%s",
            entry.last_error,
            entry.key,
            f" (in {backoff:g}s: it keeps failing)" if backoff else "",
            ("\n" + "\n".join(tail)) if tail else "",
        )
        self._begin_stop(entry, reason=None)

    async def check_health(self) -> None:
        """Probe every ready server once; restart those that failed ``wedge_after`` in a row."""
        entries = [
            e
            for e in self._entries.values()
            if e.state == "ready" and callable(getattr(e.handle, "probe", None))
        ]

        async def probe(entry: _Entry) -> None:
            handle = entry.handle
            try:
                async with asyncio.timeout(self.probe_timeout):
                    ok = bool(await handle.probe(self.probe_timeout))  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - a probe that errors (refused, reset, timeout) failed
                ok = False
            if entry.handle is not handle or not self._check_alive(entry):
                return
            if ok:
                entry.probe_failures = 0
                return
            entry.probe_failures += 1
            logger.info(
                "llama-server %s (%s) failed a health probe (%d of %d)",
                entry.key,
                entry.spec.id,
                entry.probe_failures,
                self.wedge_after,
            )
            if entry.probe_failures >= self.wedge_after:
                self._heal(entry, "wedge")

        await asyncio.gather(*(probe(e) for e in entries))

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            await self.check_health()

    # -- start / stop ----------------------------------------------------------------------

    def _begin_start(self, entry: _Entry) -> None:
        entry.state = "starting"
        entry.draining = False
        entry.start_task = asyncio.create_task(
            self._run_start(entry), name=f"llama-proc-start-{entry.key}"
        )

    async def _run_start(self, entry: _Entry) -> None:
        label = f"{entry.spec.id} {' '.join(entry.flags)}".strip()
        model = entry.spec.id
        try:
            delay = entry.retry_at - self._clock()
            if delay > 0:
                logger.info("restarting llama-server for %s in %.1fs (backoff)", label, delay)
                await asyncio.sleep(delay)
            logger.info("starting llama-server for %s [key %s]", label, entry.key)
            began = self._clock()
            handle = await self._factory(entry.spec, entry.flags)
        except BaseException as err:  # noqa: BLE001 - handed to every waiter, never lost
            self.stats["start_failures"] += 1
            self.metrics.load_failures.inc(model)
            entry.failures += 1
            entry.state = "stopped"
            entry.handle = None
            entry.streak += 1
            entry.retry_at = self._clock() + _backoff(entry.streak)
            error = err if isinstance(err, Exception) else _cancelled_start(label)
            entry.last_error = f"failed to start: {_one_line(err)}"
            logger.warning("llama-server for %s failed to start: %s", label, _one_line(err))
            # Requests that were waiting for this start fail with it; later ones try again.
            for ticket in self._tickets:
                if ticket.entry is entry and not ticket.future.done():
                    ticket.future.set_exception(error)
            if entry.flags and not entry.starts:
                # A client's flag variant that never ran is not kept (nor listed in /servers).
                self._entries.pop(entry.key, None)
        else:
            entry.handle = handle
            entry.starts += 1
            entry.probe_failures = 0
            self.stats["starts"] += 1
            now = self._clock()
            entry.last_used = entry.ready_since = now
            slots = getattr(handle, "slots", None)
            entry.concurrency = self.concurrency or (slots if isinstance(slots, int) else None)
            entry.state = "ready"
            self.metrics.loads.inc(model)
            self.metrics.load_seconds.observe(now - began, model)
            logger.info(
                "llama-server for %s ready at %s (pid %s) in %.2fs",
                label,
                handle.url,
                handle.pid,
                now - began,
            )
            if self._closing:
                self._begin_stop(entry, reason=None)
        finally:
            entry.start_task = None
            self._schedule()

    def _begin_stop(self, entry: _Entry, *, reason: EvictReason | None) -> None:
        if entry.state != "ready" or entry.handle is None:
            return
        if reason is not None:
            self.stats[f"evictions_{reason}"] += 1
            self.metrics.evictions.inc(entry.spec.id, reason)
            logger.info("stopping llama-server %s (%s): %s", entry.key, entry.spec.id, reason)
        entry.state = "stopping"
        entry.stop_task = asyncio.create_task(
            self._run_stop(entry), name=f"llama-proc-stop-{entry.key}"
        )

    async def _run_stop(self, entry: _Entry) -> None:
        handle, entry.handle = entry.handle, None
        try:
            if handle is not None:
                await asyncio.wait_for(handle.stop(), STOP_TIMEOUT)
        except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001 - logged; the slot must free
            logger.warning("stopping llama-server %s failed: %s", entry.key, _one_line(err))
        finally:
            entry.state = "stopped"
            entry.draining = False
            entry.ready_since = None
            entry.stop_task = None
            self._forget_old()
            self._schedule()

    async def _stop_entry(self, entry: _Entry, *, reason: EvictReason | None) -> None:
        self._begin_stop(entry, reason=reason)
        if entry.stop_task is not None:
            await asyncio.shield(entry.stop_task)

    async def remove(self, key: str, *, force: bool = False) -> bool:
        """Stop the server under ``key`` (``DELETE /servers/{key}``).

        Args:
            key: the server key.
            force: stop it even when requests are running (they fail).

        Returns:
            False when there is no such key.

        Raises:
            PoolBusyError: the server is starting, or busy and ``force`` is False.
        """
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry.state == "starting" or (entry.state == "stopped" and entry.queued):
            msg = f"server {key} is starting; try again when it is ready"
            raise PoolBusyError(msg)
        if entry.state == "ready" and entry.active and not force:
            msg = (
                f"server {key} has {entry.active} request(s) running; retry later or pass "
                "?force=true to stop it anyway"
            )
            raise PoolBusyError(msg)
        await self._stop_entry(entry, reason="manual")
        if entry.stop_task is not None:
            await asyncio.shield(entry.stop_task)
        if entry.queued == 0 and entry.state == "stopped":
            self._entries.pop(key, None)
        return True

    # -- idle reaper -----------------------------------------------------------------------

    def _ttl(self, entry: _Entry) -> float:
        ttl = entry.spec.idle_ttl
        return self.idle_ttl if ttl is None else ttl

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(
                _reap_interval([self.idle_ttl] + [self._ttl(e) for e in self._entries.values()])
            )
            self.reap()

    def reap(self) -> None:
        """Stop idle servers past their TTL and notice crashed ones (the reaper calls this)."""
        now = self._clock()
        for entry in list(self._entries.values()):
            if entry.state != "ready":
                continue
            if not self._check_alive(entry):
                continue
            ttl = self._ttl(entry)
            if ttl > 0 and entry.active == 0 and now - entry.last_used >= ttl:
                self._begin_stop(entry, reason="idle")

    # -- introspection ---------------------------------------------------------------------

    def snapshot(self) -> list[ServerInfo]:
        """Every known entry, most recently used first."""
        now = self._clock()
        infos = [
            ServerInfo(
                key=e.key,
                model=e.spec.id,
                flags=e.flags,
                state="queued" if e.state == "stopped" and e.queued else e.state,
                url=e.handle.url if e.handle is not None else None,
                pid=e.handle.pid if e.handle is not None else None,
                active=e.active,
                draining=e.draining,
                requests=e.requests,
                starts=e.starts,
                crashes=e.crashes,
                last_used=(now - e.last_used) if e.used else None,
                last_error=e.last_error,
                queued=e.queued,
                restarts=e.restarts,
                memory=e.memory,
            )
            for e in self._entries.values()
        ]
        infos.sort(key=lambda i: i.last_used if i.last_used is not None else float("inf"))
        return infos

    def ready_servers(self) -> list[tuple[ServerInfo, str, str | None]]:
        """(info, url, API key) for servers that are up, for scraping their /metrics."""
        out: list[tuple[ServerInfo, str, str | None]] = []
        for info in self.snapshot():
            entry = self._entries.get(info.key)
            if info.state == "ready" and info.url and entry is not None:
                out.append((info, info.url, getattr(entry.handle, "api_key", None)))
        return out

    def gauges(self) -> Iterator[tuple[str, Mapping[str, str], float]]:
        """Scrape-time gauge samples: (family, labels, value); see ``metrics.ProxyMetrics``."""
        snapshot = self.snapshot()
        for state in ("queued", "starting", "ready", "stopping"):
            yield "servers", {"state": state}, sum(1 for s in snapshot if s.state == state)
        queued: dict[str, int] = {}
        reserved = 0
        for info in snapshot:
            if info.state == "ready":
                yield "server_active", {"server": info.key, "model": info.model}, info.active
            if info.queued:
                queued[info.model] = queued.get(info.model, 0) + info.queued
            if info.state in ("starting", "ready", "stopping"):
                reserved += info.memory
        for model, count in sorted(queued.items()):
            yield "queued", {"model": model}, count
        yield "memory_reserved", {}, reserved
        yield "memory_budget", {}, self.memory_budget or 0

    # -- helpers ---------------------------------------------------------------------------

    def _forget_old(self) -> None:
        stopped = [e for e in self._entries.values() if e.state == "stopped" and not e.queued]
        for entry in stopped[: max(0, len(stopped) - MAX_FORGOTTEN_KEYS)]:
            del self._entries[entry.key]


class _LeaseContext:
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


def _backoff(streak: int) -> float:
    """No wait for the first restart, then 1 s, 2 s, 4 s ... up to the cap."""
    if streak <= 1:
        return 0.0
    return float(min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_BASE * 2.0 ** (streak - 2)))


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _reap_interval(ttls: Sequence[float]) -> float:
    positive = [t for t in ttls if t > 0]
    if not positive:
        return 5.0
    return max(0.05, min(5.0, min(positive) / 4))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _log_tail(handle: object, limit: int = 10) -> list[str]:
    logs = getattr(handle, "logs", None)
    if not callable(logs):
        return []
    try:
        lines = list(logs())
    except Exception:  # noqa: BLE001 - a log tail is a nicety; never fail on it
        return []
    return [f"    {line}" for line in lines[-limit:]]


def _cancelled_start(label: str) -> ServerStartError:
    return ServerStartError(f"starting llama-server for {label} was cancelled")
