"""``llama-proc fetch | which | list | cache | doctor``: provisioning from the command line.

Only :mod:`argparse` is imported at load time; each handler imports what it needs.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_proc.config import Settings
    from llama_proc.provision.cache import Install
    from llama_proc.provision.platform import HostInfo

VARIANT_CHOICES = ("auto", "cpu", "cuda", "metal", "vulkan", "rpc")
_BUILD_RE = re.compile(r"^b?([0-9]+)$")
_MB = 1024 * 1024


def _build_tag(text: str) -> str:
    match = _BUILD_RE.match(text.strip())
    if match is None:
        msg = f"{text!r} is not a llama.cpp build tag; use the form b1234"
        raise argparse.ArgumentTypeError(msg)
    return f"b{int(match.group(1))}"


def _url(text: str) -> str:
    value = text.strip().rstrip("/")
    if not value.startswith(("http://", "https://", "file://")):
        msg = f"{text!r} is not an http(s):// or file:// URL"
        raise argparse.ArgumentTypeError(msg)
    return value


def _common(p: argparse.ArgumentParser, *, selection: bool = True) -> None:
    """Options every provisioning command shares (each overrides its LLAMA_PROC_* variable)."""
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help="cache root (default: $LLAMA_PROC_CACHE_DIR, else the per-user cache folder)",
    )
    if not selection:
        return
    p.add_argument(
        "--variant",
        choices=VARIANT_CHOICES,
        default=None,
        help="backend: auto picks CUDA with an NVIDIA driver, Metal on Apple silicon, else CPU; "
        "rpc is cpu plus the ggml-rpc-server worker (default: $LLAMA_PROC_VARIANT or auto)",
    )
    p.add_argument(
        "--build",
        type=_build_tag,
        metavar="bNNNN",
        default=None,
        help="llama.cpp build tag instead of the pinned one (default: $LLAMA_PROC_BUILD, else "
        "the build pinned in variants.toml)",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="never touch the network: use only the explicit, bundled or cached binary "
        "(default: $LLAMA_PROC_OFFLINE)",
    )
    p.add_argument(
        "--mirror",
        type=_url,
        metavar="URL",
        default=None,
        help="base URL mirroring GitHub's release API (URL/repos/<repo>/releases/tags/<tag>) and "
        "downloads (URL/<repo>/releases/download/<tag>/<asset>); file:// works offline "
        "(default: $LLAMA_PROC_MIRROR)",
    )


def register(subparsers: Any) -> None:
    """Add the ``fetch``, ``which``, ``list``, ``cache`` and ``doctor`` commands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "fetch",
        help="make sure a verified llama-server for this host is installed; print its path",
        description=(
            "Walk the resolution ladder (explicit binary, bundled in the wheel, cache, prebuilt "
            "download, source build) and install what is missing. Prebuilt archives are "
            "sha256-verified, extracted atomically and smoke-checked with --version. Prints the "
            "llama-server path on stdout and one line per ladder step on stderr."
        ),
    )
    _common(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="install again even if a usable install is bundled or cached (replaces it)",
    )
    p.add_argument(
        "--prefer",
        choices=("prebuilt", "source"),
        default=None,
        help="which provisioning path is tried first (default: $LLAMA_PROC_PREFER, else prebuilt)",
    )
    p.add_argument(
        "--no-build",
        action="store_true",
        help="never compile from source; fail if no prebuilt fits (default: $LLAMA_PROC_NO_BUILD)",
    )
    p.set_defaults(handler=_fetch)

    p = subparsers.add_parser(
        "which",
        help="print the path of the llama-server that would run (no download, no build)",
        description=(
            "Resolve llama-server without provisioning: explicit binary, bundled, then cache. "
            "Fails (exit 1) when none is installed; `llama-proc fetch` installs one."
        ),
    )
    _common(p)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print, on stderr, one line per ladder step saying what it found or why it "
        "was skipped",
    )
    p.set_defaults(handler=_which)

    p = subparsers.add_parser(
        "list",
        help="list the variants for this host: which fit, why not, what is installed",
        description=(
            "Show every manifest variant for this host's platform, whether it can run here "
            "(and why not), whether its prebuilt archive fits, and which builds are installed."
        ),
    )
    _common(p)
    p.set_defaults(handler=_list)

    p = subparsers.add_parser(
        "cache",
        help="inspect and clean the install cache",
        description="Show, list and clean llama-proc's cache of llama-server installs.",
    )
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    cache_sub.required = True
    c = cache_sub.add_parser("path", help="print the cache root folder")
    _common(c, selection=False)
    c.set_defaults(handler=_cache_path)
    c = cache_sub.add_parser("ls", help="list installs: id, source, version, size, date")
    _common(c, selection=False)
    c.set_defaults(handler=_cache_ls)
    c = cache_sub.add_parser("rm", help="remove one install")
    _common(c, selection=False)
    c.add_argument(
        "install_id",
        metavar="ID",
        help="install to remove, as `cache ls` shows it (<build>/<variant>), or a variant "
        "folder name that only one build has",
    )
    c.set_defaults(handler=_cache_rm)
    c = cache_sub.add_parser(
        "prune",
        help="remove installs of other builds, interrupted installs and partial downloads",
        description=(
            "Remove installs of builds other than the pinned one ($LLAMA_PROC_BUILD and --keep "
            "are kept too; installs a running process uses are kept on Linux), staging "
            "folders of interrupted installs, partial downloads and orphaned lock files."
        ),
    )
    _common(c, selection=False)
    c.add_argument(
        "--keep",
        action="append",
        type=_build_tag,
        default=[],
        metavar="bNNNN",
        help="also keep this build; repeatable",
    )
    c.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    c.set_defaults(handler=_cache_prune)

    p = subparsers.add_parser(
        "doctor",
        help="report the host, what would be chosen and why, and the cache state",
        description=(
            "Print what llama-proc detects about this host (OS, libc, CPU features, NVIDIA "
            "driver and GPUs, Vulkan, Apple silicon), the variant it would choose and why, "
            "whether the prebuilt fits, what the resolution ladder finds without downloading, "
            "the cache contents and the build tools on PATH."
        ),
    )
    _common(p)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="also start the resolved llama-server with a small real model and check it "
        "answers a chat completion (downloads the model once)",
    )
    p.set_defaults(handler=_doctor)


