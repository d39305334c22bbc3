"""The per-user cache: layout, locks, install records, checks, listing, pruning."""

from __future__ import annotations
