"""Point this process's huggingface_hub at a :class:`~fake_hub.FakeHub` and a private cache.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and the token file's place once, at
import; a test that runs the library in-process (LlamaServer, the proxy in a thread) therefore
sets the values it reads, not the environment variables (subprocess tests set those).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from huggingface_hub import constants

if TYPE_CHECKING:
    from pathlib import Path

    import pytest
    from fake_hub import FakeHub

__all__ = ["SMOL_FILE", "SMOL_REPO", "use_fake_hub"]

SMOL_REPO = "test/SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def use_fake_hub(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, home: Path) -> Path:
    """Send every hub call to ``hub``, with its cache and token file under ``home``.

    Returns:
        The Hugging Face hub cache the downloads land in.
    """
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    cache = home / "hub"
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    return cache
