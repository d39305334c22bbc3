"""llama-server b11434 sometimes leaves ``message_start`` out of an Anthropic Messages stream
(seen in 3 of 40 direct requests with sampling on); Anthropic's SDK then fails the whole stream.
The proxy puts the missing event back, and touches nothing else."""

from __future__ import annotations

import json

import pytest

from llama_proc.proxy.stream_repair import MAX_HELD_BYTES, MessagesStreamRepair

START = b'event: message_start\ndata: {"type":"message_start","message":{"id":"m1"}}\n\n'
BLOCK = (
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
)
DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
)


def relay(chunks: list[bytes], model: str = "smol") -> bytes:
    repair = MessagesStreamRepair(model)
    return b"".join(repair.feed(c) for c in chunks) + repair.flush()


@pytest.mark.parametrize("split", [1, 7, 40, 10_000])
def test_a_stream_with_its_start_passes_unchanged(split: int) -> None:
    whole = START + BLOCK + DELTA
    chunks = [whole[i : i + split] for i in range(0, len(whole), split)]
    assert relay(chunks) == whole


@pytest.mark.parametrize("split", [1, 5, 64, 10_000])
def test_a_stream_without_its_start_gets_one_first(split: int) -> None:
    whole = BLOCK + DELTA
    chunks = [whole[i : i + split] for i in range(0, len(whole), split)]
    out = relay(chunks, model="my-model")
    head, _, rest = out.partition(b"\n\n")
    assert rest == whole  # every upstream byte follows, in order
    event, data = head.split(b"\n")
    assert event == b"event: message_start"
    start = json.loads(data.removeprefix(b"data: "))
    assert start["type"] == "message_start"
    message = start["message"]
    assert (message["role"], message["model"], message["content"]) == ("assistant", "my-model", [])
    assert message["id"].startswith("msg_")
    assert message["usage"] == {"input_tokens": 0, "output_tokens": 0}


def test_an_error_or_a_huge_first_event_is_never_held_or_changed() -> None:
    error = b'event: error\ndata: {"type":"error","error":{"message":"x"}}\n\n'
    assert relay([error]) == error
    huge = b"data: " + b"x" * (MAX_HELD_BYTES + 10)
    repair = MessagesStreamRepair("m")
    assert repair.feed(huge) == huge  # past the bound it stops looking and passes bytes on
    assert repair.feed(BLOCK) == BLOCK
    short = b"event: content_bl"
    assert relay([short]) == short  # a stream that ends early is flushed as it came
