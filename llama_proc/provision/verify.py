"""The ``--version`` smoke check every install passes before it is committed to the cache.

:func:`smoke_check` runs the new binary once (``llama-server --version``) so that an archive for
the wrong CPU, a missing shared library or a broken build fails at install time with a clear
reason, not at the first ``serve``. :func:`parse_version_output` reads what it printed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

from llama_proc._childenv import child_environment
from llama_proc._proc import run_with_timeout
from llama_proc.diagnosis import diagnose
from llama_proc.errors import ProvisionError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["SMOKE_TIMEOUT", "parse_version_output", "smoke_check"]

SMOKE_TIMEOUT: Final = 60.0
"""Seconds ``llama-server --version`` may take (first runs on slow disks load many libraries)."""
_VERSION_LINE_RE: Final = re.compile(r"^\s*version:\s*(.+?)\s*$", re.MULTILINE)
_BUILD_NUMBER_RE: Final = re.compile(
    r"^(?:(\d+)\s*\((\w+)\)|.*\(build\s+(\d+),\s*commit\s+(\w+)\))"
)
_TAIL_LINES: Final = 3


def parse_version_output(text: str) -> dict[str, Any]:
    """Pull the ``version:`` line (and build number / commit) out of ``--version`` output.

    Formats: ``version: 10216 (876a432)`` and ``version: 0.6.0-dev (build 11434, commit abc)``.
    """
    match = _VERSION_LINE_RE.search(text)
    if match is None:
        return {"version": None, "build_number": None, "commit": None}
    line = match.group(1)
    parts = _BUILD_NUMBER_RE.match(line)
    number = commit = None
    if parts:
        number = int(parts.group(1) or parts.group(3))
        commit = parts.group(2) or parts.group(4)
    return {"version": f"version: {line}", "build_number": number, "commit": commit}


def smoke_check(binary: Path, *, timeout: float = SMOKE_TIMEOUT) -> str:
    """Run ``binary --version`` and return its output (llama-server prints it to stderr).

    A failure is decoded by :func:`llama_proc.diagnosis.diagnose`, the same decoder the runtime
    uses for a server that fails to start, so both name a cause the same way.

    Raises:
        ProvisionError: it did not start, failed, crashed or hung.
    """
    ran = run_with_timeout(
        [str(binary), "--version"], timeout, env=child_environment(), cwd=binary.parent
    )
    if ran is None:
        msg = (
            f"{binary} cannot run on this host: it could not be started (missing, not "
            "executable, or made for another system); fetch again or pick another --variant"
        )
        raise ProvisionError(msg)
    if ran.timed_out:
        msg = f"{binary} --version did not finish within {timeout:g}s; the binary looks broken"
        raise ProvisionError(msg)
    if ran.returncode != 0:
        tail = " | ".join(ran.output.strip().splitlines()[-_TAIL_LINES:]) or "no output"
        cause = diagnose(ran.output, ran.returncode)
        why = str(cause) if cause.is_known else f"exit code {ran.returncode}"
        msg = f"{binary} --version failed ({why}): {tail}"
        raise ProvisionError(msg)
    return ran.output
