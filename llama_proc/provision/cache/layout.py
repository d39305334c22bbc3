"""Where things live in the cache, and the names that are allowed there.

Layout under ``settings.cache_dir``::

    servers/<build>/<variant_id>[+<flavor>]/     one complete install (install.json inside)
    servers/<build>/<variant_id>[+<flavor>].lock the lock that guards it (beside, not inside)
    servers/<build>/.<name>.incoming-<random>/   staging of an install in progress
    servers/.resolved.json                       the last resolutions (see provision.cache.memo)
    downloads/<asset>[.part|.lock]               archives and index files while they are fetched
    models/<file>.gguf                           the smoke-test model (models.smoke_model)
    sources/<archive>-<sha>/                     unpacked llama.cpp source (provision.fetch.sources)
    build/<key>/                                 CMake build folders (provision.compile)
    toolkits/cuda-<ver>-<arch>-<sha>/            CUDA toolkits from wheels (compile.cuda_wheels)
    releases/<repo>/<tag>.json                   release listings (provision.fetch.releases)
    flags/<digest>.json                          what a binary's --help accepts (runtime.flags)

llama-proc runs the programs it finds here, so, as ssh does for its keys, the cache root and
every existing folder from it down to an install must belong to the current user (or root)
and must not be writable by others (:func:`check_private`); group-writable is accepted only
for a user-private group. POSIX only: on Windows the folders' ACLs are not checked.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ProvisionError
from llama_proc.vocab import FLAGS_CACHE_FOLDER

if TYPE_CHECKING:
    from llama_proc.provision.views import CacheView

__all__ = [
    "BUILD_DIR",
    "CACHE_KINDS",
    "DOWNLOADS_DIR",
    "FLAGS_DIR",
    "INSTALL_JSON",
    "MODELS_DIR",
    "RELEASES_DIR",
    "SERVERS_DIR",
    "SOURCES_DIR",
    "TOOLKITS_DIR",
    "WORK_DIRS",
    "KindUsage",
    "build_number",
    "check_private",
    "downloads_dir",
    "install_dir",
    "list_dir",
    "models_dir",
    "servers_dir",
    "tree_size",
    "usage_by_kind",
]

INSTALL_JSON: Final = "install.json"
"""The record inside every complete install; its presence means the install is complete."""
BUILD_DIR: Final = "build"
"""Folder under the cache root holding the persistent CMake build folders."""
SOURCES_DIR: Final = "sources"
"""Folder under the cache root holding unpacked source archives."""
TOOLKITS_DIR: Final = "toolkits"
"""Folder under the cache root holding the toolkits laid out from wheels."""
WORK_DIRS: Final = (BUILD_DIR, SOURCES_DIR, TOOLKITS_DIR)
"""Work kept for later builds (each child a folder with a ``<name>.lock`` beside it): no
install needs it to run, and ``cache prune`` removes what no kept install came from."""
SERVERS_DIR: Final = "servers"
DOWNLOADS_DIR: Final = "downloads"
MODELS_DIR: Final = "models"
RELEASES_DIR: Final = "releases"
"""Folder under the cache root holding GitHub release listings, one JSON file per tag."""
FLAGS_DIR: Final = FLAGS_CACHE_FOLDER
"""Folder under the cache root remembering what each binary's ``--help`` accepts (written by
``runtime.flags``; the name lives in :mod:`llama_proc.vocab`)."""
CACHE_KINDS: Final[tuple[tuple[str, str], ...]] = (
    (SERVERS_DIR, "installed llama-servers"),
    (DOWNLOADS_DIR, "archives and index files"),
    (MODELS_DIR, "the smoke-test model"),
    (BUILD_DIR, "CMake build folders"),
    (SOURCES_DIR, "unpacked llama.cpp sources"),
    (TOOLKITS_DIR, "CUDA toolkits from wheels"),
    (RELEASES_DIR, "release listings"),
    (FLAGS_DIR, "remembered --help flags"),
)
"""Every folder the cache holds, in the order ``cache ls`` and ``doctor`` report them."""
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def servers_dir(settings: CacheView) -> Path:
    """``cache_dir/servers``: where installs live.

    Raises:
        ProvisionError: the cache root or this folder is open to other users
            (:func:`check_private`).
    """
    path = settings.cache_dir / SERVERS_DIR
    check_private(path, root=settings.cache_dir)
    return path


def check_private(path: Path, *, root: Path) -> None:
    """Refuse when ``root`` or an existing folder from it down to ``path`` is open to others.

    Each must belong to the current user or to root and must not be writable by other users,
    nor by a group other than the user's private one.

    Raises:
        ProvisionError: one is not; the message says how to fix it.
    """
    if os.name != "posix":
        return  # Windows keeps permissions in ACLs, which this check does not read
    uid = os.geteuid()
    folder = Path(root)
    for part in ("", *Path(path).relative_to(root).parts):
        folder = folder / part if part else folder
        try:
            info = folder.stat()
        except OSError:
            return  # not created yet: llama-proc creates it
        problem, fix = _exposure(info, uid, shlex.quote(str(folder)))
        if problem:
            msg = (
                f"{folder} is {problem}: another user could replace what llama-proc runs from "
                f"its cache; {fix}, or point LLAMA_PROC_CACHE_DIR at a folder of your own"
            )
            raise ProvisionError(msg)


def _exposure(info: os.stat_result, uid: int, shown: str) -> tuple[str, str]:
    """What makes a folder writable by someone else, and the command that fixes it."""
    if info.st_uid not in (uid, 0):
        return (
            f"owned by uid {info.st_uid}, not by you (uid {uid})",
            f"run `chown {uid} {shown}` if it is yours",
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_IWOTH:
        return f"writable by every user (mode {mode:o})", f"run `chmod go-w {shown}`"
    if mode & stat.S_IWGRP and not _private_group(info.st_gid, uid):
        return f"writable by group {info.st_gid} (mode {mode:o})", f"run `chmod g-w {shown}`"
    return "", ""


def _private_group(gid: int, uid: int) -> bool:
    """Whether ``gid`` is ``uid``'s own group (the user-private-group scheme, umask 002)."""
    import grp  # noqa: PLC0415 - POSIX only
    import pwd  # noqa: PLC0415 - POSIX only

    try:
        user = pwd.getpwuid(uid)
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return (
        user.pw_gid == gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}
    )


