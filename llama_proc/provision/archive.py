"""Safe extraction of release archives (tar.gz / zip) and finding the executables inside.

Every member is checked before anything is written: absolute paths, ``..`` components, links
that leave the destination and device/fifo members raise
:class:`~llama_proc.errors.ArchiveError`. In-tree symlink chains (``libllama.so ->
libllama.so.0 -> libllama.so.0.0.1``) and executable bits survive, for tar and for zip (whose
Unix mode lives in ``external_attr``).
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ArchiveError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["archive_kind", "extract_archive", "find_binaries"]

logger = logging.getLogger(__name__)

_TAR_SUFFIXES: Final = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar")
_ZIP_SUFFIXES: Final = (".zip", ".whl")
_COPY_CHUNK: Final = 1 << 20
_EXEC_BITS: Final = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
_FILE_MODE: Final = 0o644
_EXEC_MODE: Final = 0o755
_SAFE_MODE_MASK: Final = 0o755
_HAS_DATA_FILTER: Final = hasattr(tarfile, "data_filter")


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


def _member_parts(name: str, archive: Path) -> list[str]:
    """Validate a member name and return its path components."""
    text = name.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        msg = f"{archive.name}: member {name!r} has an absolute path; refusing to extract"
        raise ArchiveError(msg)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        msg = f"{archive.name}: member {name!r} climbs out with '..'; refusing to extract"
        raise ArchiveError(msg)
    return parts


def _check_link(name: str, target: str, archive: Path, *, hard: bool) -> None:
    """A link target must stay inside the destination (relative to the link for symlinks)."""
    text = target.replace("\\", "/")
    if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        msg = f"{archive.name}: link {name!r} points to absolute path {target!r}"
        raise ArchiveError(msg)
    base = "" if hard else posixpath.dirname(name.replace("\\", "/"))
    resolved = posixpath.normpath(posixpath.join(base, text))
    if resolved == ".." or resolved.startswith("../"):
        msg = f"{archive.name}: link {name!r} -> {target!r} points outside the archive"
        raise ArchiveError(msg)


def _reject_through_links(names: Iterable[list[str]], links: set[str], archive: Path) -> None:
    """Refuse members placed below a symlink member: the link could point them anywhere."""
    if not links:
        return
    for parts in names:
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if prefix in links:
                msg = f"{archive.name}: member {'/'.join(parts)!r} lies below symlink {prefix!r}"
                raise ArchiveError(msg)


def _root_of(names: Iterable[list[str]], dest: Path) -> Path:
    """The single top-level folder if every member lives under it, else ``dest``."""
    tops: set[str] = set()
    nested = False
    for parts in names:
        if not parts:
            continue
        tops.add(parts[0])
        nested = nested or len(parts) > 1
    if len(tops) == 1 and nested:
        top = dest / tops.pop()
        if top.is_dir() and not top.is_symlink():
            return top
    return dest


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract a tar or zip archive into ``dest`` after checking every member.

    Args:
        archive: ``.tar.gz``/``.tgz`` (also ``.tar.xz``, ``.tar.bz2``, ``.tar``) or ``.zip``.
        dest: folder to extract into (created; should be new and empty).

    Returns:
        The archive's root: its single top-level folder when there is exactly one (upstream's
        ``llama-<tag>/``), else ``dest``.

    Raises:
        ArchiveError: the archive is corrupt, of an unknown type, or has an unsafe member.
    """
    kind = archive_kind(archive)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        names = _extract_tar(archive, dest) if kind == "tar" else _extract_zip(archive, dest)
    except ArchiveError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        msg = f"{archive.name} is corrupt or truncated ({err}); delete it and download again"
        raise ArchiveError(msg) from err
    except OSError as err:
        msg = f"cannot extract {archive.name} into {dest}: {err.strerror or err}"
        raise ArchiveError(msg) from err
    return _root_of(names, dest)


def _extract_tar(archive: Path, dest: Path) -> list[list[str]]:
    names: list[list[str]] = []
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            names.append(_member_parts(member.name, archive))
            if member.issym():
                _check_link(member.name, member.linkname, archive, hard=False)
            elif member.islnk():
                _check_link(member.name, member.linkname, archive, hard=True)
            elif not (member.isfile() or member.isdir()):
                msg = f"{archive.name}: member {member.name!r} is a device, fifo or other special file"
                raise ArchiveError(msg)
        links = {"/".join(p) for m, p in zip(members, names, strict=True) if m.issym()}
        _reject_through_links(names, links, archive)
        if not _HAS_DATA_FILTER:  # Python < 3.11.4: the checks above are all there is
            for member in members:
                member.mode &= _SAFE_MODE_MASK
            tar.extractall(dest, members=members)  # noqa: S202 - every member checked above
            return names
        try:
            # The "data" filter re-checks links against the real filesystem as it extracts
            # (a symlinked folder cannot redirect later members) and drops setuid/ownership,
            # while keeping the owner's executable bit.
            tar.extractall(dest, members=members, filter="data")
        except tarfile.FilterError as err:
            msg = f"{archive.name}: unsafe member refused: {err}"
            raise ArchiveError(msg) from err
    return names


