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

``--help`` costs tens of milliseconds, most of a server's start-up overhead, so the parsed
result is remembered per binary identity (resolved path, size, mtime, inode): in memory, and on
disk under the user cache (``<cache_dir>/flags/``, see :attr:`~llama_proc.config.Settings.cache_dir`),
so even the first start in a new process skips it. A binary replaced in place has a new
identity and is probed again; an unwritable cache only costs the probe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._proc import run_with_timeout
from llama_proc.config import Settings
from llama_proc.errors import ConfigError
from llama_proc.vocab import FLAGS_CACHE_FOLDER

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = ["BinaryFlags", "clear_flags_cache", "parse_help", "probe_flags", "server_command"]

logger = logging.getLogger(__name__)

HELP_TIMEOUT: Final = 30.0
"""Seconds ``llama-server --help`` may take before the probe gives up."""
FLAGS_CACHE_SCHEMA: Final = 2
"""Version of the on-disk record; a record of another version is ignored."""

UNIFIED_BINARY_NAMES: Final = frozenset({"llama", "llama.exe"})
"""The official installer's one binary: ``llama serve`` takes llama-server's flags."""
UNIFIED_SERVE_COMMAND: Final = "serve"

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
    lines: tuple[tuple[str, ...], ...] = ()
    """Every option's spellings as one ``--help`` line prints them (a switch's negations
    included: ``("-kvo", "--kv-offload", "-nkvo", "--no-kv-offload")``)."""

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

    def spellings(self, flag: str) -> tuple[str, ...]:
        """Every spelling of the option ``flag`` names, in ``--help`` order (``()`` if unknown).

        The spellings of one option, and a switch's negations, share a ``--help`` line:
        ``--temp``, ``--temperature`` or ``-kvo``, ``--no-kv-offload`` are one option.
        """
        return self._line_of.get(normalize_flag(flag), ())

    @cached_property
    def _line_of(self) -> dict[str, tuple[str, ...]]:
        return {spelling: line for line in self.lines for spelling in line}


def normalize_flag(flag: str) -> str:
    """Spell ``flag`` the way llama.cpp looks it up: ``--a_b`` is ``--a-b``; short flags as is."""
    return flag.replace("_", "-") if flag.startswith("--") else flag


def parse_help(text: str, source: str = "") -> BinaryFlags:
    """Parse ``llama-server --help`` output into a :class:`BinaryFlags`."""
    hints: dict[str, str] = {}
    envs: dict[str, str] = {}
    lines: list[tuple[str, ...]] = []
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
            lines.append(tuple(current))
            for flag in current:
                hints[flag] = hint
        env = _ENV_HINT.search(line)
        if env and current:
            for flag in current:
                envs[flag] = env.group("env")
    return BinaryFlags(hints, envs, source, tuple(lines))


_Identity = tuple[str, int, int, int]
"""(resolved path, size, mtime in ns, inode): a binary replaced in place gets a new one."""
_CACHE: dict[_Identity, BinaryFlags | None] = {}
_CACHE_LOCK = threading.Lock()


def clear_flags_cache() -> None:
    """Forget every probed binary in memory (tests); on-disk records check identity anyway."""
    with _CACHE_LOCK:
        _CACHE.clear()


def server_command(binary: str | os.PathLike[str]) -> list[str]:
    """The argv that runs ``binary`` as llama-server, before llama-server's own flags.

    ``[binary]``, or ``[binary, "serve"]`` for a binary named ``llama`` (``llama.exe``): the one
    binary the official installer (llama.app) puts on PATH, whose ``serve`` subcommand is
    llama-server.
    """
    path = Path(binary)
    if path.name.lower() in UNIFIED_BINARY_NAMES:
        return [str(path), UNIFIED_SERVE_COMMAND]
    return [str(path)]


def probe_flags(
    binary: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    settings: Settings | None = None,
) -> BinaryFlags | None:
    """Run ``binary --help`` once per binary identity and parse it.

    Returns None when the binary cannot be run or prints nothing that looks like llama.cpp's
    option list (a wrapper script, a fake server in tests): callers then pass options
    without gating instead of refusing them.

    Args:
        binary: the llama-server executable.
        env: environment for the probe; llama-server parses ``LLAMA_ARG_*`` variables even
            for ``--help``, so pass the same cleaned environment the server will get.
        settings: where the on-disk record lives (``settings.cache_dir``); None =
            :meth:`Settings.from_env <llama_proc.config.Settings.from_env>`.
    """
    path = Path(binary)
    try:
        st = path.stat()
        resolved = str(path.resolve())
    except OSError:
        return None
    key: _Identity = (resolved, st.st_size, st.st_mtime_ns, st.st_ino)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    record = _record_path(resolved, settings)
    flags = _load(record, key, str(path)) if record is not None else None
    if flags is None:
        flags = _run_help(path, env)
        if flags is not None and record is not None:
            _save(record, key, flags)
    with _CACHE_LOCK:
        _CACHE[key] = flags
    return flags


def _record_path(resolved: str, settings: Settings | None) -> Path | None:
    if settings is None:
        try:
            settings = Settings.from_env()
        except ConfigError as err:
            logger.debug("no on-disk flags cache: %s", err)
            return None
    digest = hashlib.sha256(resolved.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return settings.cache_dir / FLAGS_CACHE_FOLDER / f"{digest}.json"


def _load(record: Path, key: _Identity, source: str) -> BinaryFlags | None:
    try:
        data: Any = json.loads(record.read_bytes())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("schema") != FLAGS_CACHE_SCHEMA
        or data.get("identity") != list(key)
        or not isinstance(data.get("hints"), dict)
        or not isinstance(data.get("envs"), dict)
        or not _is_lines(data.get("lines"))
    ):
        return None
    lines = tuple(tuple(line) for line in data["lines"])
    return BinaryFlags(data["hints"], data["envs"], source, lines)


def _is_lines(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(line, list) and all(isinstance(s, str) for s in line) for line in value
    )


def _save(record: Path, key: _Identity, flags: BinaryFlags) -> None:
    data = {
        "schema": FLAGS_CACHE_SCHEMA,
        "identity": list(key),
        "hints": dict(flags.hints),
        "envs": dict(flags.envs),
        "lines": [list(line) for line in flags.lines],
    }
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the record and rename: a concurrent reader sees the old or the new one.
        fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
            Path(tmp).replace(record)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise
    except OSError as err:
        logger.debug("cannot remember the flags of %s in %s: %s", key[0], record, err)


def _run_help(path: Path, env: Mapping[str, str] | None) -> BinaryFlags | None:
    ran = run_with_timeout([*server_command(path), "--help"], HELP_TIMEOUT, env=env)
    if ran is None or ran.timed_out:
        why = "it could not be started" if ran is None else f"it hung for {HELP_TIMEOUT:g}s"
        logger.warning("could not run %s --help (%s); passing options without checking", path, why)
        return None
    if ran.returncode != 0:
        # It does not run (a missing library, a crash): starting it reports the cause.
        logger.debug("%s --help exited with %s; options are not checked", path, ran.returncode)
        return None
    flags = parse_help(ran.output, str(path))
    if "--port" not in flags or "--host" not in flags:
        logger.warning(
            "%s --help does not list --host/--port; passing options without checking", path
        )
        return None
    logger.debug("%s accepts %d option spellings", path, len(flags.hints))
    return flags
