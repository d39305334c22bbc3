"""Runtime test fixtures: the fake server for fault injection, and a leftover-process guard."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

FAKE_SERVER = Path(__file__).resolve().parents[1] / "helpers" / "fake_llama_server.py"
_LEFTOVER_GRACE = 5.0


def _children() -> dict[int, str]:
    """Live (non-zombie) children of this test process: pid -> command line."""
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


def _ours(cmdline: str) -> bool:
    return "llama-server" in cmdline or "fake_llama_server" in cmdline or "killpg" in cmdline


@pytest.fixture(autouse=True)
def _no_leftover_servers() -> Iterator[None]:
    """Every runtime test must leave no llama-server (or watchdog) child behind."""
    before = set(_children())
    yield
    if not sys.platform.startswith("linux"):
        return
    deadline = time.monotonic() + _LEFTOVER_GRACE
    left: dict[int, str] = {}
    while time.monotonic() < deadline:
        left = {p: c for p, c in _children().items() if p not in before and _ours(c)}
        if not left:
            return
        time.sleep(0.05)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    pytest.fail(f"processes left running: {left}")


@pytest.fixture
def fake_argv() -> Callable[..., list[str]]:
    """Build the argv of the fake llama-server: fake_argv(port, mode="ready", delay=0.2, ...)."""

    def build(port: int, mode: str = "ready", *extra: str, delay: float = 0.2) -> list[str]:
        return [sys.executable, str(FAKE_SERVER), "--port", str(port), "--mode", mode,
                "--delay", str(delay), *extra]  # fmt: skip

    return build
