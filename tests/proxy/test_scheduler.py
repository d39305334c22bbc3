"""The victim policies and room rules as plain functions over pool entries (no servers)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llama_proc.errors import ConfigError
from llama_proc.proxy.entries import Entry
from llama_proc.proxy.lease import Ticket
from llama_proc.proxy.models_config import ModelSpec, load_models_config
from llama_proc.proxy.scheduler import (
    Room,
    RoomRules,
    by_expected_cost,
    by_fifo,
    by_lru,
    expected_cost,
    note_request,
    plan_room,
)

NOW = 10_000.0


def _ready(name: str, *, load: float, ready: float, used: float, pin: bool = False) -> Entry:
    spec = ModelSpec(id=name, path=Path(f"/m/{name}.gguf"), keep_loaded=pin)
    e = Entry(key=name, spec=spec, flags=())
    e.state, e.load_seconds, e.ready_since, e.last_used = "ready", load, ready, used
    return e


def test_expected_cost_keeps_the_hot_slow_loader_over_the_cold_fast_one() -> None:
    # hot: 20 s to load, asked 30 times in the last 5 minutes, last used a minute ago.
    hot = _ready("hot", load=20.0, ready=NOW - 600, used=NOW - 60)
    for i in range(30):
        note_request(hot, NOW - 300 + i * 8)
    # cold: 1 s to load, asked once ten minutes ago -- but used more recently than hot.
    cold = _ready("cold", load=1.0, ready=NOW - 700, used=NOW - 10)
    note_request(cold, NOW - 600)
    assert expected_cost(hot, NOW) > 10 * expected_cost(cold, NOW)
    assert by_expected_cost([hot, cold], NOW)[0] is cold
    assert by_lru([hot, cold], NOW)[0] is hot  # what a count-based router would evict
    assert by_fifo([hot, cold], NOW)[0] is cold


def _room(entries: list[Entry], rules: RoomRules, waited: float = 0.0) -> tuple[Room, Entry]:
    needy = Entry(key="new", spec=ModelSpec(id="new", path=Path("/m/new.gguf")), flags=())
    loop = asyncio.new_event_loop()
    try:
        ticket = Ticket(needy, 1, NOW - waited, loop.create_future())
        return plan_room([*entries, needy], [ticket], needy, ticket, rules, NOW), needy
    finally:
        loop.close()


def test_busy_queued_pinned_and_young_servers_are_not_victims() -> None:
    rules = RoomRules(max_servers=1, memory_budget=None, fair_share=16, min_residency=30,
                      residency_wait=10)  # fmt: skip
    busy = _ready("busy", load=1, ready=NOW - 100, used=NOW - 100)
    busy.active = 1
    room, _ = _room([busy], rules)
    assert room.victims == ()
    queued = _ready("queued", load=1, ready=NOW - 100, used=NOW - 100)
    queued.queued = 1
    assert _room([queued], rules)[0].victims == ()
    pinned = _ready("pinned", load=1, ready=NOW - 100, used=NOW - 100, pin=True)
    assert _room([pinned], rules, waited=1000)[0].victims == ()
    young = _ready("young", load=1, ready=NOW - 5, used=NOW - 5)
    room, _ = _room([young], rules, waited=2)
    assert room.victims == ()
    # Plan again when the waiter reaches its bound (8 s on), before the residency ends (25 s).
    assert room.wake_at == NOW + 8
    room, _ = _room([young], rules, waited=10)
    assert room.victims == (young,)
    old = _ready("old", load=1, ready=NOW - 100, used=NOW - 100)
    assert _room([old], rules)[0].victims == (old,)


def test_config_reads_keep_loaded_and_preload(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cfg = tmp_path / "models.toml"
    cfg.write_text('[models.a]\npath = "m.gguf"\nkeep_loaded = true\npreload = true\n'
                   '[models.b]\npath = "m.gguf"\n', encoding="utf-8")  # fmt: skip
    models = load_models_config(cfg).models
    assert (models["a"].keep_loaded, models["a"].preload) == (True, True)
    assert (models["b"].keep_loaded, models["b"].preload) == (False, False)
    cfg.write_text('[models.a]\npath = "m.gguf"\nkeep_loaded = "yes"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="keep_loaded must be true or false"):
        load_models_config(cfg)
