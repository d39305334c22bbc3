"""Who may do what: key roles and the routes that need no key or an admin key."""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "Role",
]

_PUBLIC_PATHS: Final = frozenset({"/health"})
_ADMIN_PREFIX: Final = "/servers"
"""Routes only admin keys may use: the pool's servers (with every tenant's flags) and stopping."""

Role = Literal["admin", "inference"]
"""What a key may do: ``inference`` keys use the API, ``admin`` keys also manage servers."""
