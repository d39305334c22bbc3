"""The environment of a llama-server child: it reads no configuration the caller did not give.

A leaf module: provisioning's ``--version`` smoke check and the runtime's spawns both build the
child's environment here, so the policy cannot drift between them.

llama-server takes settings from three places besides its command line (b11434,
``common/arg.cpp``, ``tools/server``):

* ``LLAMA_ARG_*`` variables (every flag has one), ``LLAMA_API_KEY``, and knobs read with
  ``getenv`` (``LLAMA_TRACE``, ``LLAMA_SERVER_SLOTS_DEBUG``, ``LLAMA_SERVER_ROUTER_PORT``,
  ``LLAMA_SERVER_CHILD_MODE``, ``LLAMA_MEDIA_MARKER``, ``MTMD_DEBUG_*``, the ``AIP_*``
  Vertex mode...): all of them are removed; ``LLAMA_CACHE`` (where ``-hf`` downloads go)
  stays.
* ``${XDG_CONFIG_HOME:-$HOME/.config}/llama.cpp/config.ini``, applied before the flags: the
  child gets ``XDG_CONFIG_HOME`` pointed below ``/dev/null``, where no file can exist.
* ``/etc/llama.cpp/config.ini``: llama-server always reads it and nothing switches it off, so a
  child is not started while it exists (:class:`~llama_proc.errors.ConfigError` says so).

On Windows the two files live under ``%APPDATA%`` and ``%PROGRAMDATA%``, which other libraries
need; they are not touched there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "DROPPED_ENV",
    "DROPPED_PREFIXES",
    "KEPT_ENV",
    "SYSTEM_CONFIG",
    "USER_CONFIG_HOME",
    "child_environment",
]

DROPPED_ENV: Final = frozenset(
    {"LLAMA_API_KEY", "AIP_MODE", "AIP_HTTP_PORT", "AIP_HEALTH_ROUTE", "AIP_PREDICT_ROUTE"}
)
"""Inherited variables removed from the child's environment (besides :data:`DROPPED_PREFIXES`)."""
DROPPED_PREFIXES: Final = ("LLAMA_", "LLAMACPP_", "MTMD_", "AIP_", "LLGUIDANCE_")
"""Every inherited variable starting with one of these is removed (but :data:`KEPT_ENV`)."""
KEPT_ENV: Final = frozenset({"LLAMA_CACHE"})
"""llama.cpp variables that name a place, not a behaviour; inherited as they are."""
USER_CONFIG_HOME: Final = os.devnull
"""The child's ``XDG_CONFIG_HOME``: ``/dev/null/llama.cpp/config.ini`` cannot exist."""
SYSTEM_CONFIG: Final = Path("/etc/llama.cpp/config.ini")
"""The system-wide config file every llama-server reads (POSIX)."""


def child_environment(
    base: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for a llama-server child.

    Args:
        base: the environment to start from (default: ``os.environ``).
        extra: variables to add after cleaning (e.g. ``LLAMA_API_KEY``).

    Returns:
        ``base`` without llama.cpp's own variables (:data:`DROPPED_ENV`,
        :data:`DROPPED_PREFIXES`), with ``XDG_CONFIG_HOME`` set to :data:`USER_CONFIG_HOME`
        (POSIX), plus ``extra``. PATH, HOME, locale, ``LD_LIBRARY_PATH``,
        ``CUDA_VISIBLE_DEVICES``, ``GGML_*`` and the rest are kept.

    Raises:
        ConfigError: :data:`SYSTEM_CONFIG` exists, and llama-server would apply it.
    """
    source = os.environ if base is None else base
    env = {
        k: v
        for k, v in source.items()
        if k in KEPT_ENV or not (k in DROPPED_ENV or k.startswith(DROPPED_PREFIXES))
    }
    if sys.platform != "win32":
        if SYSTEM_CONFIG.exists():
            msg = (
                f"{SYSTEM_CONFIG} exists, and every llama-server applies it with no way to "
                "switch it off; move it away (llama-proc passes all settings as flags)"
            )
            raise ConfigError(msg)
        env["XDG_CONFIG_HOME"] = USER_CONFIG_HOME
    env.update(extra or {})
    return env
