"""Remembered plans: which variant and build the ladder looks for, without re-deriving it.

Choosing the variant means parsing the manifest and probing the host (libc, CPU features,
NVIDIA and Vulkan libraries): most of the time ``llama-proc which`` would spend on a cache hit.
The answer only changes when one of its inputs does, so it is kept in
``servers/.resolved.json`` under a key built from all of them:

* the settings that choose it (``backend``, ``build``);
* the manifest file's identity (path, size, modification time) and llama-proc's version;
* a cheap host fingerprint (:func:`host_fingerprint`): kernel, boot, device nodes, the NVIDIA
  driver version, the dynamic loader's cache, and the environment the probes read. Only Linux
  has one; elsewhere every call takes the full path.

Only the *plan* is remembered (variant id, build and the selection's reasoning lines); the
bundled and cache steps still look at the disk every time, so a removed or replaced install is
never answered from memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._version import __version__
from llama_proc.provision.cache.layout import servers_dir

if TYPE_CHECKING:
    from llama_proc.config import Settings
    from llama_proc.provision.views import CacheView

__all__ = ["MEMO_FILE", "Target", "host_fingerprint", "recall", "remember"]

logger = logging.getLogger(__name__)

MEMO_FILE: Final = ".resolved.json"
"""In ``servers/``, beside the build folders (a hidden file, so listings skip it)."""
MEMO_SCHEMA: Final = 1
MAX_ENTRIES: Final = 16
"""Plans kept (one per combination of settings, manifest and host seen lately)."""
MANIFEST_NAME: Final = "variants.toml"
BOOT_ID_FILE: Final = "/proc/sys/kernel/random/boot_id"
NVIDIA_VERSION_FILE: Final = "/proc/driver/nvidia/version"
LOADER_CACHE: Final = "/etc/ld.so.cache"
WSL_DRIVER_DIR: Final = "/usr/lib/wsl/lib"
DEVICE_DIR: Final = "/dev"
PROBE_ENV: Final = (
    "PATH",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "VK_ICD_FILENAMES",
    "VK_DRIVER_FILES",
)
"""Variables host detection reads (tool and library lookup, visible GPUs, Vulkan drivers)."""
_READ_LIMIT: Final = 4096


@dataclass(frozen=True)
class Target:
    """What the ladder looks for: the selected variant, the build and the selection's reasons."""

    variant_id: str
    build: str
    why: tuple[str, ...]
    """The selection's reasoning, one line each (printed as ``select:`` steps)."""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:  # noqa: PTH123
            return fh.read(_READ_LIMIT)
    except OSError:
        return ""


def _stat(path: str | Path) -> list[int] | None:
    try:
        st = os.stat(path)  # noqa: PTH116
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def host_fingerprint() -> str | None:
    """A digest of what host detection depends on, or None where none is known (non-Linux).

    It is read without loading a library or running a program. A reboot, a loaded or unloaded driver (its device nodes), a driver update, an installed or
    removed library (the loader cache) or a different environment each give a new value.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        devices = sorted(p.name for p in Path(DEVICE_DIR).iterdir())
    except OSError:
        devices = []
    musl = [name for name in _listdir("/lib") if name.startswith("ld-musl-")]
    facts: dict[str, Any] = {
        "uname": list(os.uname()),
        "bits": sys.maxsize > 2**32,
        "boot": _read(BOOT_ID_FILE).strip(),
        "devices": devices,
        "nvidia": _read(NVIDIA_VERSION_FILE),
        "loader": _stat(LOADER_CACHE),
        "musl": [_stat(f"/lib/{name}") for name in musl],
        "wsl": _stat(WSL_DRIVER_DIR),
        "libc": _confstr("CS_GNU_LIBC_VERSION"),
        "env": {name: os.environ.get(name) for name in PROBE_ENV},
    }
    return _digest(facts)


def _listdir(folder: str) -> list[str]:
    try:
        return [p.name for p in Path(folder).iterdir()]
    except OSError:
        return []


def _confstr(name: str) -> str | None:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.confstr(name)
    return None


def _digest(data: Any) -> str:
    # Two 32-bit checksums, not hashlib (whose import costs more than this whole lookup): the
    # key only tells a handful of remembered plans apart, it guards against nothing.
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return f"{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}"


def _manifest_file() -> Path | None:
    """The shipped manifest file, where ``load_manifest()`` finds it.

    Inside the package, else at the top of a source checkout.
    """
    package = Path(__file__).resolve().parents[2]  # llama_proc/provision/cache/memo.py
    for candidate in (package / MANIFEST_NAME, package.parent / MANIFEST_NAME):
        if candidate.is_file():
            return candidate
    return None


def _key(settings: Settings) -> str | None:
    host = host_fingerprint()
    manifest = _manifest_file()
    if host is None or manifest is None:
        return None
    return _digest(
        {
            "schema": MEMO_SCHEMA,
            "llama_proc": __version__,
            "backend": settings.variant,
            "build": settings.build,
            "manifest": [str(manifest), _stat(manifest)],
            "host": host,
        }
    )


def _memo_path(settings: CacheView) -> Path:
    return servers_dir(settings) / MEMO_FILE


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("schema") != MEMO_SCHEMA:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def recall(settings: Settings) -> Target | None:
    """The plan remembered for ``settings`` on this host and manifest, if any.

    Never raises: an unreadable or foreign memo is no memo.
    """
    key = _key(settings)
    if key is None:
        return None
    entry = _load(_memo_path(settings)).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        target = Target(
            str(entry["variant_id"]), str(entry["build"]), tuple(str(w) for w in entry["why"])
        )
    except (KeyError, TypeError):
        return None
    logger.debug("plan from %s: %s %s", _memo_path(settings), target.variant_id, target.build)
    return target


def remember(settings: Settings, target: Target) -> None:
    """Keep ``target`` as the plan for ``settings`` on this host and manifest.

    Written only into an existing ``servers/`` folder (a read-only command does not create
    the cache), atomically, and never raising: a cache that cannot be written is only slower.
    """
    key = _key(settings)
    path = _memo_path(settings)
    if key is None or not path.parent.is_dir():
        return
    entries = _load(path)
    entries.pop(key, None)
    entries[key] = {"variant_id": target.variant_id, "build": target.build, "why": target.why}
    # Oldest first (insertion order): keep the newest few.
    kept = dict(list(entries.items())[-MAX_ENTRIES:])
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"schema": MEMO_SCHEMA, "entries": kept}), encoding="utf-8")
        tmp.replace(path)
    except OSError as err:
        logger.debug("cannot write %s: %s", path, err)
        with contextlib.suppress(OSError):
            tmp.unlink()
