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
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Self, runtime_checkable

from llama_proc._childenv import child_environment
from llama_proc.errors import (
    ConfigError,
    InvalidArgumentError,
    ModelFileError,
    ServerError,
    ServerStartError,
)
from llama_proc.models.gguf_info import cached_model_info, estimate_memory
from llama_proc.proxy.metrics import PoolMetrics
from llama_proc.proxy.threads import with_threads
from llama_proc.runtime.args import ServerArgs
from llama_proc.runtime.flags import BinaryFlags, probe_flags
from llama_proc.server import AsyncLlamaServer

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

    from llama_proc.config import Settings
    from llama_proc.proxy.models_config import ModelSpec

__all__ = [
    "DEFAULT_FAIR_SHARE",
    "DEFAULT_MAX_QUEUE",
    "Healed",
    "Lease",
    "LlamaServerFactory",
    "ModelTooLargeError",
    "PoolBusyError",
    "PoolClosedError",
    "PoolQueueFullError",
    "ServerFactory",
    "ServerHandle",
    "ServerInfo",
    "ServerPool",
    "estimate_server_memory",
    "parse_memory_budget",
    "server_key",
    "total_memory",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SERVERS: Final = 1
DEFAULT_IDLE_TTL: Final = 600.0
DEFAULT_QUEUE_TIMEOUT: Final = 600.0
DEFAULT_MAX_QUEUE: Final = 64
"""Requests one model may have waiting for its server before new ones get a 429."""
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
PROPS_TIMEOUT: Final = 10.0
"""Seconds to read a new server's ``/props`` (its slot count)."""
STOP_TIMEOUT: Final = 30.0
"""Seconds to wait for one server's stop() before giving up on it (the pool logs it)."""
MAX_FORGOTTEN_KEYS: Final = 256
"""Stopped entries kept for ``/servers`` history; older ones are dropped."""
MEMORY_WEIGHT_FACTOR: Final = 1.2
MEMORY_OVERHEAD: Final = 256 * 1024 * 1024
"""Estimate when a model's header cannot be read: model files x factor + this."""
AUTO_PARALLEL: Final = 4
"""Slots llama-server runs with when ``--parallel`` is not given (its ``-np -1``, auto)."""
_ESTIMATE_OPTIONS: Final = frozenset({"ctx_size", "parallel", "cache_type_k", "cache_type_v"})
DEFAULT_MEMORY_SHARE: Final = 0.8
"""Share of RAM the pool's servers may use together when ``--memory-budget`` is not given."""
_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b?|b)?")
_SHARD_RE: Final = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")

State = Literal["stopped", "queued", "starting", "ready", "stopping"]
EvictReason = Literal["lru", "memory", "idle", "manual"]
HealReason = Literal["crash", "wedge", "stall"]


@dataclass(frozen=True)
class Healed:
    """Why the pool stopped a server that was still running (see :meth:`Lease.healed`)."""

    reason: Literal["wedge", "stall"]
    what: str
    """What it did, e.g. ``stopped answering (3 health probes failed)``."""


