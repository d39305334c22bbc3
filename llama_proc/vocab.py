"""The project's closed vocabularies, defined once and imported everywhere.

Backends, the ``auto`` choice, install sources and the provisioning preference are spelled here
and nowhere else: argparse ``choices``, ``Settings`` validation, the manifest's schema and the
resolver all read these names, so adding a backend is one edit.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from llama_proc.backends import backend_names

__all__ = [
    "AUTO",
    "BACKENDS",
    "BACKEND_CHOICES",
    "CPU_GROUPS",
    "EVENT_LOOPS",
    "FLAGS_CACHE_FOLDER",
    "MAX_SPLIT_PARTS",
    "PREFER_CHOICES",
    "InstallSource",
]

BACKENDS: Final = backend_names()
"""Every llama.cpp backend the manifest can name (``--variant``, ``LLAMA_PROC_VARIANT``); the rows
of :data:`llama_proc.backends.TABLE`."""
AUTO: Final = "auto"
"""The backend choice that lets host detection decide."""
BACKEND_CHOICES: Final = (AUTO, *BACKENDS)
"""What ``--variant`` and ``Settings.backend`` accept."""
PREFER_CHOICES: Final = ("prebuilt", "source")
CPU_GROUPS: Final = ("amx", "avx512ext", "avx512", "avx2", "sme", "sve", "i8mm")
"""CPU feature groups that can be turned off (``LLAMA_PROC_CPU_OFF``), newest first per arch:
x86-64 ``amx`` ... ``avx2``, arm64 ``sme`` ... ``i8mm`` (see ``provision.compute.ladder``)."""
"""Which provisioning path is tried first (``--prefer``, ``LLAMA_PROC_PREFER``)."""
MAX_SPLIT_PARTS: Final = 256
"""Most parts of a split GGUF fetched or read (the largest published models have a few dozen)."""
EVENT_LOOPS: Final = (AUTO, "asyncio", "uvloop")
"""Event loops the proxy can serve on (``serve --event-loop``)."""


class InstallSource(StrEnum):
    """Where an install came from; recorded as ``source`` in ``install.json``."""

    EXPLICIT = "explicit"
    """A binary the caller named (``LLAMA_PROC_SERVER_BIN``); never copied."""
    BUNDLED = "bundled"
    """Shipped inside the wheel by the build backend."""
    PREBUILT = "prebuilt"
    """An upstream release archive, downloaded and verified."""
    BUILT = "built"
    """Compiled here from llama.cpp source."""


FLAGS_CACHE_FOLDER: Final = "flags"
"""Folder under the cache root remembering what each binary's ``--help`` accepts: written by
``runtime.flags``, sized and listed by ``provision.cache.layout`` (neither imports the other)."""
