"""``llama-proc fetch | which | list | cache | doctor``: provisioning from the command line.

The parsers only: what the commands do is in :mod:`llama_proc._cli.handlers`.
"""

from __future__ import annotations

from typing import Any

from llama_proc._cli.common import (
    PROVISION_FLAGS,
    Handler,
    add_command,
    add_settings_flags,
    field_type,
)

#: Tools ``doctor`` looks for on PATH (and in this interpreter's scripts folder).


def register(subparsers: Any) -> None:
    """Add the ``fetch``, ``which``, ``list``, ``cache`` and ``doctor`` commands."""
    p = add_command(
        subparsers,
        "fetch",
        help="make sure a verified llama-server for this host is installed; print its path",
        description=(
            "Walk the resolution ladder (explicit binary, bundled in the wheel, cache, prebuilt "
            "download, source build) and install what is missing. Prebuilt archives are "
            "sha256-verified, extracted atomically, smoke-checked with --version and proven to "
            "compute (a tiny generated model is served and its answer compared with a "
            "reference; CPU feature groups that crash are turned off). Prints the "
            "llama-server path on stdout and one line per ladder step on stderr."
        ),
    )
    add_settings_flags(p, *PROVISION_FLAGS, "prefer", "no_build", "cpu_off")
    p.add_argument(
        "--force",
        action="store_true",
        help="install again even if a usable install is bundled or cached (replaces it)",
    )
    p.add_argument(
        "--platform",
        type=_platform,
        metavar="OS-ARCH",
        help="fetch for another machine (linux-x86_64, linux-aarch64, macos-arm64, "
        "windows-x86_64, windows-arm64): the archives an install there gets (binary and CUDA "
        "runtime), verified and unpacked into --dest, never run here; needs --variant",
    )
    p.add_argument(
        "--dest",
        metavar="DIR",
        help="with --platform: the folder to unpack into (new, empty, or an earlier --dest)",
    )
    p.set_defaults(handler=Handler("provision:fetch"))

    p = add_command(
        subparsers,
        "which",
        help="print the path of the llama-server that would run (no download, no build)",
        description=(
            "Resolve llama-server without provisioning: explicit binary, bundled, then cache. "
            "Fails (exit 1) when none is installed; `llama-proc fetch` installs one."
        ),
    )
    add_settings_flags(p, *PROVISION_FLAGS)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print, on stderr, one line per ladder step saying what it found or why it "
        "was skipped",
    )
    p.set_defaults(handler=Handler("which:which"))

    p = add_command(
        subparsers,
        "list",
        help="list the variants for this host: which fit, why not, what is installed",
        description=(
            "Show every manifest variant for this host's platform, whether it can run here "
            "(and why not), whether its prebuilt archive fits, and which builds are installed."
        ),
    )
    add_settings_flags(p, *PROVISION_FLAGS)
    p.set_defaults(handler=Handler("provision:list_variants"))

    p = add_command(
        subparsers,
        "cache",
        help="inspect and clean the install cache",
        description="Show, list and clean llama-proc's cache of llama-server installs.",
    )
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    cache_sub.required = True
    c = add_command(cache_sub, "path", help="print the cache root folder")
    add_settings_flags(c, "cache_dir")
    c.set_defaults(handler=Handler("cache:cache_path"))
    c = add_command(cache_sub, "ls", help="list installs: id, source, version, size, date")
    add_settings_flags(c, "cache_dir")
    c.set_defaults(handler=Handler("cache:cache_ls"))
    c = add_command(cache_sub, "rm", help="remove one install")
    add_settings_flags(c, "cache_dir")
    c.add_argument(
        "install_id",
        metavar="ID",
        help="install to remove, as `cache ls` shows it (<build>/<variant>), or a variant "
        "folder name that only one build has",
    )
    c.set_defaults(handler=Handler("cache:cache_rm"))
    c = add_command(
        cache_sub,
        "prune",
        help="remove installs of other builds, their build folders, sources and toolkits, "
        "interrupted installs and partial downloads",
        description=(
            "Remove installs of builds other than the pinned one ($LLAMA_PROC_BUILD and --keep "
            "are kept too; installs a running process uses are kept on Linux), the CMake build "
            "folders, unpacked source trees and CUDA toolkits that no kept install came from "
            "(those of kept installs stay, so rebuilding them stays incremental), staging "
            "folders of interrupted installs, partial downloads and orphaned lock files. "
            "Anything in use (its lock held) is left alone."
        ),
    )
    add_settings_flags(c, "cache_dir")
    c.add_argument(
        "--keep",
        action="append",
        type=field_type("build"),
        default=[],
        metavar="bNNNN",
        help="also keep this build; repeatable",
    )
    c.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    c.set_defaults(handler=Handler("cache:cache_prune"))
    c = add_command(
        cache_sub,
        "verify",
        help="re-hash every file of every install against its install.json",
        description=(
            "Re-hash every file of every install against the sizes, times and sha256 digests "
            "its install.json recorded, and report each install as OK or what differs. Exits "
            "1 when an install is broken; `llama-proc fetch --force` re-installs it, `cache rm` "
            "removes it."
        ),
    )
    add_settings_flags(c, "cache_dir")
    c.add_argument("--json", action="store_true", help="print the findings as JSON")
    c.set_defaults(handler=Handler("cache:cache_verify"))

    p = add_command(
        subparsers,
        "doctor",
        help="report the host, what would be chosen and why, and the cache state",
        description=(
            "Print what llama-proc detects about this host (OS, libc, CPU features, NVIDIA "
            "driver and GPUs, Vulkan, Apple silicon), the variant it would choose and why, "
            "whether the prebuilt fits, what the resolution ladder finds without downloading, "
            "the cache contents and the build tools on PATH."
        ),
    )
    add_settings_flags(p, *PROVISION_FLAGS)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="also start the resolved llama-server with a small real model and check it "
        "answers a chat completion (downloads the model once)",
    )
    p.set_defaults(handler=Handler("doctor:doctor"))


# ----------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------- handlers
def _platform(text: str) -> str:
    """Argparse type for ``--platform``: checked as the library checks it."""
    import argparse

    from llama_proc.errors import ConfigError
    from llama_proc.provision.fetch.prebuilt import parse_platform

    try:
        return parse_platform(text).platform
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
