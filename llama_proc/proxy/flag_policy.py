"""Per-request load flags (``X-Llama-Flags``): the operator's policy, under server-wide caps.

A client may ask for its own llama-server variant with an ``X-Llama-Flags`` header holding
shell-style words (``-c 2048 --temp 0.5``; no shell is involved). That is off unless the models
config allows it for the model, and then only for the flags it lists, numeric ones within
bounds (:class:`FlagPolicy`)::

    [models.smol.request_flags]
    "--ctx-size" = { min = 512, max = 4096 }   # any spelling of the option
    "--temp" = true                            # allowed, default bounds
    "-ngl" = { max = 99 }

Server-wide hard caps (:class:`FlagCaps`: threads, HTTP threads, parallel slots, batch sizes,
context size x slots) bound every source of flags: the models config (options and
``extra_args``, checked when it is loaded) and each request merged with its model's config.

A request's flags are checked before the server pool is touched, so a refused request never
starts, stops or evicts anything (:meth:`FlagChecker.check_request`): the untrusted-flag
allowlist (:func:`~llama_proc.runtime.args.validate_extra_args`), the installed binary's own
option list (its cached ``--help``), the model's policy, numbers written as plain ASCII digits
within bounds, each option given once under any of its spellings, then the caps. The accepted
flags are normalized so equivalent requests share a server: one spelling per option (the
shortest), whole numbers without leading zeros, options sorted.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from llama_proc.errors import InvalidArgumentError
from llama_proc.proxy.threads import usable_cpus
from llama_proc.runtime.args import (
    ServerArgs,
    allowed_untrusted_flags,
    untrusted_flag_groups,
    validate_extra_args,
)
from llama_proc.runtime.flags import normalize_flag

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from llama_proc.proxy.models_config import ModelSpec
    from llama_proc.runtime.flags import BinaryFlags

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_CONTEXT_TOKENS",
    "DEFAULT_MAX_PARALLEL",
    "FLAGS_HEADER",
    "MAX_FLAGS_HEADER",
    "MAX_NUMBER_DIGITS",
    "Bounds",
    "FlagCaps",
    "FlagChecker",
    "FlagNames",
    "FlagPolicy",
    "FlagRule",
    "normalize_flags",
    "split_flags_header",
]

FLAGS_HEADER: Final = "X-Llama-Flags"
MAX_FLAGS_HEADER: Final = 4096
"""Longest X-Llama-Flags value accepted, in characters."""
MAX_NUMBER_DIGITS: Final = 12
"""Most digits in a number given per request (before and after a decimal point each)."""
DEFAULT_MAX_PARALLEL: Final = 16
"""Default cap on parallel slots (``-np``) from any source."""
DEFAULT_MAX_BATCH: Final = 8192
"""Default cap on the logical and physical batch sizes (``-b``, ``-ub``)."""
DEFAULT_MAX_CONTEXT_TOKENS: Final = 131072
"""Default cap on context size x parallel slots: the KV cache's size in tokens."""
MIN_HTTP_THREADS_CAP: Final = 4
"""The default HTTP-thread cap is the CPU count, but never below this."""

_INT_RE: Final = re.compile(rf"-?[0-9]{{1,{MAX_NUMBER_DIGITS}}}")
_FLOAT_RE: Final = re.compile(
    rf"-?[0-9]{{1,{MAX_NUMBER_DIGITS}}}(?:\.[0-9]{{1,{MAX_NUMBER_DIGITS}}})?"
)
_BOUND_KEYS: Final = frozenset({"min", "max"})
_QUOTING: Final = frozenset("'\"\\")
MAX_CACHED_CHECKS: Final = 1024
"""Accepted (header, model) pairs remembered, so a repeated header costs a dict lookup."""


def _show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# -- bounds and the numbers llama-server takes -----------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """An inclusive range for a numeric flag's value."""

    low: float
    high: float

    def contains(self, value: float) -> bool:
        """Whether ``low <= value <= high``."""
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"between {_show(self.low)} and {_show(self.high)}"


@dataclass(frozen=True)
class _Number:
    integer: bool
    floor: float
    """The lowest value llama.cpp gives a meaning to; below zero, the flag takes a sign."""
    default: Bounds
    """Per-request bounds when the policy sets none: safe on a laptop."""
    words: tuple[str, ...] = ()
    """Non-numeric values the flag also takes (``-ngl auto``)."""

    @property
    def signed(self) -> bool:
        return self.floor < 0


