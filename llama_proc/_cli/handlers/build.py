"""``llama-proc build``: compile llama-server from source into the cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llama_proc._cli.common import settings_from_args
from llama_proc.provision.compile.build import build_variant
from llama_proc.provision.host.platform import detect_host
from llama_proc.provision.host.selection import select_variant
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.resolve import concrete_build

if TYPE_CHECKING:
    import argparse


def build(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    manifest = load_manifest()
    settings = concrete_build(settings, manifest)  # a release tag or latest -> its bNNNN
    host = detect_host()
    selection = select_variant(manifest, host, settings.variant)
    explain: list[str] = []
    install = build_variant(
        selection.variant,
        settings,
        manifest=manifest,
        source_build=args.source_build,
        cmake_args=args.cmake_args,
        portable=args.portable,
        force=args.force,
        host=host,
        explain=explain,
    )
    print(install.server_binary)
    if not getattr(args, "quiet", False):
        for line in explain:
            print(f"  {line}")
    return 0
