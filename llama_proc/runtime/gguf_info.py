"""Deprecated: the GGUF header reader moved to :mod:`llama_proc.models.gguf_info`.

Importing this module warns once and gives the same names; it goes away in a later release.
"""

from __future__ import annotations

import warnings

from llama_proc.models.gguf_info import *
from llama_proc.models.gguf_info import __all__  # noqa: F401

warnings.warn(
    "llama_proc.runtime.gguf_info moved to llama_proc.models.gguf_info; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
