"""Per-request load flags (``X-Llama-Flags``).

The header holds shell-style words (``-c 2048 --flash-attn on``; no shell is involved). They
are split, ``--flag=value`` words are split in two (so the value is checked like any other),
checked against the runtime's allowlist for untrusted flags
(:func:`llama_proc.runtime.validate_extra_args`), then normalized so equivalent spellings map
to the same server: aliases take one spelling (``--ctx-size`` becomes ``-c``), and flags are
sorted. A flag given twice (or with its negation) is refused rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import functools
import shlex
from typing import TYPE_CHECKING, Final

from llama_proc.errors import InvalidArgumentError
from llama_proc.runtime.args import ServerArgs, validate_extra_args

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["FLAGS_HEADER", "MAX_FLAGS_HEADER", "normalize_flags", "parse_flags_header"]

FLAGS_HEADER: Final = "X-Llama-Flags"
MAX_FLAGS_HEADER: Final = 4096
"""Longest X-Llama-Flags value accepted, in characters."""


def parse_flags_header(text: str) -> tuple[str, ...]:
    """Turn an ``X-Llama-Flags`` header into validated, normalized llama-server flags.

    Raises:
        InvalidArgumentError: the header is too long, badly quoted, names a flag the
            runtime's allowlist refuses for untrusted callers, or repeats a flag.
    """
    if len(text) > MAX_FLAGS_HEADER:
        msg = f"{FLAGS_HEADER} is longer than {MAX_FLAGS_HEADER} characters"
        raise InvalidArgumentError(msg)
    if any(ord(ch) < 0x20 and ch != "\t" for ch in text):
        msg = f"{FLAGS_HEADER} contains control characters"
        raise InvalidArgumentError(msg)
    try:
        words = shlex.split(text, posix=True)
    except ValueError as err:
        msg = f"{FLAGS_HEADER} is not valid shell-style quoting: {err}"
        raise InvalidArgumentError(msg) from None
    tokens: list[str] = []
    for word in words:
        if word.startswith("--") and "=" in word:
            name, _, value = word.partition("=")
            tokens += [name, value]
        else:
            tokens.append(word)
    if not tokens:
        return ()
    validate_extra_args(tokens)
    return normalize_flags(tokens)


def _is_flag(token: str) -> bool:
    if len(token) < 2 or not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False  # a negative number is a value


@functools.cache
def _aliases() -> Mapping[str, tuple[str, str]]:
    """Spelling -> (spelling to use, sort/duplicate key), from ServerArgs' flag table.

    The shortest spelling is used: llama.cpp's short forms (``-c``, ``-t``, ``-ngl``) have
    outlived several renames of the long ones. A negation shares its option's key.
    """
    table: dict[str, tuple[str, str]] = {}
    for f in dataclasses.fields(ServerArgs):
        spellings = tuple(f.metadata.get("flags", ()))
        if not spellings:
            continue
        key = f.name
        use = min(spellings, key=len)
        table.update(dict.fromkeys(spellings, (use, key)))
        negations = tuple(f.metadata.get("neg", ()))
        if negations:
            use_neg = min(negations, key=len)
            table.update(dict.fromkeys(negations, (use_neg, key)))
    return table


def _key(flag: str) -> str:
    bare = flag.lstrip("-")
    return bare.removeprefix("no-")


def normalize_flags(flags: Sequence[str]) -> tuple[str, ...]:
    """Canonical form of a validated flag list: one spelling per option, sorted by option.

    Each flag keeps the values that follow it. ``--x=v`` is split into ``--x v``.

    Raises:
        InvalidArgumentError: the same option is given twice (or with its negation): which
            one wins would depend on the order, which normalization does not keep.
    """
    aliases = _aliases()
    groups: list[tuple[str, list[str]]] = []
    seen: dict[str, str] = {}
    for token in flags:
        if _is_flag(token):
            name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
            use, key = aliases.get(name, (name, _key(name)))
            if key in seen:
                msg = f"{seen[key]!r} and {name!r} set the same option; give it once"
                raise InvalidArgumentError(msg)
            seen[key] = name
            groups.append((key, [use, value] if eq else [use]))
        elif groups:
            groups[-1][1].append(token)
        else:
            groups.append(("", [token]))
    groups.sort(key=lambda g: g[0])
    return tuple(token for _, group in groups for token in group)
