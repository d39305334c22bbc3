"""Modules the README named before the restructure still import, with a deprecation warning."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_runtime_gguf_info_still_imports_and_warns() -> None:
    sys.modules.pop("llama_proc.runtime.gguf_info", None)
    with pytest.warns(DeprecationWarning, match=r"llama_proc\.models\.gguf_info"):
        old = importlib.import_module("llama_proc.runtime.gguf_info")
    new = importlib.import_module("llama_proc.models.gguf_info")
    assert old.read_model_info is new.read_model_info
    assert old.estimate_memory is new.estimate_memory


def test_cache_install_is_now_cache_record_and_warns() -> None:
    sys.modules.pop("llama_proc.provision.cache.install", None)
    with pytest.warns(DeprecationWarning, match=r"llama_proc\.provision\.cache\.record"):
        old = importlib.import_module("llama_proc.provision.cache.install")
    new = importlib.import_module("llama_proc.provision.cache.record")
    assert old.Install is new.Install
    assert old.compute_summary is new.compute_summary
