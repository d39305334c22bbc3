"""The proxy reads a model's GGUF header off its event loop: a slow or hostile header stalls
only the request that needs it, never /health or other tenants.

The model file is a named pipe, so the test decides how long the header read takes: the
proxy's real estimate (:func:`~llama_proc.proxy.budget.estimate_server_memory`) opens it and
waits until the test opens the other end and writes a hostile header (which, coming from a
pipe and not a regular file, is refused at once).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

import pytest
from proxy_fakes import FakeFactory
from proxy_harness import running_proxy, wait_until

from llama_proc.models.gguf_header import check_gguf
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec

if TYPE_CHECKING:
    from pathlib import Path
    from types import FrameType

QUICK = 2.0
"""Seconds /health may take while a header read is pending."""
OPEN_TIMEOUT = 30.0
HOSTILE_HEADER = b"GGUF" + struct.pack("<IQQ", 3, (1 << 32) - 1, (1 << 32) - 1)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="named pipes are POSIX")


def _reading_header() -> bool:
    """Whether some thread of this process is inside the GGUF header read right now."""
    for top in sys._current_frames().values():
        frame: FrameType | None = top
        while frame is not None:
            if frame.f_code is check_gguf.__code__:
                return True
            frame = frame.f_back
    return False


def test_health_answers_while_a_hostile_header_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    models = ModelsConfig({"a": ModelSpec(id="a", path=fifo)})
    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}]}).encode()
    answers: list[int] = []

    with running_proxy(models, FakeFactory(), memory_budget=1 << 40) as proxy:

        def chat() -> None:
            request = urllib.request.Request(
                proxy.base_url + "/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as resp:
                    answers.append(resp.status)
            except urllib.error.HTTPError as err:
                answers.append(err.code)

        tenant = threading.Thread(target=chat)
        tenant.start()
        try:
            assert wait_until(_reading_header, OPEN_TIMEOUT), "the proxy never read the header"
            began = time.monotonic()
            with urllib.request.urlopen(proxy.base_url + "/health", timeout=QUICK) as resp:
                assert resp.status == 200
            health_took = time.monotonic() - began
            assert _reading_header()  # still waiting for the header's bytes
        finally:
            # Let the read go on: the writer end opens the pipe, the bytes are a hostile header.
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            with contextlib.suppress(OSError):
                os.write(writer, HOSTILE_HEADER)
            os.close(writer)
            tenant.join(60)

    assert health_took < QUICK
    # The hostile header costs its own request nothing worse than the size-based estimate.
    assert answers
    assert answers[0] < 500
