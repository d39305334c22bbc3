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
* At most ``max_servers`` servers are up or starting, and with a ``memory_budget`` (host RAM)
  and ``device_budgets`` (each GPU) their claims stay within them: the estimate until a server
  runs, then what it was measured to hold (:mod:`.measure`); a model that cannot fit even
  alone is refused at once with the figures (:class:`ModelTooLargeError`). A request that
  needs room stops idle servers on the devices that are short, cheapest expected reload first
  (:mod:`.scheduler`). A server that is loading or has requests in flight is never stopped
  to make room, nor one loaded less than ``min_residency`` ago unless the request has waited
  ``residency_wait``, nor a ``keep_loaded`` model's.
* No thrashing: a server whose model still has requests waiting is not stopped, so waiting
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
import logging
import math
import time
from typing import TYPE_CHECKING, Final

from llama_proc.proxy.budget import MemoryEstimate, estimate_server_memory
from llama_proc.proxy.device_budget import HOST
from llama_proc.proxy.entries import Entry, Healed, ServerInfo, server_key
from llama_proc.proxy.lease import Lease, LeaseContext, Ticket
from llama_proc.proxy.lifecycle import MEASURE_MIN_INTERVAL, PoolLifecycle
from llama_proc.proxy.metrics import PoolMetrics
from llama_proc.proxy.scheduler import (
    DeviceEstimate,
    RoomRules,
    VictimPolicy,
    busy_message,
    by_expected_cost,
    fits,
    note_request,
    plan_room,
    too_large_message,
    waiting_entries,
)
from llama_proc.proxy.serve_flags import (
    DEFAULT_IDLE_TTL,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SERVERS,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_RESIDENCY_WAIT,
)
from llama_proc.proxy.servers import (
    ModelTooLargeError,
    PoolBusyError,
    PoolClosedError,
    PoolQueueFullError,
    ServerFactory,
)
from llama_proc.runtime.flags import BinaryFlags

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

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
QUEUE_FULL_RETRY_AFTER: Final = 1.0
"""Seconds a client is told to wait (Retry-After) when a model's queue is full."""
START_WAIT_POLL: Final = 1.0
"""A request waiting on a load in progress waits on past its queue timeout, this often checking."""