def downloads_dir(settings: CacheView) -> Path:
    """``cache_dir/downloads``: archives and index files while they are fetched."""
    return settings.cache_dir / DOWNLOADS_DIR


def models_dir(settings: CacheView) -> Path:
    """``cache_dir/models``: model files llama-proc fetches (the smoke-test model)."""
    return settings.cache_dir / MODELS_DIR


def _check_name(kind: str, value: str) -> str:
    if not _NAME_RE.match(value) or value in (".", ".."):
        msg = f"{kind} {value!r} cannot be part of a cache path; use letters, digits, '.', '_', '-'"
        raise ProvisionError(msg)
    return value


def install_dir(settings: CacheView, build: str, variant_id: str, flavor: str = "") -> Path:
    """``cache_dir/servers/<build>/<variant_id>[+<flavor>]``.

    Raises:
        ProvisionError: a part holds characters that do not belong in a folder name.
    """
    name = _check_name("variant id", variant_id)
    if flavor:
        name += "+" + _check_name("flavor", flavor)
    path = servers_dir(settings) / _check_name("build", build) / name
    check_private(path, root=settings.cache_dir)
    return path


@dataclass(frozen=True)
class KindUsage:
    """What one folder of the cache holds: its kind, path, bytes on disk and top entries."""

    kind: str
    what: str
    path: Path
    size: int
    entries: int


def usage_by_kind(root: Path) -> list[KindUsage]:
    """Each cache folder's size (files' own bytes; links are not followed), in report order.

    A folder that does not exist counts as empty; one that cannot be read counts what could be.
    """
    found = []
    for kind, what in CACHE_KINDS:
        path = root / kind
        try:
            entries = sum(1 for _ in path.iterdir())
        except OSError:
            entries = 0
        found.append(KindUsage(kind, what, path, tree_size(path), entries))
    return found


def tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (or of ``path`` itself), links not followed."""
    if not path.is_dir() or path.is_symlink():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        else:
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def build_number(build: str) -> int:
    """``b11434`` -> 11434, for ordering builds (-1 for a name that is not ``b<digits>``)."""
    digits = build.removeprefix("b")
    return int(digits) if digits.isdigit() else -1


def list_dir(folder: Path) -> list[Path]:
    """A folder's entries, sorted; none when it is missing or unreadable."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []
