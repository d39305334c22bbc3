"""Names from outside are printed with their control and bidi characters escaped."""

from __future__ import annotations

import logging

import pytest

from llama_proc._text import PrintableFormatter, printable, printable_lines


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        pytest.param("plain name-Q4_K_M.gguf", "plain name-Q4_K_M.gguf", id="plain"),
        pytest.param("modèle 模型", "modèle 模型", id="letters-of-any-script"),
        pytest.param("a\x1b[2Jb", "a\\x1b[2Jb", id="escape"),
        pytest.param("t\x1b]0;owned\x07", "t\\x1b]0;owned\\x07", id="title"),
        pytest.param("exe.\u202etxt", "exe.\\u202etxt", id="bidi-override"),
        pytest.param("a\u2066b\u2069", "a\\u2066b\\u2069", id="bidi-isolate"),
        pytest.param("zero\u200bwidth", "zero\\u200bwidth", id="zero-width"),
        pytest.param("line\nbreak\ttab", "line\\x0abreak\\x09tab", id="newline"),
        pytest.param("\U000e0001tag", "\\U000e0001tag", id="astral-format"),
    ],
)
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_printable_lines_keeps_line_breaks() -> None:
    assert printable_lines("one\x1b\ntwo\u202e") == "one\\x1b\ntwo\\u202e"


def test_log_lines_are_printable() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "model %s", ("a\x1b[31m",), None)
    assert PrintableFormatter("%(message)s").format(record) == "model a\\x1b[31m"
