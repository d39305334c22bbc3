"""What a given llama-server binary accepts, read from its ``--help``.

llama.cpp renames and removes flags between builds (``--no-webui`` became ``--no-ui``,
``--flash-attn`` grew an ``on|off|auto`` value, ``--mlock``/``--no-mmap`` gave way to
``--load-mode``). :class:`~llama_proc.runtime.args.ServerArgs` asks the installed binary which
spelling it knows instead of hard-coding one build's names.

Every option is printed by ``common_arg::to_string()`` as one line starting at column 0::

    -c,    --ctx-size N                     size of the prompt context (default: 0, ...)
    -kvo,  --kv-offload, -nkvo, --no-kv-offload
    -fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', ...)

flags separated by ``", "``, then the value hint after one space, then the description after
at least three spaces (or on the next line, indented). Description lines are always indented,
so every line that starts with ``-`` is an option.

The parsed result is cached in memory per (path, mtime, size): ``--help`` is cheap (tens of ms)
but a pool starting many servers should not pay it each time.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Mapping

__all__ = ["BinaryFlags", "clear_flags_cache", "parse_help", "probe_flags"]

logger = logging.getLogger(__name__)

HELP_TIMEOUT: Final = 30.0
"""Seconds ``llama-server --help`` may take before the probe gives up."""

_OPTION_LINE: Final = re.compile(
    r"^(?P<flags>-[^\s,]+(?:,\s+-[^\s,]+)*)(?: (?P<hint>\S.*?))?(?:\s{2,}|\s*$)"
)
_ENV_HINT: Final = re.compile(r"\(env: (?P<env>[A-Z0-9_]+)\)")


@dataclass(frozen=True)
class BinaryFlags:
    """The options one llama-server build accepts.

    ``hints`` maps every spelling (``-c``, ``--ctx-size``) to the value hint printed after it
    (``"N"``, ``"[on|off|auto]"``), or ``""`` for switches that take no value.
    """

    hints: Mapping[str, str]
    envs: Mapping[str, str] = field(default_factory=dict)
    """Spelling -> environment variable llama-server also reads for that option."""
    source: str = ""
    """Where the flags came from (the binary's path), for messages."""

    def __contains__(self, flag: object) -> bool:
        return isinstance(flag, str) and normalize_flag(flag) in self.hints

    def takes_value(self, flag: str) -> bool:
        """Whether ``flag`` expects a value after it (False for unknown flags)."""
        return bool(self.hints.get(normalize_flag(flag), ""))

    def first_known(self, candidates: Iterable[str]) -> str | None:
        """The first spelling of ``candidates`` this binary accepts, or None."""
        for flag in candidates:
            if flag in self:
                return flag
        return None


def normalize_flag(flag: str) -> str:
    """Spell ``flag`` the way llama.cpp looks it up: ``--a_b`` is ``--a-b``; short flags as is."""
    return flag.replace("_", "-") if flag.startswith("--") else flag


def parse_help(text: str, source: str = "") -> BinaryFlags:
    """Parse ``llama-server --help`` output into a :class:`BinaryFlags`."""
    hints: dict[str, str] = {}
    envs: dict[str, str] = {}
    current: list[str] = []
    for line in text.splitlines():
        # "----- common params -----" section headers also start with a dash.
        if line.startswith("-") and not line.startswith("---"):
            match = _OPTION_LINE.match(line)
            if match is None:
                current = []
                continue
            hint = (match.group("hint") or "").strip()
            current = [f.strip() for f in match.group("flags").split(",")]
            for flag in current:
                hints[flag] = hint
        env = _ENV_HINT.search(line)
        if env and current:
            for flag in current:
                envs[flag] = env.group("env")
    return BinaryFlags(hints, envs, source)


_CACHE: dict[tuple[str, int, int], BinaryFlags | None] = {}
_CACHE_LOCK = threading.Lock()


def clear_flags_cache() -> None:
    """Forget every probed binary (tests; or after replacing a binary in place)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def probe_flags(
    binary: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> BinaryFlags | None:
    """Run ``binary --help`` once per (path, mtime, size) and parse it.

    Returns None when the binary cannot be run or prints nothing that looks like llama.cpp's
    option list (a wrapper script, a fake server in tests): callers then pass options
    without gating instead of refusing them.

    Args:
        binary: the llama-server executable.
        env: environment for the probe; llama-server parses ``LLAMA_ARG_*`` variables even
            for ``--help``, so pass the same cleaned environment the server will get.
    """
    path = Path(binary)
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    flags = _run_help(path, env)
    with _CACHE_LOCK:
        _CACHE[key] = flags
    return flags


def _run_help(path: Path, env: Mapping[str, str] | None) -> BinaryFlags | None:
    try:
        proc = subprocess.run(
            [str(path), "--help"],
            capture_output=True,
            timeout=HELP_TIMEOUT,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("could not run %s --help (%s); passing options without checking", path, err)
        return None
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    flags = parse_help(text, str(path))
    if "--port" not in flags or "--host" not in flags:
        logger.warning(
            "%s --help does not list --host/--port; passing options without checking", path
        )
        return None
    logger.debug("%s accepts %d option spellings", path, len(flags.hints))
    return flags
