"""Structured explanations of the resolution ladder: one :class:`Step` per decision.

The resolver (:func:`~llama_proc.provision.resolve.resolve_server`) appends a :class:`Step` to
the caller's ``explain`` list for every rung it looks at. A step carries its facts as fields
(:attr:`Step.step`, :attr:`Step.outcome`, :attr:`Step.reason`) for code such as ``doctor`` to
read, and *is* its printed line (``"cache: hit b1234/linux-x86_64-cpu (prebuilt, ...)"``): it
subclasses ``str``, so printing, comparing, ``in`` tests and JSON stay exactly what they were
when explanations were plain lines, and plain lines from other producers (the source build's
progress notes) can share the same list.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, NoReturn, Self

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["Outcome", "Step", "StepName", "steps"]


class StepName(StrEnum):
    """The rungs of the resolution ladder, in the order they are tried."""

    EXPLICIT = "explicit"
    """``LLAMA_PROC_SERVER_BIN`` names the binary."""
    SELECT = "select"
    """Choosing the manifest variant for this host (one step per reason)."""
    BUNDLED = "bundled"
    """The install shipped inside the wheel."""
    CACHE = "cache"
    """A complete install already in the cache."""
    PREBUILT = "prebuilt"
    """Downloading the upstream release archive."""
    BUILD = "build"
    """Compiling llama.cpp from source."""


class Outcome(StrEnum):
    """What a step came to."""

    USED = "used"
    """This step produced the install that is returned."""
    SKIPPED = "skipped"
    """Not tried, or looked and found nothing usable (the reason says which)."""
    FAILED = "failed"
    """Tried and raised an error (the reason holds it)."""
    NOTE = "note"
    """A fact on the way (the selection's reasoning, a warning, work started)."""


_FIELDS: Final = ("step", "outcome", "reason")


class Step(str):
    """One explanation line, built from its fields: ``f"{step}: {reason}"``.

    Immutable, picklable and equal to its text, like the ``str`` it is.

    Attributes:
        step: the rung.
        outcome: what it came to.
        reason: the human part of the line, after ``"<step>: "``.
    """

    step: StepName
    outcome: Outcome
    reason: str

    def __new__(cls, step: StepName, outcome: Outcome, reason: str) -> Self:  # noqa: D102
        self = super().__new__(cls, f"{step}: {reason}")
        # Set through object so that the class's own __setattr__ can refuse every later change.
        # A str subclass keeps its attributes in a per-instance dict (str allows no __slots__).
        values = (StepName(step), Outcome(outcome), str(reason))
        for name, value in zip(_FIELDS, values, strict=True):
            object.__setattr__(self, name, value)
        return self

    @property
    def text(self) -> str:
        """The printed line, as a plain ``str``."""
        return str.__str__(self)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        msg = f"Step is immutable; cannot set {name!r}"
        raise AttributeError(msg)

    def __delattr__(self, name: str) -> NoReturn:
        msg = f"Step is immutable; cannot delete {name!r}"
        raise AttributeError(msg)

    def __getnewargs__(self) -> tuple[StepName, Outcome, str]:  # type: ignore[override]
        return (self.step, self.outcome, self.reason)

    def __repr__(self) -> str:
        return f"Step({self.step.value!r}, {self.outcome.value!r}, {self.reason!r})"


def steps(lines: Iterable[str]) -> list[Step]:
    """The structured steps among ``lines`` (plain lines from other producers are left out)."""
    return [line for line in lines if isinstance(line, Step)]
