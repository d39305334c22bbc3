"""Getting llama.cpp over the network: downloads, releases, archives, sources."""

from __future__ import annotations
