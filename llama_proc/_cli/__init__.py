"""CLI command modules. Each exposes ``register(subparsers)`` and imports little at load.

:mod:`llama_proc._cli.common` holds what they share: strict parsers, the flags that fill
``Settings`` (one definition each) and the refusal of secret-carrying flags.
"""

from __future__ import annotations

from typing import Final

#: Command modules in ``--help`` order.
COMMAND_MODULES: Final = ("provision", "models", "build", "serve", "rpc", "maintain")
