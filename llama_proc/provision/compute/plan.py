"""Proving a new install computes, and walking down the ladder when it does not.

The caller (a source build, a prebuilt download) describes what it can do in a
:class:`ComputePlan`: the host's feature-group ladder, the groups it already turned off while
populating the staging folder (known-bad ones from the manifest, ``LLAMA_PROC_CPU_OFF``), and a
``repair`` function that makes the staging folder again with more groups off (a rebuild with
more compiler flags, or fewer CPU-variant libraries). :func:`prove_computes` runs the check,
repairs on a failure that points at the CPU, and returns the record for ``install.json``; when
no rung is left it raises :class:`~llama_proc.errors.ComputeCheckError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ComputeCheckError
from llama_proc.provision.compute import check
from llama_proc.provision.compute.ladder import feature_group, host_ladder

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping
    from pathlib import Path

    from llama_proc.provision.compute.check import ComputeReport
    from llama_proc.provision.compute.ladder import FeatureGroup

__all__ = ["ComputePlan", "initial_off", "prove_computes"]

logger = logging.getLogger(__name__)

ASKED: Final = "asked for (LLAMA_PROC_CPU_OFF / --cpu-off)"


@dataclass(frozen=True)
class ComputePlan:
    """How one install is proven to compute, and how it can be repaired."""

    ladder: tuple[FeatureGroup, ...] = ()
    """This host's rungs, newest first (:func:`~.ladder.host_ladder`)."""
    off: Mapping[str, str] = field(default_factory=dict)
    """Groups already off in the staging folder -> why."""
    repair: Callable[[Path, tuple[FeatureGroup, ...]], Mapping[str, Any] | None] | None = None
    """Makes the staging folder again with these groups off; returns metadata updates, or
    None when it could change nothing (no library uses the group)."""
    gpu_layers: int = 0
    threads: int | None = None
    library_path: str | None = None

    def next_rung(self, off: Collection[FeatureGroup]) -> FeatureGroup | None:
        """The newest group of the ladder that is still on."""
        return next((g for g in self.ladder if g not in off), None)


def initial_off(
    arch: str,
    cpu_features: Collection[str],
    known_bad: Mapping[str, str],
    asked: Collection[str] = (),
) -> tuple[tuple[FeatureGroup, ...], dict[str, str]]:
    """This host's ladder, and the groups to turn off from the start (-> why).

    A group is off from the start when the manifest knows it is broken in this build or the
    user asked; groups this CPU does not have are left alone (nothing would use them).
    """
    ladder = host_ladder(arch, cpu_features)
    off: dict[str, str] = {}
    for group in ladder:
        if group.name in known_bad:
            off[group.name] = f"known broken in this build: {known_bad[group.name]}"
        elif group.name in asked:
            off[group.name] = ASKED
    return ladder, off


def _record(
    report: ComputeReport, off: list[FeatureGroup], why: dict[str, str], tried: list[ComputeReport]
) -> dict[str, Any]:
    record = report.to_json()
    record["features_off"] = [g.name for g in off]
    record["why_off"] = {g.name: why[g.name] for g in off}
    record["attempts"] = [r.reason for r in tried]
    return record


def prove_computes(
    staging: Path, plan: ComputePlan, server: Callable[[], Path]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the staged install; repair it down the ladder while the failure points at the CPU.

    Args:
        staging: the install's staging folder.
        plan: what to check and how to repair.
        server: finds the staged llama-server (again after each repair).

    Returns:
        The compute record for ``install.json``, and the metadata updates the repairs made.

    Raises:
        ComputeCheckError: the check failed and no rung is left (or the failure is not one a
            CPU feature explains); the message names every attempt.
    """
    off = [feature_group(name) for name in plan.off]
    why = dict(plan.off)
    updates: dict[str, Any] = {}
    tried: list[ComputeReport] = []
    while True:
        report = check.run_compute_check(
            server(),
            threads=plan.threads,
            gpu_layers=plan.gpu_layers,
            library_path=plan.library_path,
        )
        tried.append(report)
        if report.ok:
            logger.info("compute check: %s", report.reason)
            return _record(report, off, why, tried), updates
        rung = plan.next_rung(off)
        if not report.points_at_cpu or rung is None or plan.repair is None:
            raise ComputeCheckError(_failure(report, off, tried, plan, rung))
        logger.warning(
            "compute check failed (%s); installing again without %s", report.reason, rung.label
        )
        off.append(rung)
        why[rung.name] = f"the compute check failed with it on: {report.reason}"
        changed = plan.repair(staging, tuple(off))
        if changed is None:
            off.pop()
            raise ComputeCheckError(_failure(report, off, tried, plan, None))
        updates.update(changed)


def _failure(
    report: ComputeReport,
    off: list[FeatureGroup],
    tried: list[ComputeReport],
    plan: ComputePlan,
    rung: FeatureGroup | None,
) -> str:
    done = ", ".join(g.name for g in off) or "none"
    if report.points_at_cpu and rung is not None and plan.repair is None:
        hint = (
            f"this kind of install cannot be repaired here; try LLAMA_PROC_CPU_OFF={rung.name} "
            "with `llama-proc build --force`"
        )
    elif report.points_at_cpu:
        hint = (
            "every CPU feature group this host has is already off: report it upstream with "
            "`llama-proc doctor` output, or set LLAMA_PROC_COMPUTE_CHECK=0 to install anyway"
        )
    else:
        hint = "see the server log lines above; set LLAMA_PROC_COMPUTE_CHECK=0 to install anyway"
    tail = "; ".join(report.log_tail[-3:])
    attempts = len(tried)
    return (
        f"the new llama-server does not compute correctly on this host: {report.reason} "
        f"({attempts} attempt{'s' if attempts != 1 else ''}; CPU feature groups off: {done}); "
        f"nothing was installed; {hint}" + (f". Last server lines: {tail}" if tail else "")
    )
