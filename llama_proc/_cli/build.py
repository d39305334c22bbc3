"""``llama-proc build``: compile llama-server from llama.cpp source into the cache."""

from __future__ import annotations

from typing import Any

from llama_proc._cli.common import (
    PROVISION_FLAGS,
    Handler,
    add_command,
    add_settings_flags,
)


def register(subparsers: Any) -> None:
    """Add the ``build`` command."""
    p = add_command(
        subparsers,
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
    add_settings_flags(
        p,
        *PROVISION_FLAGS,
        "build_source",
        "cuda_arch",
        "jobs",
        "cpu_off",
        variant={
            "help": "backend to build (rpc = cpu + the ggml-rpc-server worker); default: "
            "$LLAMA_PROC_VARIANT or auto-detect from this host's hardware",
        },
    )
    p.add_argument(
        "--source-build",
        metavar="bNNNN",
        default=None,
        help="the llama.cpp build tag of a local folder or archive that is not a git checkout, "
        "so `llama-server --version` reports it (default: from git, else unknown = build 0)",
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
    p.set_defaults(handler=Handler("build:build"))
