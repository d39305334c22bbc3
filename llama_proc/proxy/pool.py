"""A pool of llama-servers keyed on (model, flags), started on demand.

The pool never talks HTTP itself: a *factory* starts a server for a :class:`ModelSpec` and a
tuple of extra flags and returns a :class:`ServerHandle` (url, liveness, stop). The real factory
(:class:`LlamaServerFactory`) runs llama-server through :mod:`llama_proc.server`; tests inject a
fake.

Rules the pool keeps:

* One server per key. Concurrent first requests for a key wait on one start.
* At most ``max_servers`` servers are up or starting. A request that needs a new server takes a
  free slot, else evicts the least recently used idle server, else marks the least recently used
  busy one *draining* (it takes no new requests and stops when its last request ends) and waits.
  A running request is never cut short by eviction. Slots are granted first come, first served.
* A server idle for longer than its TTL is stopped.
* A server found dead (crash) is recorded (log, counters, :meth:`ServerPool.snapshot`) and
  started again by the next request for its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Self, runtime_checkable

from llama_proc.errors import ServerError, ServerStartError
from llama_proc.server import AsyncLlamaServer

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

    from llama_proc.config import Settings
    from llama_proc.proxy.models_config import ModelSpec

__all__ = [
    "Lease",
    "LlamaServerFactory",
    "PoolBusyError",
    "PoolClosedError",
    "ServerFactory",
    "ServerHandle",
    "ServerInfo",
    "ServerPool",
    "server_key",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SERVERS: Final = 1
DEFAULT_IDLE_TTL: Final = 600.0
DEFAULT_QUEUE_TIMEOUT: Final = 600.0
STOP_TIMEOUT: Final = 30.0
"""Seconds to wait for one server's stop() before giving up on it (the pool logs it)."""
MAX_FORGOTTEN_KEYS: Final = 256
"""Stopped entries kept for ``/servers`` history; older ones are dropped."""

State = Literal["stopped", "queued", "starting", "ready", "stopping"]