def _zip_mode(info: zipfile.ZipInfo) -> int:
    return (info.external_attr >> 16) & 0xFFFF


def _extract_zip(archive: Path, dest: Path) -> list[list[str]]:
    names: list[list[str]] = []
    links: list[tuple[zipfile.ZipInfo, list[str], str]] = []
    root = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            parts = _member_parts(info.filename, archive)
            names.append(parts)
            mode = _zip_mode(info)
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                link_target = zf.read(info).decode("utf-8")
                _check_link(info.filename, link_target, archive, hard=False)
                links.append((info, parts, link_target))
            elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                msg = f"{archive.name}: member {info.filename!r} is a device, fifo or socket"
                raise ArchiveError(msg)
        _reject_through_links(names, {"/".join(p) for _i, p, _t in links}, archive)
        for info in infos:
            parts = _member_parts(info.filename, archive)
            if not parts or stat.S_IFMT(_zip_mode(info)) == stat.S_IFLNK:
                continue
            target = dest.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            _ensure_inside(target.parent, root, archive, info.filename)
            target.unlink(missing_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)
            target.chmod(_EXEC_MODE if _zip_mode(info) & _EXEC_BITS else _FILE_MODE)
        # Links last, so a link can never redirect a file written after it.
        for info, parts, link_target in links:
            path = dest.joinpath(*parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            _ensure_inside(path.parent, root, archive, info.filename)
            _make_symlink(path, link_target, archive)
    return names


def _ensure_inside(folder: Path, root: Path, archive: Path, member: str) -> None:
    if not folder.resolve().is_relative_to(root):
        msg = f"{archive.name}: member {member!r} would be written outside {root}"
        raise ArchiveError(msg)


def _make_symlink(path: Path, target: str, archive: Path) -> None:
    path.unlink(missing_ok=True)
    try:
        path.symlink_to(target.replace("\\", "/"))
    except OSError:
        # Windows without symlink privilege: a copy of the file serves the same purpose.
        source = (path.parent / target).resolve()
        if not source.is_file():
            msg = f"{archive.name}: cannot create link {path.name} -> {target}"
            raise ArchiveError(msg) from None
        path.write_bytes(source.read_bytes())


def find_binaries(root: Path, names: Sequence[str], os_name: str) -> dict[str, Path]:
    """Locate executables in an extracted archive or a build's output folder.

    Looks in ``root``, then ``root/bin``, then anywhere below ``root`` (shallowest first).

    Args:
        root: folder to search.
        names: manifest binary names; ``"a|b"`` accepts either (the first found in name order).
        os_name: ``windows`` adds ``.exe``.

    Returns:
        ``{manifest name: path}`` for every entry of ``names``.

    Raises:
        ArchiveError: one of the names is not found (the message lists what is there).
    """
    suffix = ".exe" if os_name == "windows" else ""
    found: dict[str, Path] = {}
    everything: list[Path] | None = None
    missing: list[str] = []
    for spec in names:
        alternatives = [n for n in spec.split("|") if n]
        hit: Path | None = None
        for alt in alternatives:
            filename = alt + suffix
            for candidate in (root / filename, root / "bin" / filename):
                if candidate.is_file():
                    hit = candidate
                    break
            if hit is None:
                if everything is None:
                    everything = _walk(root)
                hit = next((p for p in everything if p.name == filename and p.is_file()), None)
            if hit is not None:
                break
        if hit is None:
            missing.append(spec)
        else:
            found[spec] = hit
    if missing:
        have = sorted({p.name for p in everything or _walk(root) if _looks_executable(p)})
        listing = ", ".join(have[:20]) or "no executables"
        msg = f"{', '.join(missing)} not found in {root} (found: {listing})"
        raise ArchiveError(msg)
    return found


def _walk(root: Path) -> list[Path]:
    paths = [Path(d) / f for d, _dirs, files in os.walk(root) for f in files]
    return sorted(paths, key=lambda p: (len(p.relative_to(root).parts), str(p)))


def _looks_executable(path: Path) -> bool:
    if path.suffix.lower() == ".exe":
        return True
    try:
        return path.is_file() and bool(path.stat().st_mode & _EXEC_BITS) and path.suffix == ""
    except OSError:
        return False
