"""Compiling llama-server from source: plan, CMake flags, toolchain, run."""

from __future__ import annotations
