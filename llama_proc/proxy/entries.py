"""The pool's bookkeeping: one entry per server key, one ticket per waiting request.

:class:`Entry` is what the pool knows of one server (state, handle, counters, memory);
:class:`~llama_proc.proxy.lease.Ticket` is one request waiting for room; :class:`ServerInfo` is the snapshot of an
entry that ``GET /servers`` and the gauges show.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from llama_proc.proxy.measure import SlotUse

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Iterator, Mapping

    from llama_proc.proxy.measure import Measured
    from llama_proc.proxy.models_config import ModelSpec
    from llama_proc.proxy.servers import ServerHandle

__all__ = [
    "Entry",
    "EvictReason",
    "HealReason",
    "Healed",
    "ServerInfo",
    "State",
    "gauges",
    "server_key",
    "snapshot",
]


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
    """Bytes the budget counts for it: measured once it runs, else the estimate."""
    pinned: bool = False
    """Its model is ``keep_loaded``: never evicted nor unloaded for idleness."""
    estimate: int = 0
    """Estimated bytes (0 = unknown or no budget)."""
    measured: int = 0
    """Host bytes it held when last measured (0 = not measured)."""
    devices: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Bytes it held on each GPU when last measured."""
    slots_total: int = 0
    """Its slots (0 = unknown)."""
    slots_used: int = 0
    """Slots serving a request now (the pool's own count of running requests)."""
    kv_total: int = 0
    """KV cache size in tokens over all slots, from ``/slots`` (0 = unknown)."""
    kv_used: int | None = None
    """Tokens in its KV cache, where ``/slots`` reports them."""
    load_seconds: float = 0.0
    """How long its last load took."""
    claims: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Bytes the budgets count for it per device (``host`` and each GPU)."""

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
            "pinned": self.pinned,
            "requests": self.requests,
            "starts": self.starts,
            "crashes": self.crashes,
            "restarts": self.restarts,
            "memory_estimate": self.estimate or None,
            "memory_measured": self.measured or None,
            "memory_devices": dict(self.devices),
            "memory_claims": dict(self.claims),
            "slots": {"used": self.slots_used, "total": self.slots_total},
            "kv_cache_tokens": {"used": self.kv_used, "total": self.kv_total},
            "load_seconds": round(self.load_seconds, 3),
            "idle_seconds": None if self.last_used is None else round(self.last_used, 3),
            "last_error": self.last_error,
        }


@dataclass(eq=False)
class Entry:
    """What the pool knows of one server key: state, handle, counters, memory."""

    key: str
    spec: ModelSpec
    flags: tuple[str, ...]
    state: Literal["stopped", "starting", "ready", "stopping"] = "stopped"
    handle: ServerHandle | None = None
    active: int = 0
    queued: int = 0
    concurrency: int | None = None
    memory: int = 0
    """Bytes the budget counts: ``measured.host`` once measured, else ``estimate``."""
    estimate: int = 0
    gpu_claim: Mapping[str, int] = field(default_factory=dict)
    """Bytes it counts on each GPU: measured once it runs (NVML), else ``gpu_estimate``."""
    gpu_estimate: Mapping[str, int] = field(default_factory=dict)
    measured: Measured | None = None
    measured_at: float = 0.0
    measuring: bool = False
    measure_again: bool = False
    measured_served: int = 0
    """Requests it had finished when last measured: before the first, pages of the model
    are not all touched yet and the figure undercounts."""
    load_seconds: float = 0.0
    """How long its last start took."""
    rate: float = 0.0
    """Requests per second, exponentially decayed (see :mod:`llama_proc.proxy.scheduler`)."""
    rate_at: float = 0.0
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
        """Whether the server takes one more request now."""
        return self.concurrency is None or self.active < self.concurrency


def snapshot(entries: Iterator[Entry], now: float) -> list[ServerInfo]:
    """Every entry as a :class:`ServerInfo`, most recently used first."""
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
            estimate=e.estimate,
            pinned=e.spec.keep_loaded,
            measured=e.measured.host if e.measured is not None else 0,
            devices=e.measured.devices if e.measured is not None else MappingProxyType({}),
            **_slot_fields(e),
            load_seconds=e.load_seconds,
            claims=MappingProxyType({"host": e.memory, **e.gpu_claim}),
        )
        for e in entries
    ]
    infos.sort(key=lambda i: i.last_used if i.last_used is not None else float("inf"))
    return infos


def _slot_fields(entry: Entry) -> dict[str, Any]:
    use = getattr(entry.handle, "slot_use", None) if entry.state == "ready" else None
    use = use if isinstance(use, SlotUse) else None
    total = use.total if use is not None else (entry.concurrency or 0)
    return {
        "slots_total": total,
        # The pool's count of running requests is fresher than the last probe's /slots.
        "slots_used": min(entry.active, total) if total else entry.active,
        "kv_total": use.kv_total if use is not None else 0,
        "kv_used": use.kv_used if use is not None else None,
    }


def gauges(
    infos: list[ServerInfo],
    memory_budget: int | None,
    device_budgets: Mapping[str, int] | None = None,
) -> Iterator[tuple[str, Mapping[str, str], float]]:
    """Scrape-time gauge samples: (family, labels, value); see ``metrics.ProxyMetrics``."""
    for state in ("queued", "starting", "ready", "stopping"):
        yield "servers", {"state": state}, sum(1 for s in infos if s.state == state)
    queued: dict[str, int] = {}
    running: dict[str, int] = {}
    reserved = slots_used = slots_total = kv_used = kv_total = 0
    kv_known = False
    for info in infos:
        if info.queued:
            queued[info.model] = queued.get(info.model, 0) + info.queued
        if info.state in ("starting", "ready", "stopping"):
            reserved += info.memory
        if info.state != "ready":
            continue
        running[info.model] = running.get(info.model, 0) + info.active
        yield from _server_gauges(info)
        slots_used += info.slots_used
        slots_total += info.slots_total
        if info.kv_used is not None:
            kv_known = True
            kv_used += info.kv_used
            kv_total += info.kv_total
    for model, count in sorted(queued.items()):
        yield "queued", {"model": model}, count
    for model, count in sorted(running.items()):
        yield "model_running", {"model": model}, count
    yield "memory_reserved", {}, reserved
    yield "memory_budget", {}, memory_budget or 0
    for device, budget in sorted((device_budgets or {}).items()):
        yield "device_budget", {"device": device}, budget
        held = sum(i.claims.get(device, 0) for i in infos if i.state != "stopped")
        yield "device_reserved", {"device": device}, held
    # Pod-level totals for an endpoint picker (one serve replica = one endpoint).
    yield "total_queued", {}, sum(queued.values())
    yield "total_running", {}, sum(running.values())
    if kv_known and kv_total:
        yield "kv_cache_usage", {}, kv_used / kv_total
    else:
        yield "kv_cache_usage", {}, slots_used / slots_total if slots_total else 0.0


def _server_gauges(info: ServerInfo) -> Iterator[tuple[str, Mapping[str, str], float]]:
    labels = {"server": info.key, "model": info.model}
    yield "server_active", labels, info.active
    yield "server_running", labels, info.active
    yield "server_queued", labels, info.queued
    yield "server_slots_used", labels, info.slots_used
    yield "server_slots_total", labels, info.slots_total
    yield "server_kv_total", labels, info.kv_total
    if info.kv_used is not None:
        yield "server_kv_used", labels, info.kv_used
    yield "server_load_seconds", labels, info.load_seconds
    yield "server_memory_estimate", labels, info.estimate
    if info.measured:
        yield "server_memory", {**labels, "device": "host"}, info.measured
    for device, size in sorted(info.devices.items()):
        yield "server_memory", {**labels, "device": device}, size
