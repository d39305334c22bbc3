"""Safe extraction of release archives (tar.gz / zip) and finding the executables inside.

Every member is checked before anything is written, against a model of the finished tree (what
the destination already holds plus the archive): absolute paths, ``..`` components, device and
fifo members, members below a symlink, and symlinks whose target, followed through any chain of
other links, leaves the destination raise :class:`~llama_proc.errors.ArchiveError`. In-tree
chains (``libllama.so -> libllama.so.0 -> libllama.so.0.0.1``) and executable bits survive, for
tar and for zip (whose Unix mode lives in ``external_attr``); setuid and ownership do not.

Members are written by this module, never by ``tarfile``'s extraction, so Python versions
without tarfile's ``data`` filter get the same checks. Writing never follows a symlink: a file
replaces a link of the same name instead of writing through it, and a member below a link is
refused, which is what makes merging several archives into one folder safe (``merge=True``).
A tar's extended headers (pax, GNU long names) pass our own bounded scan before ``tarfile``
parses them (:mod:`~llama_proc.provision.fetch.tar_headers`). Data is streamed to disk with a
running count of the real bytes; past
:data:`MAX_EXTRACT_BYTES` or :data:`MAX_COMPRESSION_RATIO` times the archive's size the
extraction stops and removes what it wrote (an archive bomb).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import gzip
import logging
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from llama_proc.errors import ArchiveError
from llama_proc.provision.fetch.archive_write import (
    _bind_hardlinks,
    _Budget,
    _is_absolute,
    _Member,
    _Parts,
    _resolve,
    _write,
)
from llama_proc.provision.fetch.binaries import _EXEC_BITS, find_binaries
from llama_proc.provision.fetch.tar_headers import MAX_EXTENDED_HEADER, scan_tar_headers

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "MAX_COMPRESSION_RATIO",
    "MAX_EXTENDED_HEADER",
    "MAX_EXTRACT_BYTES",
    "MAX_MEMBERS",
    "archive_kind",
    "extract_archive",
    "find_binaries",
    "unpacked_size",
]

logger = logging.getLogger(__name__)

MAX_EXTRACT_BYTES: Final = 16 << 30
"""Default cap on the bytes one archive may unpack to (the largest real release unpacks to a
few GB)."""
MAX_COMPRESSION_RATIO: Final = 100.0
"""Default cap on unpacked size / archive size (real releases stay under 10; bombs reach 1000)."""
MAX_MEMBERS: Final = 100_000
"""Cap on the members of one archive (real releases hold a few hundred)."""

_TAR_SUFFIXES: Final = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar")
_ZIP_SUFFIXES: Final = (".zip", ".whl")
_MAX_LINK_TARGET: Final = 4096


def archive_kind(archive: Path) -> str:
    """``"tar"`` or ``"zip"``, from the file name.

    Raises:
        ArchiveError: the suffix is not a supported archive type.
    """
    name = archive.name.lower()
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    if name.endswith(_ZIP_SUFFIXES):
        return "zip"
    msg = f"{archive.name}: unsupported archive type; expected .tar.gz, .tgz or .zip"
    raise ArchiveError(msg)


_GZIP_TRAILER: Final = 4
_GZIP_MAGIC: Final = b"\x1f\x8b"
_ISIZE_WRAP: Final = 1 << 32
_DISK_FULL: Final = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def unpacked_size(archive: Path) -> int | None:
    """What ``archive`` unpacks to, read from its own headers (nothing is decompressed).

    A zip's central directory lists every member's size; a gzip ends with the size of what it
    holds (modulo 4 GiB, so a value below the compressed size, or an archive of 4 GiB or more,
    is not trusted); a plain ``.tar`` is its own size. None when the archive cannot say cheaply
    (``.tar.xz``, ``.tar.bz2``, an unreadable file).
    """
    name = archive.name.lower()
    try:
        if name.endswith(_ZIP_SUFFIXES):
            with zipfile.ZipFile(archive) as zf:
                return sum(max(info.file_size, 0) for info in zf.infolist())
        size = archive.stat().st_size
        if name.endswith(".tar"):
            return size
        if not name.endswith((".tar.gz", ".tgz")) or size >= _ISIZE_WRAP:
            return None
        with archive.open("rb") as f:
            if f.read(2) != _GZIP_MAGIC:
                return None
            f.seek(-_GZIP_TRAILER, os.SEEK_END)
            isize = int.from_bytes(f.read(_GZIP_TRAILER), "little")
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return isize if isize >= size else None


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _free_space(folder: Path) -> int | None:
    """Free bytes on ``folder``'s filesystem (its nearest existing parent's), None if unknown."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _require_room(archive: Path, dest: Path) -> int | None:
    """Refuse to unpack ``archive`` into ``dest`` when it cannot fit; what it unpacks to.

    Raises:
        ArchiveError: the archive says it unpacks to more than ``dest``'s filesystem has free.
    """
    needed = unpacked_size(archive)
    free = _free_space(dest)
    if needed is not None and free is not None and free < needed:
        msg = (
            f"not enough free space in {dest.parent} to unpack {archive.name}: it unpacks to "
            f"{_mb(needed)} and {_mb(free)} is free; free space there or set "
            "LLAMA_PROC_CACHE_DIR to a bigger disk"
        )
        raise ArchiveError(msg)
    return needed


