"""``llama-proc pin``: write a build's digests into variants.toml."""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import llama_proc
from llama_proc._cli.common import settings_from_args
from llama_proc.errors import ConfigError, ManifestError, OfflineError
from llama_proc.provision.fetch.pins import pin_manifest_text, pin_release
from llama_proc.provision.manifest import load_manifest

if TYPE_CHECKING:
    import argparse


def _manifest_path(args: argparse.Namespace) -> Path:
    if args.manifest:
        return Path(args.manifest).expanduser()
    # The manifest maintainers edit is the one at the top of the source checkout (beside
    # pyproject.toml); an installed wheel only has a packaged copy, which is no file to rewrite.
    top = Path(llama_proc.__file__).resolve().parents[1]
    origin = top / "variants.toml"
    if not (origin.is_file() and (top / "pyproject.toml").is_file()):
        msg = (
            "this llama-proc runs from an installed package, not a source checkout; pass "
            "--manifest PATH (the variants.toml of your checkout)"
        )
        raise ConfigError(msg)
    return origin


def pin(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.offline:
        msg = (
            "pin reads the release listing from the network, and offline mode is on "
            "(--offline or LLAMA_PROC_OFFLINE); run it online"
        )
        raise OfflineError(msg)
    path = _manifest_path(args)
    manifest = load_manifest(path)
    old = path.read_text(encoding="utf-8")
    pins = pin_release(args.pin_build, settings, manifest=manifest)
    new = pin_manifest_text(old, pins)
    pinned = sorted({name for names in pins.variants.values() for name in names})
    if not args.quiet:
        for variant_id, why in sorted(pins.unmatched.items()):
            _err(f"  not pinned: {variant_id}: {why}")
    if args.dry_run:
        sys.stdout.writelines(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                new.splitlines(keepends=True),
                fromfile=str(path),
                tofile=f"{path} (pinned)",
            )
        )
        return 0
    what = (
        f"{len(pinned)} assets of {len(pins.variants)} variants of {pins.build} "
        f"(commit {pins.commit[:12]}) from {pins.origin}"
    )
    if new == old:
        print(f"{path}: already pins {what}")
        return 0
    _write_atomically(path, new)
    print(f"{path}: pinned {what}")
    return 0


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a temporary file beside it, then one rename.

    A reader (or a crash) sees the old manifest or the new one, never half of each.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777)  # noqa: PTH101 - a str path from mkstemp
        os.replace(tmp, path)  # noqa: PTH105 - the commit point
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # noqa: PTH108
        msg = f"cannot write {path}: {err.strerror or err}; nothing was changed"
        raise ManifestError(msg) from err
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # noqa: PTH108
        raise


def _err(line: str) -> None:
    print(line, file=sys.stderr)
