"""The package logger. Only the CLI configures handlers and levels."""

from __future__ import annotations

import logging

logger = logging.getLogger("llama_proc")
logger.addHandler(logging.NullHandler())