def _int(floor: int, low: int, high: int, *words: str) -> _Number:
    return _Number(integer=True, floor=floor, default=Bounds(low, high), words=words)


def _float(floor: float, low: float, high: float) -> _Number:
    return _Number(integer=False, floor=floor, default=Bounds(low, high))


# Keyed by one spelling per option; every spelling of the option finds its entry.
_NUMBERS: Final[Mapping[str, _Number]] = {
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

_CAPPED: Final = (
    "threads",
    "threads_batch",
    "threads_http",
    "parallel",
    "batch_size",
    "ubatch_size",
    "ctx_size",
)
"""ServerArgs fields the server-wide caps bound."""


# -- server-wide caps ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FlagCaps:
    """Hard limits on what any source of flags may ask of the host.

    They bound the models config (typed options and ``extra_args``) and every request merged
    with its model's config. ``-1`` ("auto") stays allowed: llama.cpp then picks a value the
    host can take.

    Attributes:
        max_threads: most generation or batch threads (``-t``, ``-tb``); default: CPUs usable.
        max_threads_http: most HTTP threads (``--threads-http``); default: CPUs, at least 4.
        max_parallel: most parallel slots (``-np``).
        max_batch: largest logical and physical batch (``-b``, ``-ub``).
        max_context_tokens: largest context size x parallel slots (when the context size is
            set; ``0`` or unset leaves it to the model file).
    """

    max_threads: int = field(default_factory=usable_cpus)
    max_threads_http: int = field(default_factory=lambda: max(MIN_HTTP_THREADS_CAP, usable_cpus()))
    max_parallel: int = DEFAULT_MAX_PARALLEL
    max_batch: int = DEFAULT_MAX_BATCH
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{f.name}={value!r} must be a whole number of at least 1"
                raise InvalidArgumentError(msg)

    def limit(self, option: str) -> tuple[int, str] | None:
        """The cap on a ServerArgs field (``threads``, ``parallel``, ...) and its ``serve`` flag.

        ``ctx_size`` is bounded together with ``parallel`` (:meth:`check`), alone by
        ``max_context_tokens``.
        """
        limits = {
            "threads": (self.max_threads, "--max-threads"),
            "threads_batch": (self.max_threads, "--max-threads"),
            "threads_http": (self.max_threads_http, "--max-threads-http"),
            "parallel": (self.max_parallel, "--max-parallel"),
            "batch_size": (self.max_batch, "--max-batch"),
            "ubatch_size": (self.max_batch, "--max-batch"),
            "ctx_size": (self.max_context_tokens, "--max-context-tokens"),
        }
        return limits.get(option)

    def check(self, values: Mapping[str, int]) -> None:
        """Check effective option values (ServerArgs field names) against the caps.

        Raises:
            InvalidArgumentError: a value is above its cap, or context size x slots is.
        """
        for option, value in values.items():
            limit = self.limit(option)
            if option != "ctx_size" and limit is not None and value > limit[0]:
                msg = f"{option}={value} is above the server-wide cap of {limit[0]} (serve {limit[1]})"
                raise InvalidArgumentError(msg)
        ctx = values.get("ctx_size", 0)
        slots = max(values.get("parallel", 1), 1)
        if ctx > 0 and ctx * slots > self.max_context_tokens:
            msg = (
                f"context size x parallel slots = {ctx} x {slots} = {ctx * slots} tokens is above "
                f"the server-wide cap of {self.max_context_tokens} (serve --max-context-tokens)"
            )
            raise InvalidArgumentError(msg)


# -- which spellings are one option ----------------------------------------------------------


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
        self._numbers: dict[str, _Number] | None = None
        self._capped: dict[str, str] | None = None

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

    def number(self, flag: str) -> _Number | None:
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
                if f.name in _CAPPED:
                    self._capped[self.key(f.metadata["flags"][0])] = f.name
        return self._capped.get(self.key(flag))


# -- the operator's policy -------------------------------------------------------------------


@dataclass(frozen=True)
class FlagRule:
    """One flag a model accepts per request.

    Attributes:
        flag: the spelling the operator wrote (any spelling stands for the option).
        bounds: the range for its value; None = the flag's default bounds (or it takes no
            number).
    """

    flag: str
    bounds: Bounds | None = None


@dataclass(frozen=True)
class FlagPolicy:
    """Which ``X-Llama-Flags`` a model accepts; no rules (the default) = none at all."""

    rules: tuple[FlagRule, ...] = ()

    @property
    def enabled(self) -> bool:
        """Whether any per-request flag is allowed."""
        return bool(self.rules)

    @classmethod
    def from_table(cls, table: Mapping[str, object], *, caps: FlagCaps | None = None) -> FlagPolicy:
        """Read a ``request_flags`` table: ``flag = true`` or ``flag = {min = N, max = N}``.

        Args:
            table: flag spelling -> ``True`` or a mapping with ``min`` and/or ``max``.
            caps: when given, a ``max`` above a server-wide cap is refused.

        Raises:
            InvalidArgumentError: a flag that may not be set per request, the same option
                twice, bounds on a flag that takes no number, or bad bounds.
        """
        names = FlagNames()
        allowlist = allowed_untrusted_flags()
        rules: list[FlagRule] = []
        seen: dict[str, str] = {}
        for flag, value in table.items():
            if normalize_flag(flag) not in allowlist:
                msg = (
                    f"{flag!r} cannot be allowed per request: only tuning options can (not "
                    "addresses, files, downloads, keys or remote workers)"
                )
                raise InvalidArgumentError(msg)
            key = names.key(flag)
            if key in seen:
                msg = f"{seen[key]!r} and {flag!r} are the same option; list it once"
                raise InvalidArgumentError(msg)
            seen[key] = flag
            if value is True:
                rules.append(FlagRule(flag))
            elif isinstance(value, dict):
                rules.append(FlagRule(flag, _bounds(flag, value, names, caps)))
            else:
                msg = f"{flag} must be true or a table with min and/or max, not {value!r}"
                raise InvalidArgumentError(msg)
        return cls(tuple(rules))


def _bounds(
    flag: str, table: Mapping[str, object], names: FlagNames, caps: FlagCaps | None
) -> Bounds:
    unknown = sorted(set(table) - _BOUND_KEYS)
    if unknown:
        msg = f"{flag}: unknown key(s) {', '.join(unknown)}; use min and max"
        raise InvalidArgumentError(msg)
    number = names.number(flag)
    if number is None:
        msg = f"{flag} takes no number, so it has no bounds; write {flag} = true"
        raise InvalidArgumentError(msg)
    given: dict[str, float] = {}
    for end in ("min", "max"):
        if end not in table:
            continue
        value = table[end]
        if isinstance(value, bool) or not isinstance(value, int | float):
            what = "a whole number" if number.integer else "a number"
            msg = f"{flag} {end} must be {what}, not {value!r}"
            raise InvalidArgumentError(msg)
        if number.integer and not isinstance(value, int):
            msg = f"{flag} {end} must be a whole number, not {value!r}"
            raise InvalidArgumentError(msg)
        if value < number.floor:
            floor = "be negative" if number.floor == 0 else f"be below {_show(number.floor)}"
            msg = f"{flag} {end} {_show(value)} cannot {floor}"
            raise InvalidArgumentError(msg)
        given[end] = value
    low = given.get("min", number.default.low)
    high = given.get("max", number.default.high)
    if "min" in given and "max" in given and low > high:
        msg = f"{flag}: min {_show(low)} is above max {_show(high)}"
        raise InvalidArgumentError(msg)
    low, high = min(low, high), max(low, high)
    capped = names.capped(flag)
    cap = None if caps is None or capped is None else caps.limit(capped)
    if cap is not None and "max" in given and high > cap[0]:
        msg = f"{flag} max {_show(high)} is above the server-wide cap of {cap[0]} (serve {cap[1]})"
        raise InvalidArgumentError(msg)
    return Bounds(low, high)


# -- checking a request ----------------------------------------------------------------------


def split_flags_header(text: str) -> list[str]:
    """Split an ``X-Llama-Flags`` value into words; ``--flag=value`` becomes two words.

    Raises:
        InvalidArgumentError: the header is too long, holds control characters or is badly
            quoted.
    """
    if len(text) > MAX_FLAGS_HEADER:
        msg = f"{FLAGS_HEADER} is longer than {MAX_FLAGS_HEADER} characters"
        raise InvalidArgumentError(msg)
    if any(ord(ch) < 0x20 and ch != "\t" for ch in text):
        msg = f"{FLAGS_HEADER} contains control characters"
        raise InvalidArgumentError(msg)
    if text.isascii() and not _QUOTING.intersection(text):
        words = text.split()  # the same words, without shlex's per-character tokenizer
    else:
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
    return tokens


class FlagChecker:
    """Checks per-request flags and model configs against the policy, the binary and the caps.

    Cheap per request: the binary's options come from its cached ``--help``
    (:func:`~llama_proc.runtime.flags.probe_flags`), spellings are looked up once.

    Args:
        caps: the server-wide caps; None = :class:`FlagCaps` defaults.
        binary: what the installed llama-server accepts; None = not checked (a fake server).
    """

    def __init__(self, caps: FlagCaps | None = None, binary: BinaryFlags | None = None) -> None:
        self.caps = caps if caps is not None else FlagCaps()
        self.binary = binary
        self.names = FlagNames(binary)
        self._allowlist = allowed_untrusted_flags()
        self._rules: dict[FlagPolicy, dict[str, FlagRule]] = {}
        self._accepted: dict[tuple[str, ModelSpec], tuple[str, ...]] = {}

    def check_model(self, spec: ModelSpec) -> None:
        """Check a model's own options and ``extra_args`` against the caps.

        Raises:
            InvalidArgumentError: a value above a cap, or a capped flag whose value is not a
                whole number.
        """
        self.check_config(spec.options, spec.extra_args)

    def check_config(self, options: Mapping[str, object], extra_args: Sequence[str]) -> None:
        """Check ServerArgs options followed by trusted extra flags against the caps.

        Raises:
            InvalidArgumentError: a value above a cap, or a capped flag whose value is not a
                whole number.
        """
        self.caps.check(self._effective(options, extra_args))

    def check_request(self, header: str, spec: ModelSpec) -> tuple[str, ...]:
        """Check an ``X-Llama-Flags`` value for ``spec``; return the normalized flags.

        Raises:
            InvalidArgumentError: the model allows no per-request flags, or a flag is refused
                (the message says which and why, on one line).
        """
        accepted = self._accepted.get((header, spec))
        if accepted is not None:
            return accepted
        flags = self._check_request(header, spec)
        if len(self._accepted) >= MAX_CACHED_CHECKS:
            self._accepted.clear()
        self._accepted[header, spec] = flags
        return flags

    def _check_request(self, header: str, spec: ModelSpec) -> tuple[str, ...]:
        tokens = split_flags_header(header)
        if not tokens:
            return ()
        if not spec.request_flags.enabled:
            msg = (
                f"{FLAGS_HEADER} is not enabled for model {spec.id!r}: the operator allows "
                "flags per model in the models config's request_flags table"
            )
            raise InvalidArgumentError(msg)
        rules = self._rules_for(spec.request_flags)
        allowlist = self._allowlist
        i = 0
        while i < len(tokens):
            token = tokens[i]
            _printable_ascii(token)
            name = normalize_flag(token)
            if not token.startswith("-") or len(token) < 2:
                msg = f"unexpected word {token!r}: llama-server takes no positional arguments"
                raise InvalidArgumentError(msg)
            if name not in allowlist:
                msg = (
                    f"flag {token!r} is not allowed here: only tuning options may be set per "
                    "request (not addresses, files, downloads, keys or remote workers)"
                )
                raise InvalidArgumentError(msg)
            if self.binary is not None and name not in self.binary:
                where = f" ({self.binary.source})" if self.binary.source else ""
                msg = f"flag {token!r} is not accepted by this llama-server build{where}"
                raise InvalidArgumentError(msg)
            rule = rules.get(self.names.key(name))
            if rule is None:
                allowed = ", ".join(r.flag for r in spec.request_flags.rules)
                msg = f"flag {token!r} is not allowed for model {spec.id!r} (allowed: {allowed})"
                raise InvalidArgumentError(msg)
            if not self.names.takes_value(name):
                i += 1
                continue
            if i + 1 >= len(tokens):
                msg = f"flag {token!r} needs a value"
                raise InvalidArgumentError(msg)
            self._check_value(token, tokens[i + 1], rule, spec)
            i += 2
        # The allowlist's own value shapes (on|off|auto, cache types, template names).
        validate_extra_args(tokens, supported=self.binary)
        flags = normalize_flags(tokens, self.names)
        self.caps.check(self._effective(spec.options, (*spec.extra_args, *flags)))
        return flags

    def _rules_for(self, policy: FlagPolicy) -> dict[str, FlagRule]:
        rules = self._rules.get(policy)
        if rules is None:
            rules = self._rules[policy] = {self.names.key(r.flag): r for r in policy.rules}
        return rules

    def _check_value(self, flag: str, value: str, rule: FlagRule, spec: ModelSpec) -> None:
        _printable_ascii(value)
        number = self.names.number(flag)
        if number is None or value in number.words:
            return
        parsed = _parse_number(flag, value, number)
        bounds = rule.bounds or number.default
        if not bounds.contains(parsed):
            msg = f"{flag} {value} is not allowed for model {spec.id!r}: it must be {bounds}"
            raise InvalidArgumentError(msg)

    def _effective(self, options: Mapping[str, object], args: Sequence[str]) -> dict[str, int]:
        """The capped options' values once ``args`` follow ``options`` (the last one wins)."""
        values: dict[str, int] = {}
        for field_name in _CAPPED:
            typed = options.get(field_name)
            if isinstance(typed, int) and not isinstance(typed, bool):
                values[field_name] = typed
        i = 0
        while i < len(args):
            token = args[i]
            if not _is_flag(token):
                i += 1
                continue
            name, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
            option = self.names.capped(name)
            step = 1 if eq or not self.names.takes_value(name) else 2
            if option is not None:
                value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
                if not _INT_RE.fullmatch(value):
                    msg = f"{token} {value!r}: the value must be a whole number in ASCII digits"
                    raise InvalidArgumentError(msg)
                values[option] = int(value)
            i += step
        return values


def _printable_ascii(token: str) -> None:
    if not token.isascii() or not token.isprintable():
        msg = (
            f"{FLAGS_HEADER} word {token!a} is not printable ASCII; numbers take ASCII digits only"
        )
        raise InvalidArgumentError(msg)


def _parse_number(flag: str, value: str, number: _Number) -> float:
    sign = "an optional leading '-'" if number.signed else "no sign"
    if number.integer:
        if _INT_RE.fullmatch(value) and (number.signed or not value.startswith("-")):
            return int(value)
        words = f" or one of: {', '.join(number.words)}" if number.words else ""
        msg = (
            f"value {value!r} for {flag} is not valid: give a whole number (ASCII digits, at "
            f"most {MAX_NUMBER_DIGITS}, {sign}){words}"
        )
        raise InvalidArgumentError(msg)
    if _FLOAT_RE.fullmatch(value) and (number.signed or not value.startswith("-")):
        return float(value)
    msg = (
        f"value {value!r} for {flag} is not valid: give a decimal number like 0.5 (ASCII "
        f"digits, no exponent, {sign})"
    )
    raise InvalidArgumentError(msg)


# -- normalization ---------------------------------------------------------------------------


def _is_flag(token: str) -> bool:
    if len(token) < 2 or not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False  # a negative number is a value


def normalize_flags(flags: Sequence[str], names: FlagNames | None = None) -> tuple[str, ...]:
    """Canonical form of a checked flag list: one spelling per option, sorted by option.

    Each flag keeps the values that follow it. ``--x=v`` is split into ``--x v``; whole
    numbers lose leading zeros.

    Args:
        flags: the flags, split into words.
        names: which spellings are one option; None = this package's tables only.

    Raises:
        InvalidArgumentError: the same option is given twice (under any spellings, or with its
            negation): which one wins would depend on the order, which normalization drops.
    """
    names = names if names is not None else FlagNames()
    groups: list[tuple[str, list[str]]] = []
    seen: dict[str, str] = {}
    for token in flags:
        if _is_flag(token):
            name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
            key = names.key(name)
            if key in seen:
                msg = f"{seen[key]!r} and {name!r} set the same option; give it once"
                raise InvalidArgumentError(msg)
            seen[key] = name
            use = names.canonical(name)
            groups.append((key, [use, _canonical_value(use, value, names)] if eq else [use]))
        elif groups:
            groups[-1][1].append(_canonical_value(groups[-1][1][0], token, names))
        else:
            groups.append(("", [token]))
    groups.sort(key=lambda g: g[0])
    return tuple(token for _, group in groups for token in group)


def _canonical_value(flag: str, value: str, names: FlagNames) -> str:
    number = names.number(flag)
    if number is not None and number.integer and _INT_RE.fullmatch(value):
        return str(int(value))
    return value
