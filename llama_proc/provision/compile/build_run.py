"""Running a planned build: the :class:`Run` helper, progress from the output, and :func:`run_build`.

Every build command goes through one :class:`Run`: it logs the command, appends all output to
the build folder's ``build.log`` (kept), drives a progress bar from Ninja's ``[n/m]`` and make's
``[ nn%]`` lines, and on failure raises :class:`~llama_proc.errors.BuildError` with the log tail
and a diagnosed likely cause (:func:`~llama_proc.provision.compile.build_diagnosis.diagnose`). An
interrupted command is stopped with its whole process tree (compilers included).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from tqdm import tqdm

from llama_proc._proc import group_popen_kwargs, stop_tree
from llama_proc.errors import BuildError, ToolNotFoundError
from llama_proc.provision.cache.locking import cache_lock, lock_path
from llama_proc.provision.compile.build_diagnosis import diagnose, error_tail

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from llama_proc.provision.compile.build_plan import BuildPlan
    from llama_proc.provision.views import FetchView

__all__ = ["BuildResult", "Run", "parse_progress", "run_build"]

logger = logging.getLogger(__name__)

CONFIGURED_MARKER: Final = "llama-proc-configure.json"
"""Written after a successful configure; a matching one lets a rebuild skip configuring."""
STOP_GRACE: Final = 10.0
"""Seconds an interrupted build gets to stop its compilers before they are killed."""
MAX_KEPT_LINES: Final = 20000
"""Output lines of one command kept in memory for the diagnosis (all of it goes to the log)."""
_NINJA_RE: Final = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_RE: Final = re.compile(r"^\[\s*(\d+)%\]")


def parse_progress(line: str) -> tuple[int, int] | None:
    """``(done, total)`` from a Ninja ``[12/220]`` or make ``[ 45%]`` line, else None."""
    match = _NINJA_RE.match(line)
    if match:
        return int(match.group(1)), int(match.group(2))
    match = _MAKE_RE.match(line)
    if match:
        return int(match.group(1)), 100
    return None


class Run:
    """Run build commands: log each, append its output to a log file, show progress, diagnose.

    Args:
        log_path: the log file (appended to; created with its folder).
        env: extra environment variables for the commands.
        progress: force the progress bar on/off; None = only when stderr is a terminal.
        desc: progress bar label.
    """

    def __init__(
        self,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        progress: bool | None = None,
        desc: str = "build",
    ) -> None:
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.progress = progress
        self.desc = desc
        self.last_progress: tuple[int, int] | None = None

    def __call__(
        self, cmd: Sequence[str], *, cwd: Path | None = None, show_progress: bool = False
    ) -> list[str]:
        """Run ``cmd`` to completion and return its output lines.

        Raises:
            ToolNotFoundError: the program does not exist.
            BuildError: it exited with a non-zero status (with log tail and likely cause).
        """
        command = [str(c) for c in cmd]
        logger.info("running: %s", shlex.join(command))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        lines: collections.deque[str] = collections.deque(maxlen=MAX_KEPT_LINES)
        bar: Any = None
        # Line-buffered so `tail -f build.log` follows a long build as it happens.
        with self.log_path.open("a", encoding="utf-8", errors="replace", buffering=1) as log:
            log.write(f"\n$ {shlex.join(command)}\n")
            try:
                proc = subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    encoding="utf-8",
                    errors="replace",
                    env=self.env,
                    cwd=cwd,
                    # Its own process group, so an interrupt can stop the whole build tree.
                    **group_popen_kwargs(),
                )
            except FileNotFoundError as err:
                msg = f"cannot run {command[0]}: not found; run `pip install cmake ninja`"
                raise ToolNotFoundError(msg) from err
            with proc:  # closes the pipe and reaps the child on every path
                try:
                    assert proc.stdout is not None  # noqa: S101 - stdout=PIPE above
                    for raw in proc.stdout:
                        log.write(raw)
                        line = raw.rstrip("\r\n")
                        lines.append(line)
                        logger.debug("%s", line)
                        if show_progress:
                            bar = self._advance(bar, line)
                    returncode = proc.wait()
                except BaseException:
                    # Ctrl-C or a broken pipe: leave no compiler running in the background.
                    # SIGINT first, like a Ctrl-C: cmake and Ninja then stop their compilers.
                    stop_tree(proc, STOP_GRACE, first_signal=signal.SIGINT)
                    raise
                finally:
                    if bar is not None:
                        bar.close()
            log.write(f"# exit code {returncode}\n")
        if returncode != 0:
            kept = list(lines)
            hint = diagnose(kept, returncode)
            raise BuildError(command, returncode, error_tail(kept), hint, str(self.log_path))
        return list(lines)

    def _advance(self, bar: Any, line: str) -> Any:
        step = parse_progress(line)
        if step is None:
            return bar
        done, total = step
        self.last_progress = step
        if bar is None:
            bar = tqdm(
                total=total,
                desc=self.desc,
                unit="step",
                file=sys.stderr,
                # None lets tqdm hide itself when stderr is not a terminal.
                disable=None if self.progress is None else not self.progress,
                leave=False,
            )
        if bar.total != total:
            bar.total = total
        bar.update(max(done - bar.n, 0))
        return bar


@dataclass(frozen=True)
class BuildResult:
    """What :func:`run_build` produced."""

    bin_dir: Path
    seconds: float
    configured: bool
    """Whether CMake's configure step ran (False when a matching configure was reused)."""
    steps: int | None
    """Build steps Ninja/make reported (None when it printed none)."""


