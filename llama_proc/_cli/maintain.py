"""``llama-proc pin``: for maintainers, pin every asset of a build into ``variants.toml``.

Only :mod:`argparse` and the shared flags (:mod:`llama_proc._cli.common`) are imported at load
time; the handler imports what it needs.
"""

from __future__ import annotations

from typing import Any

from llama_proc._cli.common import (
    Handler,
    add_command,
    add_settings_flags,
    field_type,
)


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
    p.set_defaults(handler=Handler("maintain:pin"))
