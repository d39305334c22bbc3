"""``llama-proc cache path | ls | rm | verify | prune``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from llama_proc._cli.common import settings_from_args
from llama_proc._cli.handlers.output import print_err, size_mb
from llama_proc.provision.cache.checkup import verify_installs
from llama_proc.provision.cache.inventory import list_installs, prune, remove
from llama_proc.provision.cache.layout import tree_size, usage_by_kind

if TYPE_CHECKING:
    import argparse
    from pathlib import Path


def kind_lines(root: Path) -> list[str]:
    """One line per kind of thing the cache holds, with its size and entry count."""
    usage = usage_by_kind(root)
    width = max(len(u.kind) for u in usage)
    lines = [f"{root}: {size_mb(sum(u.size for u in usage))} in all"]
    lines.extend(
        f"  {u.kind + '/':<{width + 1}}  {size_mb(u.size):>10}  {u.entries:>4} entries  ({u.what})"
        for u in usage
    )
    return lines


def cache_path(args: argparse.Namespace) -> int:
    print(settings_from_args(args).cache_dir)
    return 0


def cache_ls(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    installs = list_installs(settings)
    if not installs:
        print_err(f"no installs in {settings.cache_dir}")
    width = max((len(i.id) for i in installs), default=0)
    for i in installs:
        created = str(i.metadata.get("created", "?"))[:19].replace("T", " ")
        version = i.version or "?"
        print(
            f"{i.id:<{width}}  {i.source:<8}  {size_mb(i.metadata.get('size')):>9}  {created}  {version}"
        )
    for line in kind_lines(settings.cache_dir):
        print_err(line)
    return 0


def cache_rm(args: argparse.Namespace) -> int:
    print(f"removed {remove(settings_from_args(args), args.install_id)}")
    return 0


def cache_verify(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    reports = verify_installs(settings)
    broken = [r for r in reports if not r.ok]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    elif not reports:
        print_err(f"no installs in {settings.cache_dir}")
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
        print_err(
            f"{len(broken)} broken install(s): re-install with `llama-proc fetch --force` (with "
            f"the --variant and --build it was made for), or remove with {removals}"
        )
        return 1
    return 0


def cache_prune(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    before = sum(u.size for u in usage_by_kind(settings.cache_dir))
    if args.dry_run:
        # What would go, measured before anything goes (nested paths counted once).
        listed = prune(settings, keep_builds=args.keep, dry_run=True)
        tops = [p for p in listed if not any(q in p.parents for q in listed)]
        freed = sum(tree_size(p) for p in tops)
    else:
        listed = prune(settings, keep_builds=args.keep)
        freed = before - sum(u.size for u in usage_by_kind(settings.cache_dir))
    verb = "would remove" if args.dry_run else "removed"
    for path in listed:
        print(f"{verb} {path}")
    if not listed:
        print_err("nothing to prune")
        return 0
    print(f"{'would free' if args.dry_run else 'freed'} {size_mb(max(0, freed))}")
    return 0
