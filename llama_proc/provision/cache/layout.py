"""Where things live in the cache, and the names that are allowed there.

Layout under ``settings.cache_dir``::

    servers/<build>/<variant_id>[+<flavor>]/     one complete install (install.json inside)
    servers/<build>/<variant_id>[+<flavor>].lock the lock that guards it (beside, not inside)
    servers/<build>/.<name>.incoming-<random>/   staging of an install in progress
    servers/.resolved.json                       the last resolutions (see provision.cache.memo)
    downloads/<asset>[.part|.lock]               archives and index files while they are fetched
    models/<file>.gguf                           the smoke-test model (models.smoke_model)
    sources/<archive>-<sha>/                     unpacked llama.cpp source (provision.fetch.sources)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ProvisionError

if TYPE_CHECKING:
    from pathlib import Path

    from llama_proc.config import Settings

__all__ = [
    "DOWNLOADS_DIR",
    "INSTALL_JSON",
    "MODELS_DIR",
    "SERVERS_DIR",
    "downloads_dir",
    "install_dir",
    "models_dir",
    "servers_dir",
]

INSTALL_JSON: Final = "install.json"
"""The record inside every complete install; its presence means the install is complete."""
SERVERS_DIR: Final = "servers"
DOWNLOADS_DIR: Final = "downloads"
MODELS_DIR: Final = "models"
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def servers_dir(settings: Settings) -> Path:
    """``cache_dir/servers``: where installs live."""
    return settings.cache_dir / SERVERS_DIR


def downloads_dir(settings: Settings) -> Path:
    """``cache_dir/downloads``: archives and index files while they are fetched."""
    return settings.cache_dir / DOWNLOADS_DIR


def models_dir(settings: Settings) -> Path:
    """``cache_dir/models``: model files llama-proc fetches (the smoke-test model)."""
    return settings.cache_dir / MODELS_DIR


def _check_name(kind: str, value: str) -> str:
    if not _NAME_RE.match(value) or value in (".", ".."):
        msg = f"{kind} {value!r} cannot be part of a cache path; use letters, digits, '.', '_', '-'"
        raise ProvisionError(msg)
    return value


def install_dir(settings: Settings, build: str, variant_id: str, flavor: str = "") -> Path:
    """``cache_dir/servers/<build>/<variant_id>[+<flavor>]``.

    Raises:
        ProvisionError: a part holds characters that do not belong in a folder name.
    """
    name = _check_name("variant id", variant_id)
    if flavor:
        name += "+" + _check_name("flavor", flavor)
    return servers_dir(settings) / _check_name("build", build) / name
