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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from llama_proc.errors import InvalidArgumentError
from llama_proc.proxy.flag_names import Bounds, FlagNames, show_number
from llama_proc.runtime.args import allowed_untrusted_flags
from llama_proc.runtime.flags import normalize_flag

if TYPE_CHECKING:
    from collections.abc import Mapping

    from llama_proc.proxy.flag_caps import FlagCaps

__all__ = ["FlagPolicy", "FlagRule"]

_BOUND_KEYS: Final = frozenset({"min", "max"})


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
            floor = "be negative" if number.floor == 0 else f"be below {show_number(number.floor)}"
            msg = f"{flag} {end} {show_number(value)} cannot {floor}"
            raise InvalidArgumentError(msg)
        given[end] = value
    low = given.get("min", number.default.low)
    high = given.get("max", number.default.high)
    if "min" in given and "max" in given and low > high:
        msg = f"{flag}: min {show_number(low)} is above max {show_number(high)}"
        raise InvalidArgumentError(msg)
    low, high = min(low, high), max(low, high)
    capped = names.capped(flag)
    cap = None if caps is None or capped is None else caps.limit(capped)
    if cap is not None and "max" in given and high > cap[0]:
        msg = f"{flag} max {show_number(high)} is above the server-wide cap of {cap[0]} (serve {cap[1]})"
        raise InvalidArgumentError(msg)
    return Bounds(low, high)