class ServerPool(PoolLifecycle):
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
        min_residency: seconds a loaded server is kept from eviction, unless a request has
            waited ``residency_wait`` seconds for room.
        residency_wait: the bound on that wait.
        victim_policy: orders the servers that may leave (see :mod:`.scheduler`).
        preload: models started by :meth:`start`, before any request asks.
        device_budgets: bytes each GPU may give the servers (see :mod:`.device_budget`).
        device_estimate: a server's expected bytes per device, ``host`` included (default:
            ``memory_estimate``, all on the host).
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
        min_residency: float = 0.0,
        residency_wait: float = DEFAULT_RESIDENCY_WAIT,
        victim_policy: VictimPolicy = by_expected_cost,
        preload: Sequence[ModelSpec] = (),
        device_budgets: Mapping[str, int] | None = None,
        device_estimate: DeviceEstimate | None = None,
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
        self._entries: dict[str, Entry] = {}
        self._tickets: list[Ticket] = []
        self._seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._measures: set[asyncio.Task[None]] = set()
        self._wake: asyncio.TimerHandle | None = None
        self._preload = tuple(preload)
        self.device_budgets = dict(device_budgets or {})
        self._device_estimate = device_estimate
        self.min_residency = max(0.0, min_residency)
        self.residency_wait = max(0.0, residency_wait)
        self.victim_policy = victim_policy
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
            for spec in self._preload:
                self._tasks.append(
                    asyncio.create_task(
                        self._preload_one(spec), name=f"llama-proc-preload-{spec.id}"
                    )
                )

    async def _preload_one(self, spec: ModelSpec) -> None:
        """Load a ``preload`` model at start (as one request that sends nothing)."""
        try:
            async with self.lease(spec):
                pass
        except Exception as err:  # noqa: BLE001 - the first real request reports it again
            logger.warning("preloading %s failed: %s", spec.id, err)

    @property
    def rules(self) -> RoomRules:
        """What :func:`~.scheduler.plan_room` may do, from the pool's settings now."""
        return RoomRules(
            max_servers=self.max_servers,
            memory_budget=self.memory_budget,
            fair_share=self.fair_share,
            min_residency=self.min_residency,
            residency_wait=self.residency_wait,
            policy=self.victim_policy,
            device_budgets=self.device_budgets,
        )

    def _claim(self, spec: ModelSpec, flags: tuple[str, ...]) -> Mapping[str, int]:
        """Bytes a server for (spec, flags) is expected to hold per device (blocking)."""
        if self._device_estimate is not None:
            return self._device_estimate(spec, flags)
        return {HOST: self._estimate(spec, flags)}

    async def close(self) -> None:
        """Refuse new requests, then stop every server (including ones still starting)."""
        self._closing = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in list(self._measures):
            task.cancel()
        if self._wake is not None:
            self._wake.cancel()
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
            claim: Mapping[str, int] = {}
            if self.memory_budget is not None or self.device_budgets:
                # Reading the header is file I/O and parsing: off the event loop, so a slow
                # disk or a hostile header stalls this request only, never /health or others.
                claim = await asyncio.to_thread(self._claim, spec, flags)
                if self._closing:
                    msg = "llama-proc proxy is shutting down"
                    raise PoolClosedError(msg)
            entry = self._entries.get(key)  # another request may have made it meanwhile
            if entry is None:
                entry = self._entries[key] = Entry(key=key, spec=spec, flags=flags)
                entry.memory = entry.estimate = claim.get(HOST, 0)
                entry.gpu_claim = entry.gpu_estimate = {k: v for k, v in claim.items() if k != HOST}
        refusal = too_large_message(entry, self.rules)
        if refusal is not None:
            self.metrics.rejected.inc(spec.id, "too_large")
            raise ModelTooLargeError(refusal)
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
        ticket = Ticket(entry, self._seq, self._clock(), loop.create_future())
        self._tickets.append(ticket)
        entry.queued += 1
        self._schedule()
        try:
            return await self._wait(ticket)
        except BaseException:
            self._abandon(ticket)
            raise

    async def _wait(self, ticket: Ticket) -> Lease:
        loop = asyncio.get_running_loop()
        future, entry = ticket.future, ticket.entry
        deadline = loop.time() + self.queue_timeout
        while not future.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                if entry.state != "starting":
                    self.metrics.rejected.inc(entry.spec.id, "busy")
                    raise PoolBusyError(
                        busy_message(
                            self._entries.values(), entry, self.queue_timeout, self.max_servers
                        )
                    )
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

    def lease(self, spec: ModelSpec, flags: tuple[str, ...] = ()) -> LeaseContext:
        """``async with pool.lease(spec, flags) as lease:`` -- acquire, then release on exit."""
        return LeaseContext(self, spec, flags)

    def _abandon(self, ticket: Ticket) -> None:
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

    def _grant(self, entry: Entry, *, waited: float) -> Lease:
        note_request(entry, self._clock())
        entry.active += 1
        entry.requests += 1
        model = entry.spec.id
        self.metrics.requests.inc(model)
        self.metrics.queue_wait.observe(waited, model)
        # The first request served after a crash is told so (whoever noticed the crash).
        lease = Lease(self, entry, restarted=entry.crash_unseen)
        entry.crash_unseen = False
        return lease

    def _release(self, entry: Entry) -> None:
        entry.active -= 1
        entry.last_used = self._clock()
        entry.used = True
        if not entry.measured_served or entry.last_used - entry.measured_at >= MEASURE_MIN_INTERVAL:
            self._spawn_measure(entry)
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

    def _start_waiting(self) -> None:
        # Strictly in arrival order: a small model does not overtake a big one forever.
        for entry, _ in list(waiting_entries(self._tickets)):
            if not fits(self._entries.values(), entry, self.rules):
                return
            self._begin_start(entry)

    def _make_room(self) -> None:
        head = next(waiting_entries(self._tickets), None)
        if head is None:
            # Nobody needs room: servers that were draining for nobody take requests again.
            for e in self._entries.values():
                e.draining = False
            return
        now = self._clock()
        room = plan_room(list(self._entries.values()), self._tickets, *head, self.rules, now)
        for victim in room.victims:
            victim.draining = True
            victim.evict_reason = room.reason
        if room.wake_at is not None and self._wake is None:
            # A server protected by its residency may leave later: plan again then.
            def wake() -> None:
                self._wake = None
                self._schedule()

            self._wake = asyncio.get_running_loop().call_later(room.wake_at - now, wake)
        self._stop_idle_draining()

    def _stop_idle_draining(self) -> None:
        for e in list(self._entries.values()):
            if e.draining and e.state == "ready" and e.active == 0:
                self._begin_stop(e, reason=e.evict_reason)

    def _grant_waiting(self) -> bool:
        """Serve waiting requests whose server is ready; True when the fairness state moved."""
        limit = math.inf
        blocked: list[Ticket] = []
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
