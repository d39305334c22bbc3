"""Which spellings name one llama-server option, and the numbers each option takes.

:class:`FlagNames` joins this package's tables (ServerArgs' fields, the untrusted-flag
allowlist) with the installed binary's ``--help``; :class:`Bounds` and :class:`Number` say
which values a numeric option takes per request when the operator's policy sets no bounds.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from llama_proc.proxy.flag_caps import CAPPED
from llama_proc.runtime.args import ServerArgs, untrusted_flag_groups
from llama_proc.runtime.flags import normalize_flag

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from llama_proc.runtime.flags import BinaryFlags

__all__ = ["Bounds", "FlagNames", "Number", "is_flag", "show_number"]


def is_flag(token: str) -> bool:
    """Whether a command-line word names a flag (a negative number is a value)."""
    if len(token) < 2 or not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def show_number(value: float) -> str:
    """A bound as written: whole numbers without a decimal point."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class Bounds:
    """An inclusive range for a numeric flag's value."""

    low: float
    high: float

    def contains(self, value: float) -> bool:
        """Whether ``low <= value <= high``."""
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"between {show_number(self.low)} and {show_number(self.high)}"


@dataclass(frozen=True)
class Number:
    """The numbers a numeric option takes."""

    integer: bool
    floor: float
    """The lowest value llama.cpp gives a meaning to; below zero, the flag takes a sign."""
    default: Bounds
    """Per-request bounds when the policy sets none: safe on a laptop."""
    words: tuple[str, ...] = ()
    """Non-numeric values the flag also takes (``-ngl auto``)."""

    @property
    def signed(self) -> bool:
        """Whether the option takes negative values."""
        return self.floor < 0


def _int(floor: int, low: int, high: int, *words: str) -> Number:
    return Number(integer=True, floor=floor, default=Bounds(low, high), words=words)


def _float(floor: float, low: float, high: float) -> Number:
    return Number(integer=False, floor=floor, default=Bounds(low, high))


# Keyed by one spelling per option; every spelling of the option finds its entry.
_NUMBERS: Final[Mapping[str, Number]] = {
    "--ctx-size": _int(0, 128, 8192),
    "--n-predict": _int(-2, -1, 4096),
    "--batch-size": _int(1, 32, 2048),
    "--ubatch-size": _int(1, 32, 512),
    "--threads": _int(-1, 1, 4),
    "--threads-batch": _int(-1, 1, 4),
    "--threads-http": _int(-1, 1, 8),
    "--parallel": _int(-1, 1, 4),
    "--n-gpu-layers": _int(-1, 0, 999, "auto", "all"),
    "--keep": _int(-1, -1, 8192),
    "--seed": _int(-1, -1, 4294967295),
    "--top-k": _int(0, 0, 1000),
    "--repeat-last-n": _int(-1, -1, 8192),
    "--yarn-orig-ctx": _int(0, 0, 131072),
    "--main-gpu": _int(0, 0, 63),
    "--embd-normalize": _int(-1, -1, 64),
    "--cache-reuse": _int(0, 0, 8192),
    "--cache-ram": _int(-1, 0, 8192),
    "--reasoning-budget": _int(-1, -1, 32768),
    "--timeout": _int(1, 1, 3600),
    "--fit-ctx": _int(0, 0, 8192),
    "--temp": _float(0, 0, 5),
    "--top-p": _float(0, 0, 1),
    "--min-p": _float(0, 0, 1),
    "--repeat-penalty": _float(0, 0, 10),
    "--presence-penalty": _float(-1e6, -2, 2),
    "--frequency-penalty": _float(-1e6, -2, 2),
    "--rope-scale": _float(0, 0, 64),
    "--rope-freq-base": _float(0, 0, 1e8),
    "--rope-freq-scale": _float(0, 0, 64),
    "--slot-prompt-similarity": _float(0, 0, 1),
}


@functools.cache
def _static_names() -> tuple[Mapping[str, frozenset[str]], frozenset[str], frozenset[str]]:
    """Spelling -> its option's spellings, valued spellings, switch spellings.

    From the tables this package keeps: ServerArgs' fields and the untrusted-flag allowlist.
    """
    parent: dict[str, str] = {}

    def find(s: str) -> str:
        while parent.setdefault(s, s) != s:
            s = parent[s]
        return s

    def union(spellings: Sequence[str]) -> None:
        for other in spellings[1:]:
            parent[find(other)] = find(spellings[0])

    valued: set[str] = set()
    switches: set[str] = set()
    for f in dataclasses.fields(ServerArgs):
        flags = tuple(f.metadata.get("flags", ()))
        if not flags:
            continue
        negations = tuple(f.metadata.get("neg", ()))
        union((*flags, *negations))
        if f.metadata["kind"] in ("bool", "switch"):
            switches.update(flags, negations)
        else:
            valued.update(flags)
    for spellings, takes_value in untrusted_flag_groups():
        union(spellings)
        (valued if takes_value else switches).update(spellings)
    for spelling in switches:
        if spelling.startswith("--no-") and "--" + spelling[5:] in switches:
            union((spelling, "--" + spelling[5:]))
    groups: dict[str, set[str]] = {}
    for spelling in parent:
        groups.setdefault(find(spelling), set()).add(spelling)
    table = {s: frozenset(group) for group in groups.values() for s in group}
    return table, frozenset(valued), frozenset(switches)


