"""What the provisioning commands print alike: explanation steps, sizes, compute and selection lines.

Light on purpose: ``which`` on a cache hit imports only this, the resolver and the record.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Final, TextIO

from llama_proc.provision.cache.record import compute_summary
from llama_proc.provision.explain import Step
from llama_proc.vocab import AUTO

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from llama_proc.provision.cache.record import Install
    from llama_proc.provision.host.selection import Blocker, Selection


_MB: Final = 1024 * 1024


def print_steps(
    lines: Sequence[str], *, skip: Collection[str] = (), out: TextIO | None = None
) -> None:
    """Print explanation lines, indented, to ``out`` (stderr).

    Args:
        lines: what the resolver explained; its rungs are
            :class:`~llama_proc.provision.explain.Step` objects, read by field, never by text.
        skip: rungs (:class:`~llama_proc.provision.explain.StepName`) to leave out.
        out: where to print; stderr when None.
    """
    for line in lines:
        if not (isinstance(line, Step) and line.step in skip):
            print(f"  {line}", file=out or sys.stderr)


def print_err(line: str) -> None:
    print(line, file=sys.stderr)


def size_mb(num: object) -> str:
    return f"{num / _MB:.1f} MB" if isinstance(num, int) else "?"


def compute_line(install: Install) -> str:
    """What the compute check said of the install in use (explicit binaries are never run)."""
    if not install.metadata:
        return "compute: not checked (an explicit binary is used as it is)"
    return f"compute: {compute_summary(install.compute)}"


def attestation_line(install: Install) -> str:
    """What the build-provenance attestation check said of the install in use."""
    found = install.metadata.get("attestation") if install.metadata else None
    if not isinstance(found, dict):
        if install.source != "prebuilt":
            return "attestation: none (only release archives are attested)"
        return "attestation: not checked (installed before attestations were checked)"
    state = found.get("state")
    if state == "absent":
        return "attestation: absent (the release serves none for this archive; sha256 only)"
    return f"attestation: {state} ({found.get('detail') or 'no detail'})"


def chain_lines(selection: Selection, requested: str) -> list[str]:
    """The variants the selection considered: why each was skipped, and the one it took.

    Read from :attr:`Selection.candidates` and their :class:`Blocker` kinds and texts, never
    from the selection's reasoning lines.
    """
    auto = requested == AUTO
    # Only with a selection in hand, so the selection module is loaded already.
    from llama_proc.provision.host.selection import AUTO_CHAIN

    lines = [f"auto chain: {' -> '.join(AUTO_CHAIN)}" if auto else f"requested: {requested}"]
    chosen = None
    for candidate in selection.candidates:
        if candidate.variant is selection.variant:
            chosen = candidate
        else:
            lines.append(f"skip {candidate.variant.id}: {reasons(candidate.blockers)}")
    how = "the first in the chain with nothing against it"
    if not auto:
        how = f"requested with --variant {requested}"
    lines.append(f"use {selection.variant.id}: {how}")
    lines.extend(f"warning: {b.text} [{b.kind}]" for b in (chosen.blockers if chosen else ()))
    return lines


def reasons(blockers: Sequence[Blocker]) -> str:
    return "; ".join(f"{b.text} [{b.kind}]" for b in blockers) or "passed over"
