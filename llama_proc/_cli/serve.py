"""``llama-proc serve``: the OpenAI-compatible proxy over a pool of llama-servers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_proc._cli.common import (
    PROVISION_FLAGS,
    Handler,
    add_command,
    add_settings_flags,
)
from llama_proc.proxy.key_env import API_KEYS_ENV, read_api_keys
from llama_proc.proxy.serve_flags import add_serve_flags, is_loopback

if TYPE_CHECKING:
    import argparse

    from llama_proc.proxy.body_policy import BodyCaps
    from llama_proc.proxy.flag_caps import FlagCaps

__all__ = [
    "API_KEYS_ENV",
    "body_caps",
    "flag_caps",
    "is_loopback",
    "read_api_keys",
    "register",
]


def register(subparsers: Any) -> None:
    """Add the ``serve`` command."""
    p = add_command(
        subparsers,
        "serve",
        help="run an OpenAI-compatible proxy that starts llama-servers on demand",
        description=(
            "Serve /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models for "
            "the models in a config file or folder. Each (model, X-Llama-Flags) pair gets its "
            "own llama-server, started on first use, evicted least-recently-used beyond "
            "--max-servers and unloaded after --idle-ttl seconds idle."
        ),
    )
    src = p.add_argument_group("models")
    src.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="models config: llama-proc's TOML ([defaults] and [models.<id>] tables), a "
        "llama.cpp preset (.ini), a llama-swap config (.yaml/.yml) or a models folder; "
        "default: $LLAMA_PROC_CONFIG",
    )
    src.add_argument(
        "--models-preset",
        type=Path,
        metavar="FILE",
        help="also offer the models of a llama.cpp router preset INI ([*] and [<id>] sections "
        "of llama-server flags)",
    )
    src.add_argument(
        "--models-dir",
        type=Path,
        metavar="DIR",
        help="also offer the models in DIR as llama.cpp's router does: each .gguf by its "
        "name, each folder holding one (split or multimodal) model by the folder's name",
    )
    src.add_argument(
        "--check-config",
        type=Path,
        metavar="FILE",
        help="print what each model in FILE (any format above) resolves to, then exit: "
        "0 when it loads, 2 with one line naming the file, line and key when it does not",
    )
    provisioning = p.add_argument_group("llama-server provisioning")
    add_settings_flags(provisioning, "server_binary", *PROVISION_FLAGS)
    add_serve_flags(p)
    p.set_defaults(handler=Handler("serve:run"))


def flag_caps(args: argparse.Namespace) -> FlagCaps:
    """The server-wide caps from ``--max-threads`` and friends (defaults where not given).

    Raises:
        ConfigError: a cap below 1.
    """
    from llama_proc.proxy.options import flag_caps_of
    from llama_proc.proxy.serve_options import ServeOptions

    return flag_caps_of(ServeOptions.from_args(args))


def body_caps(args: argparse.Namespace) -> BodyCaps:
    """The request-body caps from ``--max-n-probs`` and friends (defaults where not given).

    Raises:
        ConfigError: a cap below 0 or above its hard ceiling.
    """
    from llama_proc.proxy.options import body_caps_of
    from llama_proc.proxy.serve_options import ServeOptions

    return body_caps_of(ServeOptions.from_args(args))
