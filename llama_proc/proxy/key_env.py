"""Where ``serve`` reads its keys from the environment.

A leaf: the CLI's secret-flag refusal names these variables on every command, so importing them
must cost nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from llama_proc.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["ADMIN_KEYS_ENV", "API_KEYS_ENV", "read_api_keys"]

API_KEYS_ENV: Final = "LLAMA_PROC_PROXY_API_KEYS"
"""Inference keys for ``serve``, comma-separated (beside ``--api-key-file``)."""
ADMIN_KEYS_ENV: Final = "LLAMA_PROC_PROXY_ADMIN_KEYS"
"""Admin keys for ``serve``, comma-separated (beside ``--admin-key-file``)."""


def read_api_keys(
    path: Path | None, env_value: str | None, flag: str = "--api-key-file"
) -> tuple[str, ...]:
    """API keys from a file (one per line, ``#`` comments) and a comma-separated variable.

    Raises:
        ConfigError: the file cannot be read.
    """
    keys: list[str] = []
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            msg = f"cannot read {flag} {path}: {err.strerror or err}"
            raise ConfigError(msg) from err
        except UnicodeDecodeError:
            # The decoder's own message quotes bytes of the file, which are key material.
            msg = f"{flag} {path} is not UTF-8 text; write one key per line"
            raise ConfigError(msg) from None
        for line in text.splitlines():
            line = line.strip()  # noqa: PLW2901 - the stripped line is the key
            if line and not line.startswith("#"):
                keys.append(line)
    if env_value:
        keys.extend(k.strip() for k in env_value.split(",") if k.strip())
    return tuple(dict.fromkeys(keys))