@runtime_checkable
class ServerHandle(Protocol):
    """A started server as the pool sees it.

    Optional extras the pool and proxy use when a handle has them: ``returncode`` (reported
    after a crash), ``logs()`` (a log tail for the crash report) and ``api_key`` (sent as a
    Bearer token on every forwarded request).
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


class PoolClosedError(ServerError):
    """The pool is shutting down and takes no new requests."""


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
            "draining": self.draining,
            "requests": self.requests,
            "starts": self.starts,
            "crashes": self.crashes,
            "idle_seconds": None if self.last_used is None else round(self.last_used, 3),
            "last_error": self.last_error,
        }


@dataclass(eq=False)
class _Entry:
    key: str
    spec: ModelSpec
    flags: tuple[str, ...]
    state: State = "stopped"
    handle: ServerHandle | None = None
    active: int = 0
    waiters: int = 0
    draining: bool = False
    last_used: float = 0.0
    used: bool = False
    requests: int = 0
    starts: int = 0
    crashes: int = 0
    last_error: str | None = None
    error: BaseException | None = None
    failures: int = 0
    crash_unseen: bool = False
    start_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None


class Lease:
    """One request's hold on a ready server; release it when the response is done."""

    __slots__ = ("_entry", "_pool", "_released", "api_key", "key", "restarted", "url")

    def __init__(self, pool: ServerPool, entry: _Entry, *, restarted: bool) -> None:
        self._pool = pool
        self._entry = entry
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

    def check_alive(self) -> bool:
        """After an upstream connection error: is the server still up? Records a crash if not."""
        return self._pool._check_alive(self._entry)

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
    """Servers keyed on (model, flags) with on-demand start, LRU eviction and idle unload.

    Use from one event loop. Call :meth:`start` (starts the idle reaper) and :meth:`close`.

    Args:
        factory: starts a server; see :data:`ServerFactory`.
        max_servers: most servers up or starting at once.
        idle_ttl: seconds an unused server stays up (a model's own ``idle_ttl`` wins; 0 or
            None = never unload).
        queue_timeout: seconds a request waits for a server slot before :class:`PoolBusyError`.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        factory: ServerFactory,
        *,
        max_servers: int = DEFAULT_MAX_SERVERS,
        idle_ttl: float | None = DEFAULT_IDLE_TTL,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_servers < 1:
            msg = f"max_servers={max_servers} must be at least 1"
            raise ValueError(msg)
        self._factory = factory
        self.max_servers = max_servers
        self.idle_ttl = idle_ttl or 0.0
        self.queue_timeout = queue_timeout
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._queue: list[_Entry] = []
        self._changed = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self.stats: dict[str, int] = {
            "starts": 0,
            "start_failures": 0,
            "crashes": 0,
            "evictions_lru": 0,
            "evictions_idle": 0,
            "evictions_manual": 0,
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the idle reaper (needs a running loop)."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="llama-proc-reaper")

    async def close(self) -> None:
        """Refuse new requests, then stop every server (including ones still starting)."""
        self._closing = True
        self._notify()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        # A server still loading is abandoned: the factory stops what it spawned on cancel.
        starting = [e.start_task for e in self._entries.values() if e.start_task is not None]
        for task in starting:
            task.cancel()
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
            PoolBusyError: no slot freed up within ``queue_timeout``.
            PoolClosedError: the pool is shutting down.
        """
        key = server_key(spec.id, flags)
        entry = self._entries.get(key)
        # Fast path: the usual case of a warm server takes no await at all.
        if (
            entry is not None
            and entry.state == "ready"
            and not entry.draining
            and not self._closing
            and entry.handle is not None
            and entry.handle.is_running
        ):
            return self._grant(entry, restarted=False)
        if entry is None:
            entry = _Entry(key=key, spec=spec, flags=flags)
            self._entries[key] = entry
        deadline = self._clock() + self.queue_timeout
        restarted = False
        # A start that fails while we wait fails this request too (no second attempt for it).
        seen_failures = entry.failures
        entry.waiters += 1
        try:
            while True:
                if self._closing:
                    msg = "llama-proc proxy is shutting down"
                    raise PoolClosedError(msg)
                if entry.state == "ready" and not self._check_alive(entry):
                    restarted = True
                    continue
                if entry.state == "ready" and not entry.draining:
                    return self._grant(entry, restarted=restarted)
                if entry.state == "starting" and entry.start_task is not None:
                    await asyncio.shield(entry.start_task)
                    continue
                if entry.state == "stopped":
                    if entry.failures != seen_failures and entry.error is not None:
                        raise entry.error
                    entry.error = None
                    entry.state = "queued"
                    self._queue.append(entry)
                if entry.state == "queued" and self._try_claim_slot(entry):
                    continue
                await self._wait_changed(deadline, entry)
        finally:
            entry.waiters -= 1
            if entry.state == "queued" and entry.waiters == 0:
                # Every waiter gave up (timeouts, client disconnects): leave the queue, and let
                # servers that were draining for nobody take requests again.
                self._queue.remove(entry)
                entry.state = "stopped"
                if not self._queue:
                    for other in self._entries.values():
                        other.draining = False
                self._notify()

    def lease(self, spec: ModelSpec, flags: tuple[str, ...] = ()) -> _LeaseContext:
        """``async with pool.lease(spec, flags) as lease:`` -- acquire, then release on exit."""
        return _LeaseContext(self, spec, flags)

    def _grant(self, entry: _Entry, *, restarted: bool) -> Lease:
        entry.active += 1
        entry.requests += 1
        # The first request served after a crash is told so (whoever noticed the crash).
        restarted = restarted or entry.crash_unseen
        entry.crash_unseen = False
        return Lease(self, entry, restarted=restarted)

    def _release(self, entry: _Entry) -> None:
        entry.active -= 1
        entry.last_used = self._clock()
        entry.used = True
        if entry.active == 0 and (entry.draining or self._queue):
            if entry.draining:
                self._begin_stop(entry, reason="lru")
            self._notify()

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
        entry.crash_unseen = True
        self.stats["crashes"] += 1
        entry.last_error = f"llama-server for {entry.spec.id!r} exited unexpectedly ({detail})"
        tail = _log_tail(handle)
        logger.warning(
            "%s [key %s]; it restarts on the next request%s",
            entry.last_error,
            entry.key,
            ("\n" + "\n".join(tail)) if tail else "",
        )
        self._begin_stop(entry, reason=None)
        return False

    # -- slots and eviction ----------------------------------------------------------------

    def _slots_used(self) -> int:
        return sum(
            1 for e in self._entries.values() if e.state in ("starting", "ready", "stopping")
        )

    def _try_claim_slot(self, entry: _Entry) -> bool:
        free = self.max_servers - self._slots_used()
        position = self._queue.index(entry)
        if position < free:
            self._queue.remove(entry)
            self._begin_start(entry)
            return True
        # Not enough slots for everyone up to and including us: make sure enough servers are on
        # their way out (idle ones stop now, busy ones drain).
        needed = position + 1 - free
        leaving = sum(1 for e in self._entries.values() if e.state == "stopping" or e.draining)
        while leaving < needed:
            victim = self._pick_victim()
            if victim is None:
                break
            leaving += 1
            if victim.active == 0:
                self._begin_stop(victim, reason="lru")
            else:
                logger.info(
                    "draining server %s (%s) to make room: %d request(s) still running",
                    victim.key,
                    victim.spec.id,
                    victim.active,
                )
                victim.draining = True
        return False

    def _pick_victim(self) -> _Entry | None:
        ready = [e for e in self._entries.values() if e.state == "ready" and not e.draining]
        if not ready:
            return None
        # Idle servers first, then least recently used.
        return min(ready, key=lambda e: (e.active > 0, e.last_used))

    # -- start / stop ----------------------------------------------------------------------

    def _begin_start(self, entry: _Entry) -> None:
        entry.state = "starting"
        entry.draining = False
        entry.start_task = asyncio.create_task(
            self._run_start(entry), name=f"llama-proc-start-{entry.key}"
        )

    async def _run_start(self, entry: _Entry) -> None:
        label = f"{entry.spec.id} {' '.join(entry.flags)}".strip()
        logger.info("starting llama-server for %s [key %s]", label, entry.key)
        began = self._clock()
        try:
            handle = await self._factory(entry.spec, entry.flags)
        except BaseException as err:  # noqa: BLE001 - handed to every waiter, never lost
            self.stats["start_failures"] += 1
            entry.failures += 1
            entry.state = "stopped"
            entry.handle = None
            entry.error = err if isinstance(err, Exception) else _cancelled_start(label)
            entry.last_error = f"failed to start: {_one_line(err)}"
            logger.warning("llama-server for %s failed to start: %s", label, _one_line(err))
        else:
            entry.handle = handle
            entry.starts += 1
            self.stats["starts"] += 1
            entry.last_used = self._clock()
            entry.state = "ready"
            logger.info(
                "llama-server for %s ready at %s (pid %s) in %.2fs",
                label,
                handle.url,
                handle.pid,
                self._clock() - began,
            )
            if self._closing:
                self._begin_stop(entry, reason=None)
        finally:
            entry.start_task = None
            self._notify()

    def _begin_stop(self, entry: _Entry, *, reason: str | None) -> None:
        if entry.state != "ready" or entry.handle is None:
            return
        if reason is not None:
            self.stats[f"evictions_{reason}"] += 1
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
            entry.stop_task = None
            self._forget_old()
            self._notify()

    async def _stop_entry(self, entry: _Entry, *, reason: str | None) -> None:
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
        if entry.state in ("starting", "queued"):
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
        if entry.waiters == 0 and entry.state == "stopped":
            self._entries.pop(key, None)
        return True

    # -- idle reaper -----------------------------------------------------------------------

    def _ttl(self, entry: _Entry) -> float:
        ttl = entry.spec.idle_ttl
        return self.idle_ttl if ttl is None else ttl

    async def _reap_forever(self) -> None:
        ttls = [self.idle_ttl] + [e.spec.idle_ttl or 0.0 for e in self._entries.values()]
        interval = _reap_interval(ttls)
        while True:
            await asyncio.sleep(interval)
            self.reap()
            interval = _reap_interval(
                [self.idle_ttl] + [self._ttl(e) for e in self._entries.values()]
            )

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
                state=e.state,
                url=e.handle.url if e.handle is not None else None,
                pid=e.handle.pid if e.handle is not None else None,
                active=e.active,
                draining=e.draining,
                requests=e.requests,
                starts=e.starts,
                crashes=e.crashes,
                last_used=(now - e.last_used) if e.used else None,
                last_error=e.last_error,
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

    # -- helpers ---------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_changed(self, deadline: float, entry: _Entry) -> None:
        remaining = deadline - self._clock()
        if remaining <= 0:
            busy = ", ".join(
                f"{e.spec.id} ({e.active} running)"
                for e in self._entries.values()
                if e.state in ("ready", "starting", "stopping")
            )
            msg = (
                f"no server slot for {entry.spec.id!r} within {self.queue_timeout:g}s: "
                f"all {self.max_servers} slot(s) busy ({busy}); raise --max-servers or retry"
            )
            raise PoolBusyError(msg)
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), remaining)

    def _forget_old(self) -> None:
        stopped = [e for e in self._entries.values() if e.state == "stopped" and not e.waiters]
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
    """

    def __init__(
        self,
        *,
        binary: Path | None = None,
        settings: Settings | None = None,
        start_timeout: float | None = None,
        common_options: Mapping[str, Any] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.binary = binary
        self.api_key = api_key
        self.settings = settings
        self.start_timeout = start_timeout
        self.common_options = dict(common_options or {})

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
        return _AsyncServerHandle(server)


class _AsyncServerHandle:
    """Adapts AsyncLlamaServer to :class:`ServerHandle`."""

    __slots__ = ("_server",)

    def __init__(self, server: AsyncLlamaServer) -> None:
        self._server = server

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
