"""Text from outside (GGUF metadata, file names, hub answers) made safe to print.

A model's ``general.name`` or a file name can hold terminal escape sequences (retitle or
clear the terminal, fake a prompt) or bidi and zero-width characters that make a line read
other than it is. Every message that shows such a name passes it through :func:`printable`;
the CLI's error and log output pass through :func:`printable_lines` once more.
"""

from __future__ import annotations

import logging
from typing import Final

__all__ = ["PrintableFormatter", "printable", "printable_lines"]

_BYTE: Final = 0x100
_BMP: Final = 0x10000


def _escape(char: str) -> str:
    code = ord(char)
    if code < _BYTE:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < _BMP else f"\\U{code:08x}"


def printable(text: str) -> str:
    r"""``text`` with every non-printing character written as a Python escape (``\x1b``).

    Non-printing: controls (newlines too), bidi and other format characters, unassigned code
    points. Letters of every script print as they are.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def printable_lines(text: str) -> str:
    """:func:`printable` for each line of ``text``, keeping its line breaks."""
    return "\n".join(printable(line) for line in text.split("\n"))


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines never carry a raw control or bidi character."""

    def format(self, record: logging.LogRecord) -> str:
        return printable_lines(super().format(record))
