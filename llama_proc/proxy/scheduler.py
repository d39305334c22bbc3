"""The pool's scheduling decisions as plain functions over its entries and tickets.

Nothing here starts, stops or awaits anything: the pool asks which entries wait for a start,
how much of its room is taken, and which servers should leave to make room (:func:`plan_room`),
then acts.

Which server leaves is a :data:`VictimPolicy`: an order over the servers that may leave,
cheapest first. The pool's own, :func:`by_expected_cost`, orders by what evicting a server is
expected to cost: its measured load time times the chance it is asked for again soon, read
from its exponentially decayed request rate. :func:`by_lru` and :func:`by_fifo` are the plain
policies other routers use, kept for ``bench/schedule_trace.py`` to compare on one trace.

Whatever the policy, a server never leaves while it has requests running, nor while requests
wait for it (unless the waiter's fairness bound is spent), nor when its model is pinned
(``keep_loaded``), nor within its minimum residency of loading unless the waiter has already
waited ``residency_wait`` seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from llama_proc.proxy.entries import Entry, EvictReason
    from llama_proc.proxy.lease import Ticket
    from llama_proc.proxy.models_config import ModelSpec

__all__ = [
    "POLICIES",
    "RATE_HALF_LIFE",
    "REASK_HORIZON",
    "DeviceEstimate",
    "Room",
    "RoomRules",
    "VictimPolicy",
    "busy_message",
    "by_expected_cost",
    "by_fifo",
    "by_lru",
    "decayed_rate",
    "expected_cost",
    "fits",
    "note_request",
    "plan_room",
    "too_large_message",
    "usage",
    "waiting_entries",
]

RATE_HALF_LIFE: Final = 120.0
"""Seconds after which a past request counts half in a server's request rate."""
REASK_HORIZON: Final = 60.0
"""The "soon" in "asked for again soon": seconds ahead the eviction cost looks."""
MIN_LOAD_SECONDS: Final = 0.1
"""Load time assumed for a server whose load was not timed."""
_DECAY: Final = math.log(2) / RATE_HALF_LIFE

DeviceEstimate = Callable[["ModelSpec", tuple[str, ...]], Mapping[str, int]]
"""Bytes a server for (model, flags) is expected to hold on each device, ``host`` included."""
VictimPolicy = Callable[[Sequence["Entry"], float], list["Entry"]]
"""Orders the servers that may leave, cheapest to lose first (given the clock's now)."""


def note_request(entry: Entry, now: float) -> None:
    """Count one request for ``entry`` in its exponentially decayed rate."""
    entry.rate = decayed_rate(entry, now) + _DECAY
    entry.rate_at = now


def decayed_rate(entry: Entry, now: float) -> float:
    """Requests per second for ``entry``, recent ones weighing most."""
    return entry.rate * math.exp(-_DECAY * max(0.0, now - entry.rate_at))


def expected_cost(entry: Entry, now: float) -> float:
    """Seconds of loading that evicting ``entry`` is expected to cost within the horizon."""
    again = 1.0 - math.exp(-decayed_rate(entry, now) * REASK_HORIZON)
    return max(entry.load_seconds, MIN_LOAD_SECONDS) * again


def by_expected_cost(candidates: Sequence[Entry], now: float) -> list[Entry]:
    """Cheapest expected reload first; least recently used among equals."""
    return sorted(candidates, key=lambda e: (expected_cost(e, now), e.last_used))


def by_lru(candidates: Sequence[Entry], now: float) -> list[Entry]:
    """Least recently used first (what count-based routers do)."""
    return sorted(candidates, key=lambda e: e.last_used)


def by_fifo(candidates: Sequence[Entry], now: float) -> list[Entry]:
    """Loaded longest ago first (what swap-on-demand routers do)."""
    return sorted(candidates, key=lambda e: e.ready_since or 0.0)


POLICIES: Final[dict[str, VictimPolicy]] = {
    "cost": by_expected_cost,
    "lru": by_lru,
    "fifo": by_fifo,
}


@dataclass(frozen=True)
class RoomRules:
    """What the pool allows when making room."""

    max_servers: int
    memory_budget: int | None
    fair_share: int
    min_residency: float = 0.0
    residency_wait: float = 0.0
    policy: VictimPolicy = by_expected_cost
    device_budgets: Mapping[str, int] = field(default_factory=dict)
    """Bytes each GPU may give the servers (host RAM is ``memory_budget``)."""


@dataclass(frozen=True)
class Room:
    """The outcome of :func:`plan_room`."""

    victims: tuple[Entry, ...] = ()
    reason: EvictReason = "lru"
    wake_at: float | None = None
    """When a server protected by its residency stops being so (plan again then)."""


def waiting_entries(tickets: Iterable[Ticket]) -> Iterator[tuple[Entry, Ticket]]:
    """Entries that need a start, each with its oldest ticket, oldest first."""
    seen: set[str] = set()
    for ticket in tickets:
        entry = ticket.entry
        if entry.state == "stopped" and entry.key not in seen and not ticket.future.done():
            seen.add(entry.key)
            yield entry, ticket


def usage(entries: Iterable[Entry]) -> tuple[int, int, int, int]:
    """(slots used, memory reserved, slots and memory about to be freed by stops)."""
    used = reserved = leaving = leaving_memory = 0
    for e in entries:
        if e.state in ("starting", "ready", "stopping"):
            used += 1
            reserved += e.memory
        if e.state == "stopping":
            leaving += 1
            leaving_memory += e.memory
    return used, reserved, leaving, leaving_memory