def extract_archive(
    archive: Path,
    dest: Path,
    *,
    merge: bool = False,
    max_bytes: int = MAX_EXTRACT_BYTES,
    max_ratio: float = MAX_COMPRESSION_RATIO,
) -> Path:
    """Extract a tar or zip archive into ``dest`` after checking every member.

    Args:
        archive: ``.tar.gz``/``.tgz`` (also ``.tar.xz``, ``.tar.bz2``, ``.tar``) or ``.zip``.
        dest: folder to extract into (created). It may hold files already; they are part of
            the checks (a member may replace a file or link, never write through a link).
        merge: put the contents of the archive's single top-level folder (upstream's
            ``llama-<tag>/``), or of the whole archive when it has none, straight into
            ``dest``, beside what is there: how a binary archive and its runtime twin share
            one install folder.
        max_bytes: stop once this many bytes have been unpacked.
        max_ratio: stop once the unpacked bytes pass this multiple of the archive's size
            (only beyond a few MB, which any archive may reach).

    Returns:
        With ``merge``, ``dest``. Otherwise the archive's root: its single top-level folder
        when there is exactly one, else ``dest``.

    Raises:
        ArchiveError: the archive is corrupt, of an unknown type, has an unsafe member, or
            unpacks past a cap (what was written is removed).
    """
    kind = archive_kind(archive)
    needed = _require_room(archive, dest)
    try:
        budget = _Budget(archive, max_bytes, max_ratio)
        dest.mkdir(parents=True, exist_ok=True)
        if kind == "tar":
            # Extended headers are checked by our own bounded scan before tarfile parses any.
            scan_tar_headers(archive, max_headers=2 * MAX_MEMBERS, max_offset=budget.limit)
            with tarfile.open(archive, "r:*") as tar:
                members = _tar_members(tar, archive, budget)
                return _extract(members, archive, dest, merge=merge, budget=budget)
        with zipfile.ZipFile(archive) as zf:
            members = _zip_members(zf, archive)
            return _extract(members, archive, dest, merge=merge, budget=budget)
    except ArchiveError:
        raise
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        gzip.BadGzipFile,
        zlib.error,
        EOFError,
        lzma.LZMAError,
        ValueError,  # tarfile's own, on some malformed headers (an embedded NUL byte)
    ) as err:
        detail = " ".join(str(err).split())
        msg = f"{archive.name} is corrupt or truncated ({detail}); delete it and download again"
        raise ArchiveError(msg) from err
    except OSError as err:
        if err.errno in _DISK_FULL:
            size = f"it unpacks to {_mb(needed)}" if needed is not None else "its size is unknown"
            free = _free_space(dest)
            now = f", {_mb(free)} free now" if free is not None else ""
            msg = (
                f"disk full in {dest.parent} while unpacking {archive.name} ({size}{now}); "
                "free space there or set LLAMA_PROC_CACHE_DIR to a bigger disk"
            )
        else:
            msg = f"cannot extract {archive.name} into {dest}: {err.strerror or err}"
        raise ArchiveError(msg) from err


