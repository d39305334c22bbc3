"""A complete llama-server install and its ``install.json``: what an install *is*.

Reading one is cheap (no downloads, archives or host probes are imported), because every cache
hit ends here. Making one is :mod:`~llama_proc.provision.installer`'s job; where installs live
is :mod:`~llama_proc.provision.layout`'s.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import BinaryNotFoundError, ProvisionError
from llama_proc.provision.layout import INSTALL_JSON

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["INSTALL_SCHEMA", "Install", "alternatives", "complete_install"]

logger = logging.getLogger(__name__)

INSTALL_SCHEMA: Final = 1
"""The ``schema`` written into every ``install.json``."""
_ALIASES: Final = {"rpc-server": "ggml-rpc-server|rpc-server"}
"""Names callers may use for binaries that upstream renamed."""


def alternatives(name: str) -> list[str]:
    """``"ggml-rpc-server|rpc-server"`` -> both names: a manifest binary name's spellings."""
    return [n for n in name.split("|") if n]


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
        """Binaries recorded in ``install.json`` that are no longer on disk."""
        return [name for name, path in self.binaries.items() if not path.is_file()]

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
            binaries = {
                str(name): path / (entry["path"] if isinstance(entry, dict) else str(entry))
                for name, entry in (binaries_raw or {}).items()
            }
            variant_id, build, source = (str(data[k]) for k in ("variant_id", "build", "source"))
        except (KeyError, TypeError, AttributeError) as err:
            msg = f"{record} lacks {err}; remove the install and retry"
            raise ProvisionError(msg) from err
        if not any("llama-server" in alternatives(k) for k in binaries):
            msg = f"{record} names no llama-server binary; remove the install and retry"
            raise ProvisionError(msg)
        return cls(path, variant_id, build, source, binaries, data)


def complete_install(target: Path) -> Install | None:
    """The install at ``target`` if it is complete and has all its binaries, else None."""
    if not (target / INSTALL_JSON).is_file():
        return None
    try:
        install = Install.from_dir(target)
    except ProvisionError as err:
        logger.warning("%s; reinstalling", err)
        return None
    missing = install.missing_files()
    if missing:
        logger.warning("install %s lost %s; reinstalling", target, ", ".join(missing))
        return None
    return install
