"""Fixtures shared by the provisioning tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from fake_hub import FakeHub
from http_server import FileServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def server() -> Iterator[FileServer]:
    """A local HTTP server for release listings, archives and index files."""
    with FileServer() as srv:
        yield srv


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A loopback fake Hugging Face Hub, with nothing of the user's HF setup in the way."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    # Nothing of the user's Hugging Face home (saved token, xet cache) leaks into a test.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with FakeHub() as server:
        yield server


@pytest.fixture
def hf_cache(tmp_path: Path) -> Path:
    """Where a test's model downloads land."""
    return tmp_path / "hf-cache"
