"""CLI command modules. Each exposes ``register(subparsers)`` and imports only argparse at load."""

from __future__ import annotations

from typing import Final

#: Command modules in ``--help`` order.
COMMAND_MODULES: Final = ("provision", "build", "serve", "rpc")
