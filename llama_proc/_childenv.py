"""Which inherited variables a llama-server child must not see (shared by every layer).

A leaf module: provisioning's ``--version`` smoke check and the runtime's spawns both build the
child's environment here, so the policy cannot drift between them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DROPPED_ENV", "child_environment"]

DROPPED_ENV: Final = frozenset(
    {"LLAMA_API_KEY", "AIP_MODE", "AIP_HTTP_PORT", "AIP_HEALTH_ROUTE", "AIP_PREDICT_ROUTE"}
)
"""Inherited variables removed from the child's environment (plus every ``LLAMA_ARG_*``)."""


def child_environment(
    base: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for a llama-server child.

    Args:
        base: the environment to start from (default: ``os.environ``).
        extra: variables to add after cleaning (e.g. ``LLAMA_API_KEY``).

    Returns:
        ``base`` without ``LLAMA_ARG_*`` and :data:`DROPPED_ENV`, plus ``extra``. PATH, HOME,
        locale, ``LD_LIBRARY_PATH``, ``CUDA_VISIBLE_DEVICES`` and the rest are kept.
    """
    source = os.environ if base is None else base
    env = {
        k: v for k, v in source.items() if not k.startswith("LLAMA_ARG_") and k not in DROPPED_ENV
    }
    env.update(extra or {})
    return env
