"""A complete llama-server install and its ``install.json``: what an install *is*.

Reading one is cheap (no downloads, archives or host probes are imported), because every cache
hit ends here. Making one is :mod:`~llama_proc.provision.cache.installer`'s job; where installs live
is :mod:`~llama_proc.provision.cache.layout`'s.

``install.json`` records every file of the install under ``file_records`` (relative path ->
size, mtime_ns and sha256, or the target of a symlink). :meth:`Install.problems` compares the
cheap facts (one ``lstat`` per file, no reading): a truncated binary, a deleted or replaced
library makes the install broken, and the installer replaces it. Re-hashing everything is
``llama-proc cache verify``'s job (:func:`~llama_proc.provision.cache.checkup.verify_installs`).
Installs made before file records existed have none: only their binaries are checked.
Every path ``install.json`` names must stay inside the install folder, lexically and after
following symlinks; one that leaves it makes the install broken, never followed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import BinaryNotFoundError, ProvisionError
from llama_proc.provision.cache.file_record import (
    FileProblem,
    FileRecord,
    ProblemKind,
    _is_inside,
    _kind_of,
    alternatives,
    scan_tree,
)
from llama_proc.provision.cache.layout import INSTALL_JSON

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "COMPUTE_KEY",
    "FILES_KEY",
    "INSTALL_SCHEMA",
    "FileProblem",
    "FileRecord",
    "Install",
    "ProblemKind",
    "alternatives",
    "check_install",
    "complete_install",
    "compute_summary",
    "restamp",
    "scan_tree",
]

logger = logging.getLogger(__name__)

INSTALL_SCHEMA: Final = 1
"""The ``schema`` written into every ``install.json``."""
COMPUTE_KEY: Final = "compute_check"
"""The ``install.json`` key of the compute record (absent in installs made before it existed:
they are checked once, on first use)."""
FILES_KEY: Final = "file_records"
"""The ``install.json`` key recording every file (absent in installs made before it existed)."""
_ALIASES: Final = {"rpc-server": "ggml-rpc-server|rpc-server"}
"""Names callers may use for binaries that upstream renamed."""


@dataclass(frozen=True)
class Install:
    """A complete llama-server install: a folder with binaries and an ``install.json``."""

    path: Path
    variant_id: str
    build: str
    source: str
    """An :class:`~llama_proc.vocab.InstallSource` value."""
    binaries: Mapping[str, Path] = field(hash=False)
    """Manifest binary name (``ggml-rpc-server|rpc-server``) -> absolute path."""
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Everything ``install.json`` says (empty for an explicit binary)."""
    files: Mapping[str, FileRecord] | None = field(default=None, hash=False)
    """Every file at install time, by relative path; None for installs that predate records."""

    @property
    def server_binary(self) -> Path:
        """The ``llama-server`` executable."""
        return self.binary("llama-server")

    @property
    def id(self) -> str:
        """``<build>/<folder>``: how ``llama-proc cache rm`` names a cache install."""
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def version(self) -> str | None:
        """The ``version:`` line ``--version`` printed at install time."""
        value = self.metadata.get("version")
        return value if isinstance(value, str) else None

    @property
    def compute(self) -> Mapping[str, Any] | None:
        """The compute check's record (None: made before the check existed, or never run)."""
        value = self.metadata.get(COMPUTE_KEY)
        return value if isinstance(value, dict) else None

    def binary(self, name: str) -> Path:
        """The executable called ``name``; ``rpc-server`` also finds ``ggml-rpc-server``.

        Raises:
            BinaryNotFoundError: the install does not provide it.
        """
        if name in self.binaries:
            return self.binaries[name]
        wanted = alternatives(_ALIASES.get(name, name))
        for key, path in self.binaries.items():
            if set(alternatives(key)) & set(wanted):
                return path
        # Explicit binaries have no manifest list: look beside llama-server.
        server = self.binaries.get("llama-server")
        suffix = ".exe" if server is not None and server.suffix.lower() == ".exe" else ""
        for alt in wanted:
            for folder in (self.path, self.path / "bin"):
                candidate = folder / f"{alt}{suffix}"
                if candidate.is_file():
                    return candidate
        have = ", ".join(sorted(self.binaries)) or "nothing"
        hint = " (fetch the rpc variant: llama-proc fetch --variant rpc)" if "rpc" in name else ""
        msg = f"{name} is not part of the install at {self.path} (it has {have}){hint}"
        raise BinaryNotFoundError(msg)

    def missing_files(self) -> list[str]:
        """Binaries recorded in ``install.json`` that are no longer on disk inside the install."""
        root = self.path.resolve()
        return [
            name
            for name, path in self.binaries.items()
            if self._binary_problem(root, path) is not None
        ]

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.path).as_posix()
        except ValueError:
            return str(path)

    def _binary_problem(self, root: Path, path: Path) -> FileProblem | None:
        """A binary must be a file once its links are followed, and stay inside ``root``."""
        rel = self._relative(path)
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, a dangling link or a link loop
            return FileProblem(rel, "missing")
        if real != root and root not in real.parents:
            return FileProblem(rel, "outside", actual=str(real))
        if not real.is_file():
            return FileProblem(rel, "type", expected="a file", actual="something else")
        return None

    def problems(self, rehashed: list[str] | None = None) -> list[FileProblem]:
        """What differs from ``install.json``, by the cheap facts, and what should not be there.

        Every binary must resolve to a file inside the install; every recorded file must be
        there with its recorded kind, size and mtime; a file whose change time or inode moved
        since it was recorded (an edit that put the size and mtime back, a replaced file) is
        re-hashed, and only then; a file the record does not list (a planted library that
        ggml's loader would pick up) makes the install broken too, as does a failed compute
        check recorded on first use. One directory walk and one ``lstat`` per file: ``cache
        verify`` re-hashes everything. An install without file records is checked by its
        binaries only.

        Args:
            rehashed: gets the files that were re-hashed and found unchanged (their record's
                change time can be renewed, :func:`restamp`).

        Returns:
            One problem per damaged file, binaries first; empty when the install is intact.
        """
        root = self.path.resolve()
        found = [p for p in (self._binary_problem(root, b) for b in self.binaries.values()) if p]
        computed = self.compute
        if computed is not None and computed.get("ok") is False:
            found.append(FileProblem(INSTALL_JSON, "compute", actual=str(computed.get("reason"))))
        if self.files is None:
            return found
        seen = {p.path for p in found}
        try:
            on_disk = scan_tree(self.path)
        except OSError as err:
            return [*found, FileProblem(".", "missing", actual=str(err))]
        for rel, record in self.files.items():
            if rel in seen:
                continue
            st = on_disk.get(rel)
            if st is None:
                found.append(FileProblem(rel, "missing"))
                continue
            was = "a symlink" if record.link is not None else "a file"
            if _kind_of(st.st_mode) != was:
                found.append(FileProblem(rel, "type", was, _kind_of(st.st_mode)))
            elif st.st_size != record.size:
                found.append(FileProblem(rel, "size", record.size, st.st_size))
            elif st.st_mtime_ns != record.mtime_ns:
                found.append(FileProblem(rel, "mtime", record.mtime_ns, st.st_mtime_ns))
            elif record.sha256 is not None and not record.same_identity(st):
                if _sha256(self.path / rel) != record.sha256:
                    found.append(FileProblem(rel, "sha256", record.sha256))
                elif rehashed is not None:
                    rehashed.append(rel)
        found.extend(FileProblem(rel, "extra") for rel in on_disk if rel not in self.files)
        return found

    @classmethod
    def from_dir(cls, path: Path) -> Install:
        """Read the install at ``path``.

        Raises:
            ProvisionError: ``install.json`` is missing, unreadable or malformed.
        """
        path = Path(path)
        record = path / INSTALL_JSON
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except FileNotFoundError:
            msg = f"{path} is not a complete llama-server install (no {INSTALL_JSON})"
            raise ProvisionError(msg) from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            msg = f"cannot read {record}: {err}; remove the install (llama-proc cache rm) and retry"
            raise ProvisionError(msg) from err
        if not isinstance(data, dict):
            msg = f"{record} is not a JSON object; remove the install and retry"
            raise ProvisionError(msg)
        binaries_raw = data.get("binaries")
        try:
            relative = {
                str(name): str(entry["path"] if isinstance(entry, dict) else entry)
                for name, entry in (binaries_raw or {}).items()
            }
            variant_id, build, source = (str(data[k]) for k in ("variant_id", "build", "source"))
        except (KeyError, TypeError, AttributeError) as err:
            msg = f"{record} lacks {err}; remove the install and retry"
            raise ProvisionError(msg) from err
        if not any("llama-server" in alternatives(k) for k in relative):
            msg = f"{record} names no llama-server binary; remove the install and retry"
            raise ProvisionError(msg)
        files = _parse_files(record, data.get(FILES_KEY))
        for what, rel in [*relative.items(), *((f"file {r!r}", r) for r in files or {})]:
            if not _is_inside(rel):
                msg = (
                    f"{record} puts {what} at {rel!r}, outside the install folder; remove the "
                    "install (llama-proc cache rm) and retry"
                )
                raise ProvisionError(msg)
        binaries = {name: path / rel for name, rel in relative.items()}
        return cls(path, variant_id, build, source, binaries, data, files)


