"""The pool's server lifecycle: start, stop, heal (crash, wedge, stall) and idle unload.

:class:`PoolLifecycle` is the base of :class:`~llama_proc.proxy.pool.ServerPool`: it holds the
pool's state and runs the tasks that start and stop servers, probes ready ones and stops idle
ones. Which server starts or leaves, and when, is the pool's scheduling (it overrides
:meth:`PoolLifecycle._schedule`, called after every change here).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ServerStartError
from llama_proc.proxy.entries import (
    Entry,
    EvictReason,
    Healed,
    HealReason,
    ServerInfo,
    gauges,
    snapshot,
)
from llama_proc.proxy.measure import Measured
from llama_proc.proxy.servers import PoolBusyError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from llama_proc.proxy.lease import Ticket
    from llama_proc.proxy.metrics import PoolMetrics
    from llama_proc.proxy.servers import ServerFactory

__all__ = ["PoolLifecycle"]

logger = logging.getLogger("llama_proc.proxy.pool")

RESTART_BACKOFF_BASE: Final = 1.0
"""Delay before the second restart of a server that keeps failing; it doubles each time."""
RESTART_BACKOFF_MAX: Final = 60.0
STABLE_AFTER: Final = 60.0
"""A server up this long before it fails is no crash loop: its backoff starts over."""
MEASURE_MIN_INTERVAL: Final = 1.0
"""Seconds between two measurements of one server on release (each release asks for one)."""
REMEASURE_INTERVAL: Final = 10.0
"""Seconds after which the reaper measures a ready server again (shared pages move)."""
STOP_TIMEOUT: Final = 30.0
"""Seconds to wait for one server's stop() before giving up on it (the pool logs it)."""
MAX_FORGOTTEN_KEYS: Final = 256
"""Stopped entries kept for ``/servers`` history; older ones are dropped."""


class PoolLifecycle:
    """State shared by the pool's parts, and the tasks that start, stop and heal servers."""

    _factory: ServerFactory
    _entries: dict[str, Entry]
    _tickets: list[Ticket]
    _clock: Callable[[], float]
    _closing: bool
    idle_ttl: float
    concurrency: int | None
    probe_interval: float
    probe_timeout: float
    wedge_after: int
    metrics: PoolMetrics
    stats: dict[str, int]
    memory_budget: int | None
    device_budgets: dict[str, int]
    _measures: set[asyncio.Task[None]]

    def _schedule(self) -> None:
        """Decide starts, room and grants after a change (the pool's scheduling)."""
        raise NotImplementedError

    # -- health ----------------------------------------------------------------------------

    def _check_alive(self, entry: Entry) -> bool:
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

    def _heal(self, entry: Entry, reason: HealReason, detail: str | None = None) -> None:
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

        async def probe(entry: Entry) -> None:
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

    def _begin_start(self, entry: Entry) -> None:
        entry.state = "starting"
        entry.draining = False
        entry.start_task = asyncio.create_task(
            self._run_start(entry), name=f"llama-proc-start-{entry.key}"
        )

    async def _run_start(self, entry: Entry) -> None:
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
            entry.load_seconds = now - began
            self._spawn_measure(entry)
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

    def _begin_stop(self, entry: Entry, *, reason: EvictReason | None) -> None:
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

    async def _run_stop(self, entry: Entry) -> None:
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
            entry.measured, entry.memory = None, entry.estimate
            entry.gpu_claim = entry.gpu_estimate
            entry.stop_task = None
            self._forget_old()
            self._schedule()

    async def _stop_entry(self, entry: Entry, *, reason: EvictReason | None) -> None:
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

    def _ttl(self, entry: Entry) -> float:
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
            ttl = 0.0 if entry.spec.keep_loaded else self._ttl(entry)
            if ttl > 0 and entry.active == 0 and now - entry.last_used >= ttl:
                self._begin_stop(entry, reason="idle")
            elif now - entry.measured_at >= REMEASURE_INTERVAL:
                self._spawn_measure(entry)

    # -- measurement -----------------------------------------------------------------------

    def _spawn_measure(self, entry: Entry) -> None:
        """Measure a ready server in the background (one at a time per server)."""
        measure = getattr(entry.handle, "measure", None)
        if entry.state != "ready" or not callable(measure):
            return
        if entry.measuring:
            entry.measure_again = True
            return
        entry.measuring = True
        entry.measured_at = self._clock()
        task = asyncio.create_task(self._measure(entry), name=f"llama-proc-measure-{entry.key}")
        self._measures.add(task)
        task.add_done_callback(self._measures.discard)

    async def _measure(self, entry: Entry) -> None:
        handle = entry.handle
        served = entry.requests - entry.active
        try:
            measured = await asyncio.to_thread(handle.measure)  # type: ignore[union-attr]
        except Exception as err:  # noqa: BLE001 - a measurement is advisory; the estimate stays
            logger.debug("measuring llama-server %s failed: %s", entry.key, err)
            measured = None
        finally:
            entry.measuring = False
        current = entry.handle is handle and entry.state in ("ready", "stopping")
        if isinstance(measured, Measured) and current:
            entry.measured, entry.measured_served = measured, served
            if measured.devices:
                entry.gpu_claim = dict(measured.devices)
            # Before its first request a server has not touched all its pages: the larger.
            entry.memory = measured.host if served else max(measured.host, entry.estimate)
            entry.measured_at = self._clock()
            self._schedule()
        if entry.measure_again:
            entry.measure_again = False
            self._spawn_measure(entry)

    async def measure_all(self) -> None:
        """Measure every ready server now and wait for the figures (``/servers``, tests)."""
        for entry in self._entries.values():
            if entry.state == "ready":
                entry.measured_at = 0.0
                self._spawn_measure(entry)
        while self._measures:  # one may start another (asked for while it ran)
            await asyncio.wait(list(self._measures))

    # -- introspection ---------------------------------------------------------------------

    def snapshot(self) -> list[ServerInfo]:
        """Every known entry, most recently used first."""
        return snapshot(iter(self._entries.values()), self._clock())

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
        return gauges(self.snapshot(), self.memory_budget, self.device_budgets)

    def _forget_old(self) -> None:
        stopped = [e for e in self._entries.values() if e.state == "stopped" and not e.queued]
        for entry in stopped[: max(0, len(stopped) - MAX_FORGOTTEN_KEYS)]:
            del self._entries[entry.key]


def _backoff(streak: int) -> float:
    """No wait for the first restart, then 1 s, 2 s, 4 s ... up to the cap."""
    if streak <= 1:
        return 0.0
    return float(min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_BASE * 2.0 ** (streak - 2)))


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