class FlagNames:
    """Which spellings name one llama-server option, and what each option takes.

    The installed binary's ``--help`` prints every spelling of an option, a switch's negations
    included, on one line (:meth:`BinaryFlags.spellings
    <llama_proc.runtime.flags.BinaryFlags.spellings>`); this package's own tables add the
    spellings older builds used. ``--temp``/``--temperature``, ``-ngl``/``--gpu-layers`` and
    ``--jinja``/``--no-jinja`` are one option each.

    Args:
        binary: what the installed llama-server accepts; None = this package's tables only.
    """

    def __init__(self, binary: BinaryFlags | None = None) -> None:
        self.binary = binary
        self._groups: dict[str, frozenset[str]] = {}
        self._ids: dict[str, str] = {}
        self._numbers: dict[str, Number] | None = None
        self._capped: dict[str, str] | None = None

    def known(self, flag: str) -> bool:
        """Whether this package's tables or the installed binary name ``flag``."""
        name = normalize_flag(flag)
        return name in _static_names()[0] or (self.binary is not None and name in self.binary)

    def group(self, flag: str) -> frozenset[str]:
        """Every spelling of the option ``flag`` names (``{flag}`` when it is unknown)."""
        name = normalize_flag(flag)
        cached = self._groups.get(name)
        if cached is not None:
            return cached
        table = _static_names()[0]
        seen = {name}
        todo = [name]
        while todo:
            spelling = todo.pop()
            more = set(table.get(spelling, ()))
            if self.binary is not None:
                more.update(self.binary.spellings(spelling))
            todo += more - seen
            seen |= more
        group = frozenset(seen)
        if len(group) > 1 or name in table:
            # Only known spellings are remembered: a client's invented flags must not grow this.
            self._groups.update(dict.fromkeys(group, group))
        return group

    def key(self, flag: str) -> str:
        """The option's identity, shared by all its spellings (``ctx-size`` for ``-c``)."""
        name = normalize_flag(flag)
        cached = self._ids.get(name)
        if cached is not None:
            return cached
        group = self.group(name)
        longs = [s[2:] for s in group if s.startswith("--")]
        positives = [s[3:] if s.startswith("no-") and "--" + s[3:] in group else s for s in longs]
        key = min(positives) if positives else min(s.lstrip("-") for s in group)
        if len(group) > 1 or name in _static_names()[0]:
            self._ids.update(dict.fromkeys(group, key))
        return key

    def same(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` set the same option."""
        return self.key(a) == self.key(b)

    def takes_value(self, flag: str) -> bool:
        """Whether the option expects a value after it."""
        _, valued, switches = _static_names()
        name = normalize_flag(flag)
        if name in valued or name in switches:
            return name in valued
        return self.binary is not None and self.binary.takes_value(name)

    def canonical(self, flag: str) -> str:
        """The spelling normalized requests use: the shortest one this build accepts.

        A switch keeps its own spelling (which also says on or off).
        """
        name = normalize_flag(flag)
        if not self.takes_value(name):
            return name
        group = self.group(name)
        if self.binary is not None:
            group = frozenset(s for s in group if s in self.binary) or frozenset({name})
        return min(group, key=lambda s: (len(s), s))

    def number(self, flag: str) -> Number | None:
        """What numbers the option takes, if it takes one."""
        if self._numbers is None:
            self._numbers = {self.key(s): number for s, number in _NUMBERS.items()}
        return self._numbers.get(self.key(flag))

    def default_bounds(self, flag: str) -> Bounds | None:
        """The option's per-request bounds when a policy sets none (None: it takes no number)."""
        number = self.number(flag)
        return None if number is None else number.default

    def capped(self, flag: str) -> str | None:
        """The ServerArgs field a server-wide cap bounds that this flag sets, if any."""
        if self._capped is None:
            self._capped = {}
            for f in dataclasses.fields(ServerArgs):
                if f.name in CAPPED:
                    self._capped[self.key(f.metadata["flags"][0])] = f.name
        return self._capped.get(self.key(flag))