@runtime_checkable
class ServerHandle(Protocol):
    """A started server as the pool sees it.

    Optional extras the pool and proxy use when a handle has them: ``returncode`` (reported
    after a crash), ``logs()`` (a log tail for the crash report), ``api_key`` (sent as a
    Bearer token on every forwarded request), ``slots`` (requests it serves at once: the
    pool's default concurrency for it) and ``async probe(timeout) -> bool`` (whether the
    server's main loop still answers; without it a server is never judged wedged).
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
MemoryEstimate = Callable[["ModelSpec", tuple[str, ...]], int]
"""Bytes a server for (model, flags) is expected to use; 0 = unknown."""


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


@functools.lru_cache(maxsize=1024)
def server_key(model_id: str, flags: tuple[str, ...]) -> str:
    """A stable short key for (model id, normalized flags): same inputs, same key, any process."""
    blob = json.dumps([model_id, list(flags)], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def estimate_server_memory(spec: ModelSpec, flags: tuple[str, ...] = ()) -> int:
    """Bytes a llama-server for ``spec`` with ``flags`` is expected to use.

    :func:`~llama_proc.models.gguf_info.estimate_memory` (weights, KV cache, slots, process
    overhead) for the model's header, read once per file identity, and the context size,
    slots and KV cache type the server gets: the config's options, then its ``extra_args``,
    then the request's flags, the last one winning. Unset, they are llama-server's defaults:
    the trained context, :data:`AUTO_PARALLEL` slots, f16. When the K and V cache types
    differ, the larger one counts for both (an upper bound).

    When the header cannot be read (a ggml type newer than this reader, say), the files' size
    times :data:`MEMORY_WEIGHT_FACTOR` plus :data:`MEMORY_OVERHEAD`; 0 when the file is missing
    or not fetched yet (the start reports that).
    """
    path = spec.path
    if path is None:  # a Hugging Face reference not fetched yet: size unknown
        return 0
    chosen = _estimate_options(spec, flags)
    try:
        info = cached_model_info(path)
        ctx = int(chosen.get("ctx_size", 0))
        parallel = int(chosen.get("parallel", -1))
        slots = AUTO_PARALLEL if parallel < 1 else parallel
        kv_types = {str(chosen.get(k, "f16")) for k in ("cache_type_k", "cache_type_v")}
        return max(estimate_memory(info, ctx, slots, kv).total for kv in kv_types)
    except (ModelFileError, InvalidArgumentError, ValueError) as err:
        logger.debug("memory estimate of %s from its file size: %s", spec.id, err)
    try:
        match = _SHARD_RE.search(path.name)
        if match is None:
            size = path.stat().st_size
        else:
            stem = path.name[: match.start()]
            count = int(match.group(2))
            size = sum(
                (path.parent / f"{stem}-{i:05d}-of-{count:05d}.gguf").stat().st_size
                for i in range(1, count + 1)
            )
    except (OSError, AttributeError, TypeError):
        return 0
    return int(size * MEMORY_WEIGHT_FACTOR) + MEMORY_OVERHEAD


@functools.cache
def _estimate_spellings() -> Mapping[str, str]:
    """Every spelling of the flags the memory estimate reads -> the ServerArgs field name."""
    return {
        flag: f.name
        for f in dataclasses.fields(ServerArgs)
        if f.name in _ESTIMATE_OPTIONS
        for flag in f.metadata["flags"]
    }


def _estimate_options(spec: ModelSpec, flags: Sequence[str]) -> dict[str, Any]:
    chosen = {k: v for k, v in spec.options.items() if k in _ESTIMATE_OPTIONS and v is not None}
    spellings = _estimate_spellings()
    words = [*spec.options.get("extra_args", ()), *spec.extra_args, *flags]
    for i, word in enumerate(words):
        name, eq, value = word.partition("=")
        field = spellings.get(name)
        if field is not None and (eq or i + 1 < len(words)):
            chosen[field] = value if eq else words[i + 1]
    return chosen


def total_memory() -> int | None:
    """Physical memory of this host in bytes (None where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def parse_memory_budget(text: str | None, total: int | None = None) -> int | None:
    """The pool's memory budget from ``--memory-budget`` (bytes).

    Args:
        text: ``"12G"``, ``"512M"``, ``"2048"`` (bytes), ``"75%"`` (of RAM), ``"none"``
            (no budget); None = :data:`DEFAULT_MEMORY_SHARE` of RAM.
        total: RAM in bytes (default: this host's, read now).

    Raises:
        ConfigError: the text is not a size, or a share of RAM is asked where RAM is unknown.
    """
    value = (text or f"{DEFAULT_MEMORY_SHARE * 100:g}%").strip().lower()
    if value in ("none", "off", "0"):
        return None
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        msg = f"--memory-budget {text!r} is not a size: use e.g. 12G, 512M, 75% (of RAM) or none"
        raise ConfigError(msg)
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        ram = total if total is not None else total_memory()
        if ram is None:
            msg = "cannot read this host's memory size: give --memory-budget in bytes (e.g. 12G)"
            raise ConfigError(msg)
        budget = int(ram * number / 100)
    else:
        budget = int(number * 1024 ** "bkmgt".index(unit[0] if unit else "b"))
    if budget < 1:
        msg = f"--memory-budget {text!r} must be more than 0 bytes (or none)"
        raise ConfigError(msg)
    return budget


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
        max_queue: requests one server key may have waiting (:class:`PoolQueueFullError`).
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
        if entry.queued >= self.max_queue:
            self.metrics.rejected.inc(spec.id, "queue_full")
            msg = (
                f"model {spec.id!r} has {entry.queued} requests waiting (the most allowed); "
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
    ) -> None:
        self.binary = binary
        self.threads = threads
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

    __slots__ = ("_server", "slots")

    def __init__(self, server: AsyncLlamaServer) -> None:
        self._server = server
        self.slots: int | None = None
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
            await resp.read()
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
        key = self._server.server.api_key
        return None if key is None else str(key)

    def logs(self) -> list[str]:
        return list(self._server.logs())

    async def stop(self) -> None:
        await self._server.stop()
