"""``llama-proc pull | inspect``: models by Hugging Face reference, and what their header says.

The parsers only: what the commands do is in :mod:`llama_proc._cli.handlers.models`
(huggingface_hub, gguf and numpy are heavy, and imported only there).
"""

from __future__ import annotations

from typing import Any, Final

from llama_proc._cli.common import (
    Handler,
    add_command,
    add_settings_flags,
    positive_int,
)

_REF_HELP: Final = (
    "org/repo[:QUANT][@REV] (llama.cpp's -hf syntax, e.g. "
    "bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M), hf://org/repo/file.gguf, a huggingface.co "
    "link"
)


def register(subparsers: Any) -> None:
    """Add the ``pull`` and ``inspect`` commands."""
    p = add_command(
        subparsers,
        "pull",
        help="download a model by Hugging Face reference; print its local path",
        description=(
            "Fetch a GGUF model into the Hugging Face cache (shared with every other tool; "
            "HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE are honoured, broken downloads resume) "
            "and print the path to pass as the model: the file, or the first part of a split "
            "model (every part is fetched). With --mmproj a second line names the projector."
        ),
    )
    p.add_argument("ref", metavar="REF", help=f"the model: {_REF_HELP}")
    p.add_argument(
        "--quiet",
        dest="pull_quiet",
        action="store_true",
        help="no progress bar and no notes; only the path (as the global -q)",
    )
    p.add_argument(
        "--mmproj",
        action="store_true",
        help="also fetch the repository's multimodal projector (mmproj-*.gguf) and print its "
        "path on a second line",
    )
    p.add_argument(
        "--revision",
        metavar="REV",
        help="branch, tag or commit of the repository (instead of an @REV in REF)",
    )
    add_settings_flags(p, "offline")
    p.set_defaults(handler=Handler("models:pull"))

    p = add_command(
        subparsers,
        "inspect",
        help="print a GGUF model's header and the memory llama-server needs for it",
        description=(
            "Read the GGUF header (with llama.cpp's own gguf reader): architecture, "
            "parameters, layers, trained context, quantization, attention and KV heads, head "
            "sizes, file size; and estimate the memory a CPU llama-server needs to serve it "
            "(weights + KV cache + slots + a measured overhead). A Hugging Face reference is "
            "fetched first."
        ),
    )
    p.add_argument("model", metavar="MODEL", help=f"a .gguf path or {_REF_HELP}")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.add_argument(
        "--ctx-size",
        type=int,
        default=None,
        metavar="N",
        help="context (all slots together) for the memory estimate (default: the trained one)",
    )
    p.add_argument(
        "--parallel",
        type=positive_int,
        default=1,
        metavar="N",
        help="slots for the memory estimate (default: 1)",
    )
    p.add_argument(
        "--cache-type",
        default="f16",
        metavar="TYPE",
        help="KV cache type for the memory estimate: f16, q8_0, q4_0... (default: f16)",
    )
    add_settings_flags(p, "offline")
    p.set_defaults(handler=Handler("models:inspect"))
