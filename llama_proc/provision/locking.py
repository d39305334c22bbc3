"""File locks that guard the cache: one helper for every lock llama-proc takes.

A lock file sits *beside* what it guards (``<target>.lock``), never inside it, so replacing the
guarded folder never removes the lock another process is waiting on.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final

from filelock import FileLock, Timeout

from llama_proc.errors import CacheLockTimeoutError, ProvisionError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = ["LOCK_SUFFIX", "cache_lock", "lock_path", "try_lock"]

LOCK_SUFFIX: Final = ".lock"


def lock_path(target: Path) -> Path:
    """The lock file that guards ``target``: ``<target>.lock`` in the same folder."""
    return target.parent / f"{target.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def cache_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold the file lock at ``path`` (created with its folder).

    Args:
        path: the lock file.
        timeout: seconds to wait; 0 tries once.

    Raises:
        CacheLockTimeoutError: another process held it for ``timeout`` seconds.
        ProvisionError: the lock file cannot be created.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=timeout)
        lock.acquire()
    except Timeout as err:
        raise CacheLockTimeoutError(str(path), timeout) from err
    except OSError as err:
        msg = f"cannot create the lock {path}: {err.strerror or err}; check LLAMA_PROC_CACHE_DIR"
        raise ProvisionError(msg) from err
    try:
        yield
    finally:
        lock.release()


def try_lock(path: Path) -> contextlib.AbstractContextManager[None] | None:
    """The lock at ``path`` if it is free right now, else None (for pruning)."""
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except (Timeout, OSError):
        return None

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        try:
            yield
        finally:
            lock.release()

    return held()