def _member_parts(name: str, archive: Path) -> _Parts:
    """Validate a member name and return its path components."""
    text = name.replace("\\", "/")
    if _is_absolute(text):
        msg = f"{archive.name}: member {name!r} has an absolute path; refusing to extract"
        raise ArchiveError(msg)
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        msg = f"{archive.name}: member {name!r} climbs out with '..'; refusing to extract"
        raise ArchiveError(msg)
    return parts


def _link_target(name: str, target: str, archive: Path) -> str:
    text = target.replace("\\", "/")
    if not text:
        msg = f"{archive.name}: link {name!r} has an empty target; the archive is malformed"
        raise ArchiveError(msg)
    if _is_absolute(text):
        msg = f"{archive.name}: link {name!r} points to absolute path {target!r}; refusing it"
        raise ArchiveError(msg)
    return text


def _special(name: str, archive: Path) -> ArchiveError:
    msg = f"{archive.name}: member {name!r} is a device, fifo, socket or other special file"
    return ArchiveError(msg)


def _count(members: list[_Member], name: str, archive: Path) -> None:
    if len(members) >= MAX_MEMBERS:
        msg = (
            f"{archive.name}: member {name!r} makes more than {MAX_MEMBERS} members; refusing a "
            "likely archive bomb: delete the archive and download it from a trusted source"
        )
        raise ArchiveError(msg)


def _tar_members(tar: tarfile.TarFile, archive: Path, budget: _Budget) -> list[_Member]:
    members: list[_Member] = []
    for info in tar:  # headers one at a time: a bomb is refused before it is decompressed
        _count(members, info.name, archive)
        # offset_data + size is where the decompressed stream will have to be read to.
        budget.check(info.offset_data + info.size, info.name)
        parts = _member_parts(info.name, archive)
        if info.isfile():
            reader = functools.partial(_tar_reader, tar, info, archive)
            executable = bool(info.mode & _EXEC_BITS)
            members.append(_Member(info.name, parts, "file", executable=executable, reader=reader))
        elif info.isdir():
            members.append(_Member(info.name, parts, "dir"))
        elif info.issym():
            target = _link_target(info.name, info.linkname, archive)
            members.append(_Member(info.name, parts, "symlink", target))
        elif info.islnk():
            _link_target(info.name, info.linkname, archive)
            members.append(_Member(info.name, parts, "hardlink", info.linkname))
        else:
            raise _special(info.name, archive)
    return members


def _tar_reader(tar: tarfile.TarFile, info: tarfile.TarInfo, archive: Path) -> IO[bytes]:
    stream = tar.extractfile(info)
    if stream is None:
        msg = f"{archive.name}: member {info.name!r} has no data; delete it and download again"
        raise ArchiveError(msg)
    return stream


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> list[_Member]:
    members: list[_Member] = []
    for info in zf.infolist():
        _count(members, info.filename, archive)
        parts = _member_parts(info.filename, archive)
        mode = (info.external_attr >> 16) & 0xFFFF
        kind = stat.S_IFMT(mode)
        if info.flag_bits & 0x1:
            msg = f"{archive.name}: member {info.filename!r} is encrypted; cannot extract it"
            raise ArchiveError(msg)
        if kind == stat.S_IFLNK:
            with zf.open(info) as stream:  # never more than a path's worth in memory
                raw = stream.read(_MAX_LINK_TARGET + 1)
            if len(raw) > _MAX_LINK_TARGET:
                msg = (
                    f"{archive.name}: link {info.filename!r} has a target longer than "
                    f"{_MAX_LINK_TARGET} bytes; the archive is malformed, refusing it"
                )
                raise ArchiveError(msg)
            try:
                text = _link_target(info.filename, raw.decode("utf-8"), archive)
            except UnicodeDecodeError:
                msg = f"{archive.name}: link {info.filename!r} has a target that is not UTF-8"
                raise ArchiveError(msg) from None
            members.append(_Member(info.filename, parts, "symlink", text))
        elif info.is_dir() or kind == stat.S_IFDIR:
            members.append(_Member(info.filename, parts, "dir"))
        elif kind in (0, stat.S_IFREG):
            reader = functools.partial(zf.open, info)
            executable = bool(mode & _EXEC_BITS)
            members.append(
                _Member(info.filename, parts, "file", executable=executable, reader=reader)
            )
        else:
            raise _special(info.filename, archive)
    return members


