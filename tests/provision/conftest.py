"""Fixtures shared by the provisioning tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from http_server import FileServer

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def server() -> Iterator[FileServer]:
    """A local HTTP server for release listings, archives and index files."""
    with FileServer() as srv:
        yield srv
