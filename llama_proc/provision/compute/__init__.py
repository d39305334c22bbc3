"""Proving that an install computes: a tiny generated model, a reference, a check, a ladder.

``--version`` passing says nothing about whether llama-server can multiply two matrices on this
CPU (upstream's AMX kernels die with SIGILL at the first computation on Sapphire Rapids while
``--version`` prints happily). Every install is therefore served a tiny model that llama-proc
writes itself (:mod:`.tiny_model`, no download), and the answer is compared with a pure-Python
forward pass of the same weights (:mod:`.reference`, quantized blocks decoded with
:mod:`.quants`) by :mod:`.check`. When the check fails on a CPU feature, :mod:`.ladder` says
what to turn off next: compiler flags for a native source build, ggml CPU-variant libraries for
a prebuilt or portable install.
"""

from __future__ import annotations