# ----------------------------------------------------------------------------- helpers
def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    from llama_proc.config import Settings

    overrides: dict[str, Any] = {
        "cache_dir": getattr(args, "cache_dir", None),
        "variant": getattr(args, "variant", None),
        "build": getattr(args, "build", None),
        "mirror": getattr(args, "mirror", None),
    }
    if getattr(args, "offline", False):
        overrides["offline"] = True
    if getattr(args, "quiet", False):
        overrides["progress"] = False
    overrides.update(extra)
    return Settings.from_env(**overrides)


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _size(num: object) -> str:
    return f"{num / _MB:.1f} MB" if isinstance(num, int) else "?"


# ----------------------------------------------------------------------------- handlers
def _fetch(args: argparse.Namespace) -> int:
    from llama_proc.provision.resolve import ensure_server

    extra: dict[str, Any] = {"prefer": args.prefer}
    if args.no_build:
        extra["no_build"] = True
    settings = _settings(args, **extra)
    explain: list[str] = []
    try:
        install = ensure_server(settings, force=args.force, explain=explain)
    finally:
        if not args.quiet:
            for line in explain:
                _err(f"  {line}")
    print(install.server_binary)
    return 0


def _which(args: argparse.Namespace) -> int:
    from llama_proc.provision.resolve import resolve_server

    settings = _settings(args)
    explain: list[str] = []
    try:
        install = resolve_server(settings, explain=explain, provision=False)
    finally:
        if args.verbose:
            for line in explain:
                _err(f"  {line}")
    print(install.server_binary)
    return 0


def _installed_by_variant(settings: Settings) -> dict[str, list[Install]]:
    from llama_proc.provision.cache import list_installs

    out: dict[str, list[Install]] = {}
    for install in list_installs(settings):
        out.setdefault(install.variant_id, []).append(install)
    return out