def _extract(
    members: list[_Member], archive: Path, dest: Path, *, merge: bool, budget: _Budget
) -> Path:
    members = _bind_hardlinks(members, archive)
    top = _top_folder(members)
    if merge and top is not None:
        members = [dataclasses.replace(m, parts=m.parts[1:], source=m.source[1:]) for m in members]
    members = [m for m in members if m.parts]
    tree = _plan(members, _scan(dest), archive)
    _write(members, tree, dest, archive, budget)
    return dest / top if top is not None and not merge else dest


def _top_folder(members: Iterable[_Member]) -> str | None:
    """The single top-level folder if every member lives under it, else ``None``."""
    tops: set[str] = set()
    nested = False
    not_dir = set()
    for member in members:
        if not member.parts:
            continue
        tops.add(member.parts[0])
        nested = nested or len(member.parts) > 1
        if len(member.parts) == 1 and member.kind != "dir":
            not_dir.add(member.parts[0])
    if len(tops) == 1 and nested and not not_dir:
        return tops.pop()
    return None


def _scan(dest: Path) -> dict[_Parts, _Member]:
    """What the destination holds already, without following links."""
    found: dict[_Parts, _Member] = {}
    pending: list[tuple[_Parts, str]] = [((), os.fspath(dest))]
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                parts = (*prefix, entry.name)
                name = "/".join(parts)
                if entry.is_symlink():
                    target = str(Path(entry.path).readlink()).replace("\\", "/")
                    found[parts] = _Member(name, parts, "symlink", target, existing=True)
                elif entry.is_dir(follow_symlinks=False):
                    found[parts] = _Member(name, parts, "dir", existing=True)
                    pending.append((parts, entry.path))
                else:
                    found[parts] = _Member(name, parts, "file", existing=True)
    return found


def _plan(
    members: list[_Member], tree: dict[_Parts, _Member], archive: Path
) -> dict[_Parts, _Member]:
    """The finished tree (``tree`` plus ``members``); raise if any of it would be unsafe."""
    placed: set[_Parts] = set()
    for member in members:
        old = tree.get(member.parts)
        if member.parts in placed and old is not None and old.kind == member.kind == "dir":
            continue
        if member.parts in placed:
            msg = (
                f"{archive.name}: member {member.name!r} appears twice; the archive is "
                "malformed, download it again"
            )
            raise ArchiveError(msg)
        placed.add(member.parts)
        if old is not None and (old.kind == "dir") != (member.kind == "dir"):
            what = "folder" if old.kind == "dir" else "file"
            msg = (
                f"{archive.name}: member {member.name!r} would replace a {what} of the same name "
                "already in the destination; refusing to extract over it (use an empty folder)"
            )
            raise ArchiveError(msg)
        if old is not None and old.existing and member.kind != "dir":
            logger.warning("%s is in more than one archive; the later one wins", member.name)
        tree[member.parts] = member
    for member in members:
        for depth in range(1, len(member.parts)):
            prefix = member.parts[:depth]
            above = tree.setdefault(prefix, _Member("/".join(prefix), prefix, "dir"))
            if above.kind == "dir":
                continue
            what = "symlink" if above.kind == "symlink" else "file"
            origin = " left by an earlier archive" if above.existing else ""
            msg = (
                f"{archive.name}: member {member.name!r} lies below {what} "
                f"{above.name!r}{origin}; refusing to extract"
            )
            raise ArchiveError(msg)
    for parts, link in list(tree.items()):
        if link.kind == "symlink" and _resolve(tree, parts, link, archive) is None:
            origin = " (already in the destination)" if link.existing else ""
            msg = (
                f"{archive.name}: link {link.name!r} -> {link.target!r}{origin} resolves "
                "outside the destination (following every link); refusing to extract"
            )
            raise ArchiveError(msg)
    return tree
