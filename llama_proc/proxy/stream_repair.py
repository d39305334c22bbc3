"""Put back the ``message_start`` event llama-server sometimes leaves out of a Messages stream.

llama-server b11434 starts some Anthropic Messages streams with ``content_block_start`` (seen
in 3 of 40 direct requests with sampling on, when the first token is part of a multi-byte
character). Anthropic's SDK then cannot build the message and fails the whole stream, so
``serve`` writes the missing event first. Only the first event is looked at, held at most
:data:`MAX_HELD_BYTES`; every byte upstream sends follows unchanged. Usage in the made-up event
is zero: the stream's closing ``message_delta`` carries the real counts.
"""

from __future__ import annotations

import json
import secrets
from typing import Final

__all__ = ["MAX_HELD_BYTES", "MESSAGES_PATH", "MessagesStreamRepair"]

MAX_HELD_BYTES: Final = 64 * 1024
"""The most of a stream's start held back while its first event is read."""
MESSAGES_PATH: Final = "/v1/messages"
"""The route whose event streams are repaired."""
_START: Final = b"event: message_start"
_NEEDS_START: Final = (b"event: content_block_start", b"event: content_block_delta")


class MessagesStreamRepair:
    """Fed a Messages stream's chunks in order; gives back what to write to the client."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._held = b""
        self._done = False

    def feed(self, chunk: bytes) -> bytes:
        """What to write now for ``chunk`` (possibly nothing while the first event arrives)."""
        if self._done:
            return chunk
        self._held += chunk
        end = self._held.find(b"\n\n")
        if end < 0 and len(self._held) <= MAX_HELD_BYTES:
            return b""
        self._done = True
        held, self._held = self._held, b""
        if end >= 0 and held.startswith(_NEEDS_START):
            return self._start() + held
        return held

    def flush(self) -> bytes:
        """What is still held when the stream ends."""
        self._done = True
        held, self._held = self._held, b""
        return held

    def _start(self) -> bytes:
        message: dict[str, object] = {
            "id": f"msg_{secrets.token_hex(12)}",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self._model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        data = json.dumps({"type": "message_start", "message": message}, separators=(",", ":"))
        return _START + b"\ndata: " + data.encode() + b"\n\n"
