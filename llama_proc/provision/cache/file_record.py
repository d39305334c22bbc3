"""The files an install records: each one's size, hash and identity, and what can be wrong with it.

``install.json`` lists them so every use can tell an intact install from a changed one.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from llama_proc.provision.cache.layout import INSTALL_JSON

_RECORD_TEMP: Final = f"{INSTALL_JSON}."
"""Prefix of the temporary files an atomic rewrite of ``install.json`` uses."""

ProblemKind = Literal[
    "missing",
    "size",
    "mtime",
    "type",
    "link",
    "dangling",
    "outside",
    "sha256",
    "extra",
    "record",
    "compute",
]
"""What is wrong with one file of an install (see :class:`FileProblem`)."""


@dataclass(frozen=True)
class FileRecord:
    """One file of an install as ``install.json`` records it."""

    size: int
    """``lstat`` size in bytes (for a symlink: the length of its target)."""
    mtime_ns: int
    """``lstat`` modification time."""
    sha256: str | None = None
    """Content digest of a regular file, taken at install time; None for a symlink."""
    link: str | None = None
    """Target of a symlink, as written in the link; None for a regular file."""
    ctime_ns: int | None = None
    """``lstat`` change time: no tool can set it back, so an edit that restores the size and
    mtime still shows here (None in records made before it was kept)."""
    ino: int | None = None
    """``lstat`` inode number: a file replaced by another one shows here."""

    def to_json(self) -> dict[str, Any]:
        """The ``install.json`` form (keys that are None are left out)."""
        out: dict[str, Any] = {"size": self.size, "mtime_ns": self.mtime_ns}
        for key in ("sha256", "link", "ctime_ns", "ino"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def same_identity(self, st: os.stat_result) -> bool:
        """Whether ``st`` is still the very file recorded (True when nothing was recorded)."""
        if self.ctime_ns is None or self.ino is None:
            return True
        return st.st_ctime_ns == self.ctime_ns and st.st_ino == self.ino

    @classmethod
    def from_json(cls, data: object) -> FileRecord | None:
        """Parse one ``file_records`` entry; None when it is not an object with integer size and mtime."""
        if not isinstance(data, dict):
            return None
        size, mtime, sha, link = (data.get(k) for k in ("size", "mtime_ns", "sha256", "link"))
        if not isinstance(size, int) or not isinstance(mtime, int):
            return None
        ctime, ino = data.get("ctime_ns"), data.get("ino")
        return cls(
            size,
            mtime,
            sha if isinstance(sha, str) else None,
            link if isinstance(link, str) else None,
            ctime if isinstance(ctime, int) else None,
            ino if isinstance(ino, int) else None,
        )


@dataclass(frozen=True)
class FileProblem:
    """Something wrong with one file of an install; ``str()`` is a line for people."""

    path: str
    """Relative to the install folder (``install.json`` for a record that cannot be used)."""
    kind: ProblemKind
    expected: str | int | None = None
    """What ``install.json`` says (a size, a link target, a sha256...)."""
    actual: str | int | None = None
    """What is on disk now (or, for ``record``, why the record cannot be used)."""

    def __str__(self) -> str:
        messages: dict[str, str] = {
            "missing": "missing",
            "size": f"size changed ({self.expected} -> {self.actual} bytes)",
            "mtime": "modified since it was installed (mtime changed)",
            "type": f"is now {self.actual}, was {self.expected}",
            "link": f"points to {self.actual!r}, install.json says {self.expected!r}",
            "dangling": f"symlink to {self.expected!r} leads nowhere",
            "outside": f"resolves outside the install folder ({self.actual})",
            "sha256": "content differs from install.json (sha256)",
            "extra": "not part of the install",
            "record": str(self.actual),
            "compute": f"failed the compute check: {self.actual}",
        }
        return f"{self.path}: {messages[self.kind]}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, with the message (``cache verify --json``)."""
        return {
            "path": self.path,
            "kind": self.kind,
            "expected": self.expected,
            "actual": self.actual,
            "message": str(self),
        }


def _kind_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "a file" if stat.S_ISREG(mode) else "something else"


def scan_tree(root: Path) -> dict[str, os.stat_result]:
    """Every regular file and symlink under ``root`` -> its ``lstat``, by relative POSIX path.

    Symlinked folders are listed as links, never entered; the top-level ``install.json`` is
    left out (it cannot record itself), and so are the temporary files its atomic rewrites use
    (``install.json.<suffix>``), which a crash may leave.
    """
    out: dict[str, os.stat_result] = {}
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = f"{prefix}{entry.name}"
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    pending.append((Path(entry.path), f"{rel}/"))
                elif rel != INSTALL_JSON and not rel.startswith(_RECORD_TEMP):
                    out[rel] = st
    return dict(sorted(out.items()))


def _is_inside(rel: str) -> bool:
    """Whether the relative path ``rel`` stays inside its folder, written out (no links)."""
    # Plain string tests (every recorded file, on every cache hit), in both spellings: a record
    # must not escape with "/x", "\\x", "C:x" or ".." between either kind of separator.
    if not rel or rel[0] in "/\\" or rel[1:2] == ":":
        return False
    return ".." not in rel.replace("\\", "/").split("/")


def alternatives(name: str) -> list[str]:
    """``"ggml-rpc-server|rpc-server"`` -> both names: a manifest binary name's spellings."""
    return [n for n in name.split("|") if n]