def _list(args: argparse.Namespace) -> int:
    from llama_proc.errors import NoMatchingVariantError
    from llama_proc.provision.manifest import load_manifest
    from llama_proc.provision.platform import detect_host
    from llama_proc.provision.selection import (
        prebuilt_blockers,
        runtime_blockers,
        select_variant,
    )

    settings = _settings(args)
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
        problems = runtime_blockers(v, host)
        fits = "runs here" if not problems else "cannot run here: " + "; ".join(problems)
        blockers = prebuilt_blockers(v, host)
        if not v.has_prebuilt:
            prebuilt = "prebuilt: none upstream (source build)"
        elif blockers and not problems:
            prebuilt = "prebuilt: no (" + "; ".join(blockers) + "), source build"
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
    print(_settings(args).cache_dir)
    return 0


def _cache_ls(args: argparse.Namespace) -> int:
    from llama_proc.provision.cache import list_installs

    settings = _settings(args)
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
    from llama_proc.provision.cache import remove

    print(f"removed {remove(_settings(args), args.install_id)}")
    return 0


def _cache_prune(args: argparse.Namespace) -> int:
    from llama_proc.provision.cache import prune

    removed = prune(_settings(args), keep_builds=args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"{verb} {path}")
    if not removed:
        _err("nothing to prune")
    return 0


def _host_lines(host: HostInfo) -> list[str]:
    from llama_proc.provision.platform import LLAMA_CPU_FEATURES

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
    for tool in ("cmake", "ninja", "cc", "c++", "cl", "nvcc", "ccache", "git"):
        path = shutil.which(tool) or shutil.which(tool, path=scripts)
        if path:
            found.append(f"{tool}={path}")
    return ["build tools: " + (", ".join(found) if found else "none found on PATH")]


def _cache_lines(settings: Settings) -> list[str]:
    from llama_proc.provision.cache import (
        LOCK_SUFFIX,
        OLD_MARK,
        PART_SUFFIX,
        STAGING_MARK,
        downloads_dir,
        list_installs,
        servers_dir,
    )

    installs = list_installs(settings)
    total = sum(
        i.metadata.get("size", 0) for i in installs if isinstance(i.metadata.get("size"), int)
    )
    lines = [f"cache: {settings.cache_dir} ({len(installs)} installs, {_size(total)})"]
    lines.extend(f"  {i.id} ({i.source}, {i.version or '?'})" for i in installs)
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


def _doctor(args: argparse.Namespace) -> int:
    import platform as pyplatform

    from llama_proc._version import __version__
    from llama_proc.errors import LlamaProcError
    from llama_proc.provision.manifest import load_manifest
    from llama_proc.provision.platform import detect_host
    from llama_proc.provision.resolve import resolve_server
    from llama_proc.provision.selection import select_variant

    settings = _settings(args)
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
    print(
        f"settings: variant={settings.backend} build={settings.build or manifest.build} "
        f"prefer={settings.prefer} no_build={settings.no_build} "
        f"no_prebuilt={settings.no_prebuilt} offline={settings.offline} "
        f"mirror={settings.mirror or '-'} server_bin={settings.server_binary or '-'}"
    )
    print("selection:")
    try:
        selection = select_variant(manifest, host, settings.backend)
    except LlamaProcError as err:
        print(f"  error: {err}")
    else:
        for line in selection.why:
            print(f"  {line}")
        if selection.blockers:
            print(
                f"  prebuilt: blocked ({'; '.join(selection.blockers)}); a source build is needed"
            )
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
        result = f"=> {install.server_binary}"
    for line in explain:
        if not line.startswith("select: "):  # printed above
            print(f"  {line}")
    print(f"  {result}")
    for line in _cache_lines(settings):
        print(line)
    for line in _tool_lines():
        print(line)
    if getattr(args, "smoke", False):
        from llama_proc._cli.smoke import run_smoke

        return int(run_smoke(args))
    return 0
