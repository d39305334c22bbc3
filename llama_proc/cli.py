"""The ``llama-proc`` command line.

Each command's parser lives in a module of :mod:`llama_proc._cli` exposing
``register(subparsers)``; those modules import only :mod:`argparse` and
:mod:`llama_proc._cli.common` at load time, so ``llama-proc --help`` stays fast. What a command
does lives in :mod:`llama_proc._cli.handlers`, named by a lazy
:class:`~llama_proc._cli.common.Handler` and imported only when that command runs. No parser takes an
abbreviated flag, and flags that would put a key or token on the command line are refused.
Every :class:`~llama_proc.errors.LlamaProcError` becomes one line on stderr and exit code 1;
usage errors exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Final

from llama_proc._cli import COMMAND_MODULES
from llama_proc._cli.common import EXIT_USAGE, StrictArgumentParser, refuse_secret_flags
from llama_proc._logging import LOGGER_NAME
from llama_proc._version import __version__

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_USAGE", "build_parser", "main"]

EXIT_ERROR: Final = 1
EXIT_INTERRUPTED: Final = 130


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered.

    No parser accepts an abbreviated flag (``--api-key`` must never reach ``--api-key-file``),
    and every parser refuses the flags that would put a secret on the command line.
    """
    import importlib

    parser = StrictArgumentParser(
        prog="llama-proc",
        description=(
            "Get a verified llama.cpp llama-server for this host (prebuilt download or source "
            "build) and run it."
        ),
    )
    refuse_secret_flags(parser)
    parser.add_argument("--version", action="version", version=f"llama-proc {__version__}")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only print results and errors (no progress)"
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of llama-proc's log messages on stderr (default: WARNING)",
    )
    # Commands add themselves through _cli.common.add_command (no abbreviations, no secrets).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"llama_proc._cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    from llama_proc._text import PrintableFormatter, printable_lines
    from llama_proc.errors import LlamaProcError

    parser = build_parser()
    args = parser.parse_args(argv)
    # --log-level is about llama-proc's own messages; other libraries keep warnings and above.
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("llama-proc: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    ours = logging.getLogger(LOGGER_NAME)
    previous_level = ours.level
    ours.setLevel(args.log_level)
    try:
        return int(args.handler(args))
    except LlamaProcError as err:
        # Names from models, files and hubs can hold terminal escapes: never printed raw.
        text = printable_lines("; ".join([str(err), *getattr(err, "__notes__", ())]))
        print(f"llama-proc: error: {text}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("llama-proc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        # main() may run inside a longer-lived process (tests, embedding): leave its logging
        # as it was.
        ours.setLevel(previous_level)
