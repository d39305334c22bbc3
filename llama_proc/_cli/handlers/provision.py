"""``llama-proc fetch | list``: install a variant, and list the variants this host can run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import llama_proc.provision.host.platform as host_platform
import llama_proc.provision.host.selection as host_selection
from llama_proc._cli.common import settings_from_args
from llama_proc._cli.handlers.output import compute_line, print_err, print_steps, reasons
from llama_proc.errors import ConfigError, NoMatchingVariantError
from llama_proc.provision.cache.inventory import list_installs
from llama_proc.provision.fetch.prebuilt import fetch_for_platform
from llama_proc.provision.host.selection import (
    prebuilt_problems,
    runtime_problems,
)
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.resolve import ensure_server

if TYPE_CHECKING:
    import argparse

    from llama_proc.config import Settings
    from llama_proc.provision.cache.record import Install


def _fetch_for_platform(args: argparse.Namespace) -> int:
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
        print_err(f"  {state} {what} into {install.path} (not run here)")
    print(install.server_binary)
    return 0


def fetch(args: argparse.Namespace) -> int:
    if args.platform is not None or args.dest is not None:
        return _fetch_for_platform(args)
    settings = settings_from_args(args)
    explain: list[str] = []
    try:
        install = ensure_server(settings, force=args.force, explain=explain)
    finally:
        if not args.quiet:
            print_steps(explain)
    if not args.quiet:
        print_steps([compute_line(install)])
    print(install.server_binary)
    return 0


def installed_by_variant(settings: Settings) -> dict[str, list[Install]]:
    out: dict[str, list[Install]] = {}
    for install in list_installs(settings):
        out.setdefault(install.variant_id, []).append(install)
    return out


def list_variants(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    manifest = load_manifest()
    host = host_platform.detect_host(gpu_details=False)
    build = settings.build or manifest.build
    variants = manifest.for_platform(host.os, host.arch)
    try:
        chosen: str | None = host_selection.select_variant(
            manifest, host, settings.variant
        ).variant.id
    except NoMatchingVariantError as err:
        chosen = None
        print_err(f"no variant is chosen: {err}")
    installed = installed_by_variant(settings)
    print(f"variants for {host.platform} (build {build}; host: {host.summary()}):")
    if not variants:
        print("  none: set LLAMA_PROC_SERVER_BIN to a llama-server you built yourself")
    width = max((len(v.id) for v in variants), default=0)
    for v in variants:
        mark = "*" if v.id == chosen else " "
        problems = runtime_problems(v, host)
        fits = "runs here" if not problems else "cannot run here: " + reasons(problems)
        blockers = prebuilt_problems(v, host)
        if not v.has_prebuilt:
            prebuilt = "prebuilt: none upstream (source build)"
        elif blockers and not problems:
            prebuilt = "prebuilt: no (" + reasons(blockers) + "), source build"
        elif blockers:
            prebuilt = "prebuilt: no"
        else:
            prebuilt = "prebuilt: yes"
        print(f"{mark} {v.id:<{width}}  {fits}; {prebuilt}")
        for install in installed.get(v.id, []):
            print(f"  {'':<{width}}  installed: {install.id} ({install.source}, {install.version})")
    print("(* = what --variant " + settings.variant + " picks)")
    return 0
