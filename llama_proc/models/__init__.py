"""Models: Hugging Face Hub references, the GGUF reader and model info, the smoke model."""

from __future__ import annotations