def _parse_files(record: Path, raw: object) -> dict[str, FileRecord] | None:
    if raw is None:
        return None
    parsed = (
        {str(k): FileRecord.from_json(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    )
    files = {rel: entry for rel, entry in parsed.items() if entry is not None}
    if not isinstance(raw, dict) or len(files) != len(parsed):
        msg = (
            f"{record} has an unusable {FILES_KEY!r} record (each file needs an integer size "
            "and mtime_ns); remove the install and retry"
        )
        raise ProvisionError(msg)
    return files


def _sha256(path: Path) -> str | None:
    # Reached only for a file whose change time moved: the download stack is not imported on
    # an ordinary cache hit.
    from llama_proc.provision.fetch.download import file_sha256  # noqa: PLC0415

    try:
        return file_sha256(path)
    except OSError:
        return None


def restamp(install: Install, rels: list[str], lock_timeout: float) -> None:
    """Renew the change time and inode recorded for ``rels`` (re-hashed and found unchanged).

    Under the install's lock, ``install.json`` is rewritten atomically, so a copied or
    re-permissioned install is re-hashed once, not on every use. Best effort: a read-only
    cache keeps re-hashing.
    """
    from llama_proc.provision.cache.locking import cache_lock, lock_path  # noqa: PLC0415

    try:
        with cache_lock(lock_path(install.path), lock_timeout):
            target = install.path / INSTALL_JSON
            data = json.loads(target.read_text(encoding="utf-8"))
            records = data.get(FILES_KEY)
            if not isinstance(records, dict):
                return
            for rel in rels:
                entry = records.get(rel)
                if isinstance(entry, dict):
                    st = os.lstat(install.path / rel)
                    entry["ctime_ns"], entry["ino"] = st.st_ctime_ns, st.st_ino
            temp = install.path / f"{INSTALL_JSON}.restamp"
            temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            temp.replace(target)
    except (OSError, ValueError, ProvisionError) as err:
        logger.debug("could not renew the file records of %s: %s", install.path, err)


def compute_summary(record: Mapping[str, Any] | None) -> str:
    """One line on an install's compute check, for ``which -v`` and ``doctor``."""
    if record is None:
        return "not checked yet (checked once, on its first use)"
    reason = str(record.get("reason") or "?")
    off = record.get("features_off") or []
    if off:
        reason += f"; CPU feature groups off: {', '.join(map(str, off))}"
    buffers = record.get("buffers") or []
    if buffers:
        reason += f"; weights in {', '.join(map(str, buffers))}"
    return reason if record.get("ok") is not False else f"FAILED: {reason}"


def check_install(target: Path) -> tuple[Install | None, list[FileProblem]]:
    """Read the install at ``target`` and check it by the cheap facts (:meth:`Install.problems`).

    Returns:
        ``(None, [])`` when there is no complete install (no ``install.json``);
        ``(None, [record problem])`` when ``install.json`` cannot be used (unreadable, or a
        path outside the folder); else the install and its problems (empty: intact).
    """
    if not (target / INSTALL_JSON).is_file():
        return None, []
    try:
        install = Install.from_dir(target)
    except ProvisionError as err:
        return None, [FileProblem(INSTALL_JSON, "record", actual=str(err))]
    return install, install.problems()


def complete_install(target: Path) -> Install | None:
    """The install at ``target`` if it is complete and intact, else None (a broken one too)."""
    install, problems = check_install(target)
    if install is None or problems:
        if problems:
            logger.debug("install %s is broken: %s", target, "; ".join(map(str, problems)))
        return None
    return install
