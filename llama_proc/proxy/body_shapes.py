"""Bounded measures of the texts a request asks llama-server to parse: GBNF grammars, JSON schemas.

llama.cpp parses a grammar's parenthesised groups with one recursive call per level, and
copies a repeated element as many times as it is repeated; a JSON schema becomes a grammar.
These checks run before a body is forwarded, in time linear in the text and without
recursion, and stop at the first thing past a limit.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MAX_REPEAT", "grammar_problem", "schema_problem"]

MAX_REPEAT: Final = 2000
"""Largest repetition count in a grammar (``{n,m}``) or schema (``minItems``, ``maxLength``...);
llama.cpp b11434 refuses grammars over the same count."""
_REPEAT_KEYS: Final = frozenset(
    {
        "minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
        "minContains", "maxContains",
    }
)  # fmt: skip

# Quoted strings, character classes and comments, where parentheses and braces mean nothing.
# An unterminated string or class runs to the end of the text, so every match succeeds on
# its first try: a hostile text of lone quotes and backslashes costs one pass, not one per
# quote.
_GBNF_INERT: Final = re.compile(
    r'"(?:[^"\\]|\\.?)*(?:"|\Z)|\[(?:[^\]\\]|\\.?)*(?:\]|\Z)|#[^\r\n]*', re.DOTALL
)
_GBNF_REPEAT: Final = re.compile(r"\{([^{}]*)\}")
_NOT_PAREN: Final = re.compile(r"[^()]+")


def grammar_problem(grammar: str, *, max_bytes: int, max_depth: int) -> str | None:
    """What makes a GBNF grammar too big for the limits, or None; linear time, no recursion.

    Checks the length in UTF-8 bytes, the nesting of parenthesised groups (llama.cpp parses
    each level with a recursive call) and repetition counts (each copies the element).
    """
    size = len(grammar.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return f"is {size} bytes long; the limit is {max_bytes}"
    bare = _GBNF_INERT.sub(" ", grammar)
    if bare.count("(") > max_depth:
        depth = 0
        for char in _NOT_PAREN.sub("", bare):
            depth += 1 if char == "(" else -1
            if depth > max_depth:
                return f"nests groups deeper than {max_depth} levels"
    for match in _GBNF_REPEAT.finditer(bare):
        for part in match.group(1).split(","):
            text = part.strip()
            if text and (not text.isdigit() or len(text) > 9 or int(text) > MAX_REPEAT):
                return f"repeats an element {{{match.group(1)[:20]}}} times; at most {MAX_REPEAT}"
    return None


def schema_problem(schema: object, *, max_bytes: int, max_depth: int) -> str | None:
    """What makes a JSON schema too big for the limits, or None.

    An iterative walk that stops at the first node past a limit: size counts keys and string
    values in UTF-8 bytes and 8 per other value; depth counts nested objects and arrays.
    Repetition keywords (``minItems``, ``maxLength``...) must be at most :data:`MAX_REPEAT`.
    """
    size = 0
    todo: list[tuple[object, int]] = [(schema, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict | list):
            if depth > max_depth:
                return f"nests objects and arrays deeper than {max_depth} levels"
            if isinstance(node, dict):
                for key, value in node.items():
                    size += len(key.encode("utf-8", "surrogatepass"))
                    if key in _REPEAT_KEYS and _too_many(value):
                        return f"asks for {key} = {value}; at most {MAX_REPEAT}"
                    todo.append((value, depth + 1))
            else:
                todo.extend((item, depth + 1) for item in node)
            size += 2
        elif isinstance(node, str):
            size += len(node.encode("utf-8", "surrogatepass"))
        else:
            size += 8
        if size > max_bytes:
            return f"is larger than {max_bytes} bytes"
    return None


def _too_many(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_REPEAT