def _configure_record(plan: BuildPlan) -> dict[str, Any]:
    return {"command": plan.configure_command()}


def _needs_configure(plan: BuildPlan) -> bool:
    marker = plan.build_dir / CONFIGURED_MARKER
    if not (plan.build_dir / "CMakeCache.txt").is_file() or not marker.is_file():
        return True
    try:
        return bool(json.loads(marker.read_text(encoding="utf-8")) != _configure_record(plan))
    except (OSError, ValueError):
        return True


def _forget_configure(build_dir: Path) -> None:
    """Drop a failed configure's cache so a fixed toolchain is detected again next time."""
    (build_dir / CONFIGURED_MARKER).unlink(missing_ok=True)
    (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


def run_build(plan: BuildPlan, settings: FetchView) -> BuildResult:
    """Configure (unless a matching configure exists) and build the plan's targets.

    The build folder is locked for the whole run: the cpu and rpc variants share it.

    Args:
        plan: what to run (:func:`~llama_proc.provision.compile.build_plan.plan_build`).
        settings: ``progress`` (the progress bar) and ``lock_timeout``.

    Raises:
        BuildError: configure or build failed.
        ToolNotFoundError: cmake disappeared.
        CacheLockTimeoutError: another process held the build folder too long.
    """
    plan.build_dir.mkdir(parents=True, exist_ok=True)
    run = Run(
        plan.log_path, env=plan.env, progress=settings.progress, desc=f"building {plan.variant_id}"
    )
    started = time.monotonic()
    with cache_lock(lock_path(plan.build_dir), settings.lock_timeout):
        configured = _needs_configure(plan)
        if configured:
            logger.info("configuring %s in %s", plan.source.path, plan.build_dir)
            try:
                run(plan.configure_command())
            except BuildError:
                _forget_configure(plan.build_dir)
                raise
            (plan.build_dir / CONFIGURED_MARKER).write_text(
                json.dumps(_configure_record(plan), indent=1), encoding="utf-8"
            )
        logger.info("building targets %s with %d jobs", ", ".join(plan.targets), plan.jobs)
        run(plan.build_command(), show_progress=True)
    seconds = time.monotonic() - started
    bin_dir = plan.build_dir / "bin"
    if (bin_dir / plan.config).is_dir():  # multi-config generators (Visual Studio, Xcode)
        bin_dir = bin_dir / plan.config
    steps = run.last_progress[1] if run.last_progress else None
    return BuildResult(bin_dir=bin_dir, seconds=seconds, configured=configured, steps=steps)
