"""The cache as one object: :class:`Cache` knows its root, its lock timeout and every folder.

Built once from the settings (:meth:`Cache.of`) where a command starts, it is what the cache's
users read instead of the settings: where each kind of thing lives (:mod:`.layout` names
them), how to take an install's lock, how big each folder is, and what interrupted work left
behind (``doctor`` reports it; ``cache prune`` removes it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llama_proc.provision.cache import layout
from llama_proc.provision.cache.locking import (
    LOCK_SUFFIX,
    OLD_MARK,
    STAGING_MARK,
    cache_lock,
    lock_path,
)
from llama_proc.provision.fetch.part import PART_SUFFIX

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from llama_proc.provision.views import CacheView

__all__ = ["Cache", "Leftovers"]


@dataclass(frozen=True)
class Leftovers:
    """What interrupted work left in the cache."""

    staging: tuple[Path, ...]
    """Staging and moved-aside folders of installs that never finished."""
    parts: tuple[Path, ...]
    """Partial downloads."""
    locks: tuple[Path, ...]
    """Lock files beside installs (harmless; pruned once their install is gone)."""


@dataclass(frozen=True)
class Cache:
    """The per-user cache: its root, how long to wait for a lock, and every folder in it."""

    cache_dir: Path
    lock_timeout: float = 3600.0

    @classmethod
    def of(cls, settings: CacheView) -> Cache:
        """The cache ``settings`` name."""
        return cls(settings.cache_dir, settings.lock_timeout)

    @property
    def servers(self) -> Path:
        """Installs, by build (checked private: see :func:`.layout.check_private`)."""
        return layout.servers_dir(self)

    @property
    def downloads(self) -> Path:
        """Archives and index files while they are fetched."""
        return layout.downloads_dir(self)

    @property
    def models(self) -> Path:
        """Model files llama-proc fetches (the smoke-test model)."""
        return layout.models_dir(self)

    def folder(self, kind: str) -> Path:
        """The folder of one of :data:`.layout.CACHE_KINDS` (``build``, ``toolkits``...)."""
        if kind not in dict(layout.CACHE_KINDS):
            msg = f"no cache folder of kind {kind!r}"
            raise ValueError(msg)
        return self.cache_dir / kind

    def install_dir(self, build: str, variant_id: str, flavor: str = "") -> Path:
        """Where the install of ``variant_id`` at ``build`` lives (see :func:`.layout.install_dir`)."""
        return layout.install_dir(self, build, variant_id, flavor)

    @contextlib.contextmanager
    def lock(self, target: Path) -> Iterator[None]:
        """Hold ``target``'s lock (``<target>.lock`` beside it) for up to the lock timeout.

        Raises:
            CacheLockTimeoutError: another process held it for :attr:`lock_timeout` seconds.
        """
        with cache_lock(lock_path(target), self.lock_timeout):
            yield

    def usage(self) -> list[layout.KindUsage]:
        """Each folder's size and entry count, in report order."""
        return layout.usage_by_kind(self.cache_dir)

    def leftovers(self) -> Leftovers:
        """What interrupted installs and downloads left behind."""
        in_builds = [
            p
            for build in layout.list_dir(self.cache_dir / layout.SERVERS_DIR)
            for p in layout.list_dir(build)
        ]
        return Leftovers(
            staging=tuple(p for p in in_builds if STAGING_MARK in p.name or OLD_MARK in p.name),
            parts=tuple(
                p for p in layout.list_dir(self.cache_dir / layout.DOWNLOADS_DIR)
                if p.name.endswith(PART_SUFFIX)
            ),
            locks=tuple(p for p in in_builds if p.name.endswith(LOCK_SUFFIX)),
        )  # fmt: skip
