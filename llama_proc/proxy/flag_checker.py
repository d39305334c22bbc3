"""Checking per-request flags (``X-Llama-Flags``) and model configs, and normalizing them.

:meth:`FlagChecker.check_request` runs before the server pool is touched, so a refused request
never starts, stops or evicts anything; :func:`normalize_flags` gives equivalent requests one
form so they share a server.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING, Final

from llama_proc.errors import InvalidArgumentError
from llama_proc.proxy.flag_caps import CAPPED, FlagCaps
from llama_proc.proxy.flag_names import FlagNames, is_flag
from llama_proc.runtime.args import allowed_untrusted_flags, validate_extra_args
from llama_proc.runtime.flags import normalize_flag

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from llama_proc.proxy.flag_names import Number
    from llama_proc.proxy.flag_policy import FlagPolicy, FlagRule
    from llama_proc.proxy.model_spec import ModelSpec
    from llama_proc.runtime.flags import BinaryFlags

__all__ = [
    "FLAGS_HEADER",
    "MAX_FLAGS_HEADER",
    "MAX_NUMBER_DIGITS",
    "FlagChecker",
    "normalize_flags",
    "split_flags_header",
]

FLAGS_HEADER: Final = "X-Llama-Flags"
MAX_FLAGS_HEADER: Final = 4096
"""Longest X-Llama-Flags value accepted, in characters."""
MAX_NUMBER_DIGITS: Final = 12
"""Most digits in a number given per request (before and after a decimal point each)."""
_INT_RE: Final = re.compile(rf"-?[0-9]{{1,{MAX_NUMBER_DIGITS}}}")
_FLOAT_RE: Final = re.compile(
    rf"-?[0-9]{{1,{MAX_NUMBER_DIGITS}}}(?:\.[0-9]{{1,{MAX_NUMBER_DIGITS}}})?"
)
_QUOTING: Final = frozenset("'\"\\")
MAX_CACHED_CHECKS: Final = 1024
"""Accepted (header, model) pairs remembered, so a repeated header costs a dict lookup."""


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
        for field_name in CAPPED:
            typed = options.get(field_name)
            if isinstance(typed, int) and not isinstance(typed, bool):
                values[field_name] = typed
        i = 0
        while i < len(args):
            token = args[i]
            if not is_flag(token):
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


def _parse_number(flag: str, value: str, number: Number) -> float:
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
        if is_flag(token):
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
