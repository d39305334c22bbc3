"""``llama-proc fetch | which | list``: what they do, and the lines they share with ``cache`` and ``doctor``."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

import llama_proc.provision.host.platform as host_platform
import llama_proc.provision.host.selection as host_selection
from llama_proc._cli.common import settings_from_args
from llama_proc.errors import ConfigError, LlamaProcError, NoMatchingVariantError
from llama_proc.provision.cache.install import Install, compute_summary
from llama_proc.provision.cache.inventory import list_installs
from llama_proc.provision.explain import Step, StepName
from llama_proc.provision.fetch.prebuilt import fetch_for_platform
from llama_proc.provision.host.selection import (
    AUTO_CHAIN,
    Blocker,
    Selection,
    prebuilt_problems,
    runtime_problems,
)
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.resolve import ensure_server, plan, resolve_server
from llama_proc.vocab import AUTO

if TYPE_CHECKING:
    import argparse
    from collections.abc import Collection, Sequence

    from llama_proc.config import Settings

_MB: Final = 1024 * 1024


def print_steps(
    lines: Sequence[str], *, skip: Collection[str] = (), out: TextIO | None = None
) -> None:
    """Print explanation lines, indented, to ``out`` (stderr).

    Args:
        lines: what the resolver explained; its rungs are
            :class:`~llama_proc.provision.explain.Step` objects, read by field, never by text.
        skip: rungs (:class:`~llama_proc.provision.explain.StepName`) to leave out.
        out: where to print; stderr when None.
    """
    for line in lines:
        if not (isinstance(line, Step) and line.step in skip):
            print(f"  {line}", file=out or sys.stderr)


def print_err(line: str) -> None:
    print(line, file=sys.stderr)


def size_mb(num: object) -> str:
    return f"{num / _MB:.1f} MB" if isinstance(num, int) else "?"


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


def compute_line(install: Install) -> str:
    """What the compute check said of the install in use (explicit binaries are never run)."""
    if not install.metadata:
        return "compute: not checked (an explicit binary is used as it is)"
    return f"compute: {compute_summary(install.compute)}"


def which(args: argparse.Namespace) -> int:
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
            print_steps(explain)
        else:
            # The chain replaces the selection's reasoning lines, where they stood.
            chain = [f"select: {line}" for line in chain_lines(res.selection, settings.backend)]
            at = next(
                (
                    i
                    for i, s in enumerate(explain)
                    if isinstance(s, Step) and s.step == StepName.SELECT
                ),
                len(explain),
            )
            print_steps([*explain[:at], *chain, *explain[at:]], skip=(StepName.SELECT,))
    print_steps([compute_line(install)])
    print(install.server_binary)
    return 0


def chain_lines(selection: Selection, requested: str) -> list[str]:
    """The variants the selection considered: why each was skipped, and the one it took.

    Read from :attr:`Selection.candidates` and their :class:`Blocker` kinds and texts, never
    from the selection's reasoning lines.
    """
    auto = requested == AUTO
    lines = [f"auto chain: {' -> '.join(AUTO_CHAIN)}" if auto else f"requested: {requested}"]
    chosen = None
    for candidate in selection.candidates:
        if candidate.variant is selection.variant:
            chosen = candidate
        else:
            lines.append(f"skip {candidate.variant.id}: {reasons(candidate.blockers)}")
    how = "the first in the chain with nothing against it"
    if not auto:
        how = f"requested with --variant {requested}"
    lines.append(f"use {selection.variant.id}: {how}")
    lines.extend(f"warning: {b.text} [{b.kind}]" for b in (chosen.blockers if chosen else ()))
    return lines


def reasons(blockers: Sequence[Blocker]) -> str:
    return "; ".join(f"{b.text} [{b.kind}]" for b in blockers) or "passed over"


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
            manifest, host, settings.backend
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
    print("(* = what --variant " + settings.backend + " picks)")
    return 0
