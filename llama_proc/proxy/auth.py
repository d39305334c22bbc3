"""Who may do what: key roles, the routes that need no key or an admin key, and key matching."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "ADMIN_PATHS",
    "ADMIN_PREFIX",
    "PUBLIC_PATHS",
    "KeyRing",
    "Role",
    "needs_admin",
]

PUBLIC_PATHS: Final = frozenset({"/health"})
ADMIN_PREFIX: Final = "/servers"
"""Routes only admin keys may use: the pool's servers (with every tenant's flags) and stopping."""
ADMIN_PATHS: Final = frozenset({"/models/load", "/models/unload"})
"""More admin-only routes: the router API's load and unload (listing and events are for all)."""


def needs_admin(path: str) -> bool:
    """Whether only admin keys may use ``path``."""
    return path in ADMIN_PATHS or path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


Role = Literal["admin", "inference"]
"""What a key may do: ``inference`` keys use the API, ``admin`` keys also manage servers."""


class KeyRing:
    """The configured API keys and their roles."""

    def __init__(self, api_keys: tuple[str, ...], admin_keys: tuple[str, ...]) -> None:
        self.keys: tuple[tuple[bytes, Role], ...] = tuple(
            [(k.encode(), "inference") for k in api_keys]
            + [(k.encode(), "admin") for k in admin_keys]
        )

    def match(self, request: web.Request) -> tuple[Role | None, int | None]:
        """The role of the key the request offers (None = no valid key) and its index.

        Without any key configured every client is an admin. A header that is not UTF-8
        offers no key (it cannot match one), rather than failing the request.
        """
        if not self.keys:
            return "admin", None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        offered = token.strip() if scheme.lower() == "bearer" else ""
        offered = offered or request.headers.get("X-Api-Key", "")
        try:
            given = offered.encode()
        except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
            return None, None
        found: Role | None = None
        index: int | None = None
        # Compare against every key so timing tells nothing about which (if any) matched.
        for at, (key, role) in enumerate(self.keys):
            if hmac.compare_digest(given, key) and found != "admin":
                found, index = role, at
        return found, index
