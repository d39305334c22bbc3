"""The package logger's one piece of setup: a NullHandler, as libraries should.

Importing :mod:`llama_proc` runs this, so a program that uses llama-proc without configuring
logging gets no "No handlers could be found" noise and no stray output from it. Only the CLI
configures handlers and levels; every module logs through ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging
from typing import Final

__all__ = ["LOGGER_NAME"]

LOGGER_NAME: Final = "llama_proc"
"""The root of every logger llama-proc uses (``llama_proc.provision.resolve``, ...)."""

logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())
