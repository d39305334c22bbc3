"""Reading a config file that may be hostile: bounded in size, UTF-8, one-line errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from llama_proc.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["MAX_CONFIG_BYTES", "read_config_text"]

MAX_CONFIG_BYTES: Final = 1 << 20
"""Largest preset or llama-swap file read (1 MiB): real ones are a few KiB."""


def read_config_text(path: Path, what: str, limit: int = MAX_CONFIG_BYTES) -> str:
    """The file's text, refusing one over ``limit`` bytes before reading it whole.

    Raises:
        ConfigError: the file cannot be read, is too big, or is not UTF-8.
    """
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        msg = f"cannot read {what} {path}: {err.strerror or err}"
        raise ConfigError(msg) from err
    if len(data) > limit:
        msg = f"{what} {path} is over {limit // 1024} KiB; a config this big is not one"
        raise ConfigError(msg)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        msg = f"{path}:{line}: not UTF-8 text; save the {what} as UTF-8"
        raise ConfigError(msg) from None
