"""``llama-proc fetch | which | list | cache | doctor``: provisioning from the command line.

Only :mod:`argparse` and the shared flags (:mod:`llama_proc._cli.common`) are imported at load
time; each handler imports what it needs.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Final, TextIO

from llama_proc._cli.common import (
    PROVISION_FLAGS,
    add_command,
    add_settings_flags,
    field_type,
    settings_from_args,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Collection, Sequence

    from llama_proc.config import Settings
    from llama_proc.provision.cache.install import Install
    from llama_proc.provision.host.platform import HostInfo
    from llama_proc.provision.host.selection import Blocker, Selection
    from llama_proc.provision.manifest import Manifest

_MB: Final = 1024 * 1024
#: Tools ``doctor`` looks for on PATH (and in this interpreter's scripts folder).
BUILD_TOOLS: Final = ("cmake", "ninja", "cc", "c++", "cl", "nvcc", "ccache", "git")


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
    p.set_defaults(handler=_fetch)

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
    p.set_defaults(handler=_which)

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
    p.set_defaults(handler=_list)

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
    c.set_defaults(handler=_cache_path)
    c = add_command(cache_sub, "ls", help="list installs: id, source, version, size, date")
    add_settings_flags(c, "cache_dir")
    c.set_defaults(handler=_cache_ls)
    c = add_command(cache_sub, "rm", help="remove one install")
    add_settings_flags(c, "cache_dir")
    c.add_argument(
        "install_id",
        metavar="ID",
        help="install to remove, as `cache ls` shows it (<build>/<variant>), or a variant "
        "folder name that only one build has",
    )
    c.set_defaults(handler=_cache_rm)
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
    c.set_defaults(handler=_cache_prune)
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
    c.set_defaults(handler=_cache_verify)

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
    p.set_defaults(handler=_doctor)


# ----------------------------------------------------------------------------- helpers
def _explain(
    lines: Sequence[str], *, skip: Collection[str] = (), out: TextIO | None = None
) -> None:
    """Print explanation lines, indented, to ``out`` (stderr).

    Args:
        lines: what the resolver explained; its rungs are
            :class:`~llama_proc.provision.explain.Step` objects, read by field, never by text.
        skip: rungs (:class:`~llama_proc.provision.explain.StepName`) to leave out.
        out: where to print; stderr when None.
    """
    from llama_proc.provision.explain import Step

    for line in lines:
        if not (isinstance(line, Step) and line.step in skip):
            print(f"  {line}", file=out or sys.stderr)


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _size(num: object) -> str:
    return f"{num / _MB:.1f} MB" if isinstance(num, int) else "?"


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


def _fetch_for_platform(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llama_proc.errors import ConfigError
    from llama_proc.provision.fetch.prebuilt import fetch_for_platform

    if args.platform is None or args.dest is None:
        msg = (
            "--platform and --dest go together: pass both "
            "(e.g. --platform windows-x86_64 --dest DIR)"
        )
        raise ConfigError(msg)
    settings = settings_from_args(args)
    done = fetch_for_platform(settings, args.platform, Path(args.dest), force=args.force)
    install = done.install
    if not args.quiet:
        state = "fetched" if done.made else "already there:"
        what = f"{install.variant_id} {install.build} for {args.platform}"
        _err(f"  {state} {what} into {install.path} (not run here)")
    print(install.server_binary)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from llama_proc.provision.resolve import ensure_server

    if args.platform is not None or args.dest is not None:
        return _fetch_for_platform(args)
    settings = settings_from_args(args)
    explain: list[str] = []
    try:
        install = ensure_server(settings, force=args.force, explain=explain)
    finally:
        if not args.quiet:
            _explain(explain)
    if not args.quiet:
        _explain([_compute_line(install)])
    print(install.server_binary)
    return 0


def _compute_line(install: Install) -> str:
    """What the compute check said of the install in use (explicit binaries are never run)."""
    from llama_proc.provision.cache.install import compute_summary

    if not install.metadata:
        return "compute: not checked (an explicit binary is used as it is)"
    return f"compute: {compute_summary(install.compute)}"


def _attestation_line(install: Install) -> str:
    """What the build-provenance attestation check said of the install in use."""
    found = install.metadata.get("attestation") if install.metadata else None
    if not isinstance(found, dict):
        if install.source != "prebuilt":
            return "attestation: none (only release archives are attested)"
        return "attestation: not checked (installed before attestations were checked)"
    state = found.get("state")
    if state == "absent":
        return "attestation: absent (the release serves none for this archive; sha256 only)"
    return f"attestation: {state} ({found.get('detail') or 'no detail'})"


def _which(args: argparse.Namespace) -> int:
    import contextlib

    from llama_proc.errors import LlamaProcError
    from llama_proc.provision.explain import Step, StepName
    from llama_proc.provision.resolve import plan, resolve_server

    settings = settings_from_args(args)
    explain: list[str] = []
    if not args.verbose:
        print(resolve_server(settings, explain=explain, provision=False).server_binary)
        return 0
    res = None
    if settings.server_binary is None:
        # On error the resolver raises the same error below, after the steps are printed.
        with contextlib.suppress(LlamaProcError):
            res = plan(settings)
    try:
        # The plan's host and manifest, so the ladder looks for what the chain printed.
        install = resolve_server(
            settings,
            explain=explain,
            provision=False,
            host=res.host if res else None,
            manifest=res.manifest if res else None,
        )
    finally:
        if res is None:
            _explain(explain)
        else:
            # The chain replaces the selection's reasoning lines, where they stood.
            chain = [f"select: {line}" for line in _chain_lines(res.selection, settings.backend)]
            at = next(
                (
                    i
                    for i, s in enumerate(explain)
                    if isinstance(s, Step) and s.step == StepName.SELECT
                ),
                len(explain),
            )
            _explain([*explain[:at], *chain, *explain[at:]], skip=(StepName.SELECT,))
    _explain([_compute_line(install), _attestation_line(install)])
    print(install.server_binary)
    return 0


def _chain_lines(selection: Selection, requested: str) -> list[str]:
    """The variants the selection considered: why each was skipped, and the one it took.

    Read from :attr:`Selection.candidates` and their :class:`Blocker` kinds and texts, never
    from the selection's reasoning lines.
    """
    from llama_proc.provision.host.selection import AUTO_CHAIN
    from llama_proc.vocab import AUTO

    auto = requested == AUTO
    lines = [f"auto chain: {' -> '.join(AUTO_CHAIN)}" if auto else f"requested: {requested}"]
    chosen = None
    for candidate in selection.candidates:
        if candidate.variant is selection.variant:
            chosen = candidate
        else:
            lines.append(f"skip {candidate.variant.id}: {_reasons(candidate.blockers)}")
    how = "the first in the chain with nothing against it"
    if not auto:
        how = f"requested with --variant {requested}"
    lines.append(f"use {selection.variant.id}: {how}")
    lines.extend(f"warning: {b.text} [{b.kind}]" for b in (chosen.blockers if chosen else ()))
    return lines


def _reasons(blockers: Sequence[Blocker]) -> str:
    return "; ".join(f"{b.text} [{b.kind}]" for b in blockers) or "passed over"


def _installed_by_variant(settings: Settings) -> dict[str, list[Install]]:
    from llama_proc.provision.cache.inventory import list_installs

    out: dict[str, list[Install]] = {}
    for install in list_installs(settings):
        out.setdefault(install.variant_id, []).append(install)
    return out


def _list(args: argparse.Namespace) -> int:
    from llama_proc.errors import NoMatchingVariantError
    from llama_proc.provision.host.platform import detect_host
    from llama_proc.provision.host.selection import (
        prebuilt_problems,
        runtime_problems,
        select_variant,
    )
    from llama_proc.provision.manifest import load_manifest

    settings = settings_from_args(args)
    manifest = load_manifest()
    host = detect_host(gpu_details=False)
    build = settings.build or manifest.build
    variants = manifest.for_platform(host.os, host.arch)
    try:
        chosen: str | None = select_variant(manifest, host, settings.backend).variant.id
    except NoMatchingVariantError as err:
        chosen = None
        _err(f"no variant is chosen: {err}")
    installed = _installed_by_variant(settings)
    print(f"variants for {host.platform} (build {build}; host: {host.summary()}):")
    if not variants:
        print("  none: set LLAMA_PROC_SERVER_BIN to a llama-server you built yourself")
    width = max((len(v.id) for v in variants), default=0)
    for v in variants:
        mark = "*" if v.id == chosen else " "
        problems = runtime_problems(v, host)
        fits = "runs here" if not problems else "cannot run here: " + _reasons(problems)
        blockers = prebuilt_problems(v, host)
        if not v.has_prebuilt:
            prebuilt = "prebuilt: none upstream (source build)"
        elif blockers and not problems:
            prebuilt = "prebuilt: no (" + _reasons(blockers) + "), source build"
        elif blockers:
            prebuilt = "prebuilt: no"
        else:
            prebuilt = "prebuilt: yes"
        print(f"{mark} {v.id:<{width}}  {fits}; {prebuilt}")
        for install in installed.get(v.id, []):
            print(f"  {'':<{width}}  installed: {install.id} ({install.source}, {install.version})")
    print("(* = what --variant " + settings.backend + " picks)")
    return 0


def _cache_path(args: argparse.Namespace) -> int:
    print(settings_from_args(args).cache_dir)
    return 0


def _cache_ls(args: argparse.Namespace) -> int:
    from llama_proc.provision.cache.inventory import list_installs

    settings = settings_from_args(args)
    installs = list_installs(settings)
    if not installs:
        _err(f"no installs in {settings.cache_dir}")
        return 0
    width = max(len(i.id) for i in installs)
    for i in installs:
        created = str(i.metadata.get("created", "?"))[:19].replace("T", " ")
        version = i.version or "?"
        print(
            f"{i.id:<{width}}  {i.source:<8}  {_size(i.metadata.get('size')):>9}  {created}  {version}"
        )
    return 0


def _cache_rm(args: argparse.Namespace) -> int:
    from llama_proc.provision.cache.inventory import remove

    print(f"removed {remove(settings_from_args(args), args.install_id)}")
    return 0


def _cache_verify(args: argparse.Namespace) -> int:
    import json

    from llama_proc.provision.cache.inventory import verify_installs

    settings = settings_from_args(args)
    reports = verify_installs(settings)
    broken = [r for r in reports if not r.ok]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    elif not reports:
        _err(f"no installs in {settings.cache_dir}")
    for r in [] if args.json else reports:
        if not r.ok:
            print(f"{r.id}: BROKEN")
            for problem in r.problems:
                print(f"  {problem}")
        elif r.files is None:
            print(f"{r.id}: OK (no file records: made by an older llama-proc; binaries only)")
        else:
            print(f"{r.id}: OK ({r.files} files)")
    if broken:
        removals = ", ".join(f"`llama-proc cache rm {r.id}`" for r in broken)
        _err(
            f"{len(broken)} broken install(s): re-install with `llama-proc fetch --force` (with "
            f"the --variant and --build it was made for), or remove with {removals}"
        )
        return 1
    return 0


def _cache_prune(args: argparse.Namespace) -> int:
    from llama_proc.provision.cache.inventory import prune

    removed = prune(settings_from_args(args), keep_builds=args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"{verb} {path}")
    if not removed:
        _err("nothing to prune")
    return 0


def _host_lines(host: HostInfo) -> list[str]:
    from llama_proc.provision.host.platform import LLAMA_CPU_FEATURES

    cpu = [f for f in LLAMA_CPU_FEATURES if f in host.cpu_features]
    lines = [
        f"host: {host.summary()}",
        f"  os: {host.os} {host.os_version or '?'}" + (" (WSL)" if host.wsl else ""),
        f"  arch: {host.arch}" + (" (Rosetta 2 translation)" if host.rosetta else ""),
    ]
    if host.os == "linux":
        lines.append(f"  libc: {host.libc or 'unknown'} {host.libc_version or ''}".rstrip())
    lines.append(f"  cpu: {host.cpu_count} cores; features: {' '.join(cpu) or 'none detected'}")
    if host.nvidia_driver or host.cuda_version:
        lines.append(
            f"  nvidia: driver {host.nvidia_driver or '?'}, CUDA {host.cuda_version or '?'}"
        )
        caps = list(host.compute_capabilities) + ["?"] * len(host.gpus)
        lines.extend(
            f"    gpu: {name} (compute capability {cc})"
            for name, cc in zip(host.gpus, caps, strict=False)
        )
    else:
        lines.append("  nvidia: no driver found")
    lines.append(f"  vulkan loader: {'yes' if host.vulkan else 'no'}")
    if host.os == "macos":
        lines.append(f"  apple silicon: {'yes' if host.apple_silicon else 'no'}")
    lines.extend(f"  note: {note}" for note in host.notes)
    return lines


def _tool_lines() -> list[str]:
    import shutil
    import sysconfig

    scripts = sysconfig.get_path("scripts")
    found: list[str] = []
    for tool in BUILD_TOOLS:
        path = shutil.which(tool) or shutil.which(tool, path=scripts)
        if path:
            found.append(f"{tool}={path}")
    return ["build tools: " + (", ".join(found) if found else "none found on PATH")]


def _cuda_toolkit_line(host: HostInfo, manifest: Manifest) -> str:
    """Which CUDA toolkit a CUDA source build here would use, and why."""
    from llama_proc.provision.compile.toolchain import choose_cuda_toolkit

    choice = choose_cuda_toolkit(
        host, manifest.cuda_toolkits, os_name=host.os, arch=host.arch
    ).as_dict()
    version = f" {choice['version']}" if choice["version"] else ""
    return f"CUDA toolkit for source builds: {choice['source']}{version} ({choice['reason']})"


def _cache_lines(settings: Settings) -> list[str]:
    from llama_proc.provision.cache.install import compute_summary
    from llama_proc.provision.cache.inventory import list_installs
    from llama_proc.provision.cache.layout import downloads_dir, servers_dir
    from llama_proc.provision.cache.locking import LOCK_SUFFIX, OLD_MARK, STAGING_MARK
    from llama_proc.provision.fetch.download import PART_SUFFIX

    installs = list_installs(settings)
    total = sum(
        i.metadata.get("size", 0) for i in installs if isinstance(i.metadata.get("size"), int)
    )
    lines = [f"cache: {settings.cache_dir} ({len(installs)} installs, {_size(total)})"]
    lines.extend(
        f"  {i.id} ({i.source}, {i.version or '?'}); compute: {compute_summary(i.compute)}"
        for i in installs
    )
    stale = [
        p
        for build in _children(servers_dir(settings))
        for p in _children(build)
        if STAGING_MARK in p.name or OLD_MARK in p.name
    ]
    parts = [p for p in _children(downloads_dir(settings)) if p.name.endswith(PART_SUFFIX)]
    locks = [
        p for build in _children(servers_dir(settings)) for p in _children(build)
        if p.name.endswith(LOCK_SUFFIX)
    ]  # fmt: skip
    if stale or parts:
        lines.append(
            f"  leftovers: {len(stale)} interrupted install(s), {len(parts)} partial "
            "download(s); `llama-proc cache prune` removes them"
        )
    lines.append(f"  lock files: {len(locks)}")
    return lines


def _children(folder: Any) -> list[Any]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _cpu_off_line(host: HostInfo, manifest: Manifest, settings: Settings) -> str:
    """Which CPU feature groups new installs here leave off from the start, and why."""
    from llama_proc.provision.compute.plan import initial_off

    build = settings.build or manifest.build
    ladder, off = initial_off(
        host.arch, host.cpu_features, manifest.known_bad_groups(build), settings.cpu_off
    )
    head = f"cpu feature groups: {', '.join(g.name for g in ladder) or 'none'} on this host"
    if not off:
        return f"{head}; none off for new installs (the compute check confirms each install)"
    why = "; ".join(f"{name}: {text}" for name, text in off.items())
    return f"{head}; off for new installs: {why}"


def _doctor(args: argparse.Namespace) -> int:
    import platform as pyplatform

    from llama_proc._version import __version__
    from llama_proc.errors import LlamaProcError
    from llama_proc.provision.explain import StepName
    from llama_proc.provision.host.platform import detect_host
    from llama_proc.provision.host.selection import select_variant
    from llama_proc.provision.manifest import load_manifest
    from llama_proc.provision.resolve import resolve_server

    settings = settings_from_args(args)
    print(f"llama-proc {__version__} (Python {pyplatform.python_version()}, {sys.executable})")
    host = detect_host(gpu_details=True)
    for line in _host_lines(host):
        print(line)
    try:
        manifest = load_manifest()
    except LlamaProcError as err:
        print(f"manifest: error: {err}")
        return 1
    print(
        f"manifest: {manifest.path} (pinned build {manifest.build}, "
        f"{len(manifest.for_platform(host.os, host.arch))} variants for {host.platform})"
    )
    print(_cpu_off_line(host, manifest, settings))
    print(
        f"settings: variant={settings.backend} build={settings.build or manifest.build} "
        f"prefer={settings.prefer} no_build={settings.no_build} "
        f"no_prebuilt={settings.no_prebuilt} offline={settings.offline} "
        f"mirror={settings.mirror or '-'} server_bin={settings.server_binary or '-'}"
    )
    try:
        selection = select_variant(manifest, host, settings.backend)
    except LlamaProcError as err:
        print(f"selection:\n  error: {err}")
    else:
        print("selection:")
        for line in _chain_lines(selection, settings.backend):
            print(f"  {line}")
        if selection.prebuilt_reasons:
            reasons = _reasons(selection.prebuilt_reasons)
            print(f"  prebuilt: blocked ({reasons}); a source build is needed")
        else:
            print("  prebuilt: fits this host")
    print("resolution (no download, no build):")
    explain: list[str] = []
    try:
        install = resolve_server(
            settings, explain=explain, provision=False, host=host, manifest=manifest
        )
    except LlamaProcError as err:
        result = f"=> not ready: {err}"
    else:
        explain.append(_compute_line(install))
        result = f"=> {install.server_binary}"
    _explain(explain, skip=(StepName.SELECT,), out=sys.stdout)  # the selection is printed above
    print(f"  {result}")
    for line in _cache_lines(settings):
        print(line)
    for line in _tool_lines():
        print(line)
    print(_cuda_toolkit_line(host, manifest))
    if getattr(args, "smoke", False):
        from llama_proc._cli.smoke import run_smoke

        return int(run_smoke(args))
    return 0
