"""``llama-proc pin``: for maintainers, pin every asset of a build into ``variants.toml``.

Only :mod:`argparse` and the shared flags (:mod:`llama_proc._cli.common`) are imported at load
time; the handler imports what it needs.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from llama_proc._cli.common import add_command, add_settings_flags, field_type, settings_from_args

if TYPE_CHECKING:
    import argparse
    from pathlib import Path


def register(subparsers: Any) -> None:
    """Add the ``pin`` command."""
    p = add_command(
        subparsers,
        "pin",
        help="maintainers: pin sha256 and size of every asset of a build into variants.toml",
        description=(
            "Read the release listing of a build from GitHub's API (or --mirror, which must be "
            "https or on this machine), and write the commit of its tag and the sha256 and size "
            "of every archive each variant installs (binary and runtime twins) into "
            "variants.toml, atomically. Comments and everything else in the file stay as "
            "written. Needs the network."
        ),
    )
    p.add_argument(
        "--build",
        dest="pin_build",
        type=field_type("build"),
        metavar="bNNNN|vX.Y.Z|latest",
        help="the release to pin; a release tag or latest pins the bNNNN build it names "
        "(default: the build variants.toml names; the file must name this build)",
    )
    p.add_argument(
        "--manifest",
        metavar="PATH",
        help="the variants.toml to rewrite (default: the one of this source checkout)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the change as a unified diff and write nothing",
    )
    add_settings_flags(p, "mirror", "offline")
    p.set_defaults(handler=_pin)


def _manifest_path(args: argparse.Namespace) -> Path:
    from pathlib import Path

    import llama_proc
    from llama_proc.errors import ConfigError

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


def _pin(args: argparse.Namespace) -> int:
    import difflib

    from llama_proc.errors import OfflineError
    from llama_proc.provision.fetch.pins import pin_manifest_text, pin_release
    from llama_proc.provision.manifest import load_manifest

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
    import contextlib
    import os
    import tempfile

    from llama_proc.errors import ManifestError

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
