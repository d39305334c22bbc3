"""The pool's scheduling decisions as plain functions over its entries and tickets.

Nothing here starts, stops or awaits anything: the pool asks which entries wait for a start,
how much of its room is taken, and which servers should leave to make room, then acts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from llama_proc.proxy.entries import Entry, Ticket

__all__ = ["pick_victims", "usage", "waiting_entries"]


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


def pick_victims(
    entries: Sequence[Entry],
    tickets: Sequence[Ticket],
    needy: Entry,
    ticket: Ticket,
    *,
    exhausted: bool,
    slots_short: int,
    memory_short: int,
) -> list[Entry] | None:
    """Servers to drain so ``needy`` (waiting as ``ticket``) fits; None when too few can leave.

    Candidates are ready servers not already draining whose model has nobody waiting (unless
    the waiter's fairness bound is ``exhausted``) and that no older request waits for.
    """
    candidates = [
        e
        for e in entries
        if e.state == "ready"
        and not e.draining
        and e is not needy
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
    # Idle servers first, then the least recently used.
    candidates.sort(key=lambda e: (e.active > 0, e.last_used))
    victims: list[Entry] = []
    for e in candidates:
        if slots_short <= 0 and memory_short <= 0:
            break
        victims.append(e)
        slots_short -= 1
        memory_short -= e.memory
    if slots_short > 0 or memory_short > 0:
        # Not enough can leave yet; stopping some now would only waste their warm state.
        return None
    return victims