def plan_room(
    entries: Sequence[Entry],
    tickets: Sequence[Ticket],
    needy: Entry,
    ticket: Ticket,
    rules: RoomRules,
    now: float,
) -> Room:
    """Which servers leave so ``needy`` (waiting as ``ticket``) fits; none when too few can."""
    used, reserved, leaving, leaving_memory = usage(entries)
    slots_short = used - leaving + 1 - rules.max_servers
    memory_short = (
        0
        if rules.memory_budget is None
        else reserved - leaving_memory + needy.memory - rules.memory_budget
    )
    gpu_short = _gpu_shortfall(entries, needy, rules)
    for e in entries:
        if e.draining:
            slots_short -= 1
            memory_short -= e.memory
            _free(gpu_short, e)
    if slots_short <= 0 and memory_short <= 0 and not _short(gpu_short):
        return Room()
    exhausted = ticket.passed >= rules.fair_share
    patient = now - ticket.arrived < rules.residency_wait
    candidates = [
        e
        for e in entries
        if e.state == "ready"
        and not e.draining
        and e is not needy
        and e.active == 0
        and not e.spec.keep_loaded
        and (exhausted or e.queued == 0)
        and not any(t.entry is e and t.seq < ticket.seq for t in tickets)
    ]
    if needy.flags and any(
        e.spec.id == needy.spec.id and e is not needy and e.state in ("starting", "ready")
        for e in entries
    ):
        # Another flag set of a model that is already served makes room among that
        # model's own servers only: cycling an allowed flag value churns the tenant's own
        # model, never other models' servers.
        candidates = [e for e in candidates if e.spec.id == needy.spec.id]
    young = [e for e in candidates if _resident_until(e, rules) > now]
    if patient and young:
        candidates = [e for e in candidates if e not in young]
    victims: list[Entry] = []
    for e in rules.policy(candidates, now):
        if slots_short <= 0 and memory_short <= 0 and not _short(gpu_short):
            break
        helps = slots_short > 0 or (memory_short > 0 and e.memory > 0)
        if not helps and not any(gpu_short.get(d, 0) > 0 for d in e.gpu_claim):
            continue  # a server on other devices frees nothing that is short
        victims.append(e)
        slots_short -= 1
        memory_short -= e.memory
        _free(gpu_short, e)
    if slots_short > 0 or memory_short > 0 or _short(gpu_short):
        # Not enough can leave yet; stopping some now would only waste their warm state.
        wake = [_resident_until(e, rules) for e in young] if patient else []
        if wake:
            wake.append(ticket.arrived + rules.residency_wait)
        return Room(wake_at=min(wake) if wake else None)
    reason: EvictReason = "lru" if used - leaving >= rules.max_servers else "memory"
    return Room(tuple(victims), reason)


def _resident_until(entry: Entry, rules: RoomRules) -> float:
    return (entry.ready_since or 0.0) + rules.min_residency


def busy_message(
    entries: Iterable[Entry], entry: Entry, queue_timeout: float, max_servers: int
) -> str:
    """Why a request for ``entry`` found no room in time (the 503's words)."""
    busy = ", ".join(
        f"{e.spec.id} ({e.active} running)"
        for e in entries
        if e.state in ("ready", "starting", "stopping")
    )
    return (
        f"no server slot for {entry.spec.id!r} within {queue_timeout:g}s: "
        f"all {max_servers} slot(s) busy ({busy}); raise --max-servers or retry"
    )


def fits(entries: Iterable[Entry], entry: Entry, rules: RoomRules) -> bool:
    """Whether ``entry`` can start now: a slot free, and its claim within every budget."""
    listed = list(entries)
    used, reserved, _, _ = usage(listed)
    if used >= rules.max_servers:
        return False
    if rules.memory_budget is not None and reserved + entry.memory > rules.memory_budget:
        return False
    return not _short(_gpu_shortfall(listed, entry, rules, leaving_counts=False))


def too_large_message(entry: Entry, rules: RoomRules) -> str | None:
    """Why ``entry`` cannot fit even alone, with the figures; None when it can."""
    over = [
        f"{name}: needs {_size(size)} of {_size(rules.device_budgets[name])}"
        for name, size in entry.gpu_claim.items()
        if name in rules.device_budgets and size > rules.device_budgets[name]
    ]
    if rules.memory_budget is not None and entry.memory > rules.memory_budget:
        over.insert(0, f"host: needs {_size(entry.memory)} of {_size(rules.memory_budget)}")
    if not over:
        return None
    return (
        f"model {entry.spec.id!r} does not fit the memory budget even alone "
        f"({'; '.join(over)}); raise --memory-budget, offload fewer layers or use a smaller "
        "quantization"
    )


def _size(size: int) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    if size >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    return f"{size} bytes"


def _gpu_shortfall(
    entries: Iterable[Entry], needy: Entry, rules: RoomRules, *, leaving_counts: bool = True
) -> dict[str, int]:
    """Bytes each GPU lacks for ``needy`` (negative: room to spare)."""
    short = {d: needy.gpu_claim.get(d, 0) - b for d, b in rules.device_budgets.items()}
    for e in entries:
        if e.state in ("starting", "ready") or (e.state == "stopping" and not leaving_counts):
            for d, size in e.gpu_claim.items():
                if d in short:
                    short[d] += size
    return short


def _free(short: dict[str, int], entry: Entry) -> None:
    for d, size in entry.gpu_claim.items():
        if d in short:
            short[d] -= size


def _short(short: Mapping[str, int]) -> bool:
    return any(v > 0 for v in short.values())
