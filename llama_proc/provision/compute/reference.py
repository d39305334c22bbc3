"""A pure-Python forward pass of the tiny llama, to check llama-server's numbers against.

It follows llama.cpp's ``llm_build_llama`` graph: token embedding, per layer RMSNorm, Q/K/V
projections, rotary position embedding (the ``NORM`` mode: adjacent pairs), causal grouped-query
attention with K and V stored as F16 (llama-server's default cache type), the output projection
and residual, RMSNorm and a SiLU-gated feed-forward with residual, then the final RMSNorm and
the output projection. Weights are decoded exactly (:func:`~.quants.dequantize_row`) and each
matrix product's activations are rounded as ggml rounds them (:func:`~.quants.round_activations`);
what remains are float rounding differences (ggml adds in float32 and in SIMD order, and its
attention accumulates in F16), which :data:`~.check.LOGPROB_TOLERANCE` covers.

About 0.1 s for 44 positions on one core.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

from llama_proc.provision.compute.quants import (
    QuantType,
    dequantize_row,
    f16_round,
    round_activations,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from llama_proc.provision.compute.tiny_model import Tensor, TinyModel

__all__ = ["Reference", "log_softmax"]

Vector = list[float]


def log_softmax(logits: Sequence[float]) -> Vector:
    """``log(softmax(logits))``, computed stably."""
    top = max(logits)
    total = math.log(math.fsum(math.exp(v - top) for v in logits))
    return [v - top - total for v in logits]


class _Matrix:
    """A decoded weight matrix and the activation rounding its type implies."""

    def __init__(self, tensor: Tensor) -> None:
        self.kind = tensor.kind
        size = tensor.row_size
        self.rows = [
            dequantize_row(tensor.kind, tensor.data[r * size : (r + 1) * size], tensor.cols)
            for r in range(tensor.rows)
        ]

    def __call__(self, x: Sequence[float]) -> Vector:
        xq = round_activations(self.kind, x)
        return [sum(map(operator.mul, row, xq)) for row in self.rows]


def _rms_norm(x: Sequence[float], weight: Sequence[float], eps: float) -> Vector:
    scale = 1.0 / math.sqrt(math.fsum(v * v for v in x) / len(x) + eps)
    return [v * scale * w for v, w in zip(x, weight, strict=True)]


class Reference:
    """The tiny model, decoded once; :meth:`logits` runs a sequence through it."""

    def __init__(self, model: TinyModel) -> None:
        self.model = model
        t = model.tensors
        self._embd = _Matrix(t["token_embd.weight"]).rows
        self._out_norm = dequantize_row(QuantType.F32, t["output_norm.weight"].data, model.n_embd)
        self._out = _Matrix(t["output.weight"])
        self._layers = []
        for i in range(model.n_layer):
            names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
            layer = {n: _Matrix(t[f"blk.{i}.{n}.weight"]) for n in names}
            norms = {
                n: dequantize_row(QuantType.F32, t[f"blk.{i}.{n}.weight"].data, model.n_embd)
                for n in ("attn_norm", "ffn_norm")
            }
            self._layers.append((layer, norms))

    def _rope(self, x: Vector, pos: int, n_heads: int) -> Vector:
        hd = self.model.head_dim
        out = list(x)
        for h in range(n_heads):
            base = h * hd
            for i in range(0, hd, 2):
                theta = pos * self.model.rope_base ** (-i / hd)
                c, s = math.cos(theta), math.sin(theta)
                a, b = x[base + i], x[base + i + 1]
                out[base + i] = a * c - b * s
                out[base + i + 1] = a * s + b * c
        return out

    def logits(self, tokens: Sequence[int], positions: Sequence[int]) -> list[Vector]:
        """The output logits at each index in ``positions`` (0-based) of ``tokens``."""
        m = self.model
        hd, group = m.head_dim, m.n_head // m.n_head_kv
        scale = 1.0 / math.sqrt(hd)
        wanted = set(positions)
        states = [list(self._embd[tok]) for tok in tokens]
        for layer, norms in self._layers:
            keys: list[Vector] = []
            values: list[Vector] = []
            for pos, state in enumerate(states):
                h = _rms_norm(state, norms["attn_norm"], m.rms_eps)
                q = self._rope(layer["attn_q"](h), pos, m.n_head)
                k = self._rope(layer["attn_k"](h), pos, m.n_head_kv)
                keys.append([f16_round(v) for v in k])  # the F16 KV cache
                values.append([f16_round(v) for v in layer["attn_v"](h)])
                q = [f16_round(v) for v in q]
                attn: Vector = []
                for head in range(m.n_head):
                    kvh = (head // group) * hd
                    qh = q[head * hd : head * hd + hd]
                    scores = [
                        scale * sum(map(operator.mul, qh, key[kvh : kvh + hd]))
                        for key in keys[: pos + 1]
                    ]
                    top = max(scores)
                    weights = [math.exp(s - top) for s in scores]
                    total = math.fsum(weights)
                    attn += [
                        math.fsum(w * v[kvh + d] for w, v in zip(weights, values, strict=False))
                        / total
                        for d in range(hd)
                    ]
                x = [a + b for a, b in zip(state, layer["attn_output"](attn), strict=True)]
                h = _rms_norm(x, norms["ffn_norm"], m.rms_eps)
                gate, up = layer["ffn_gate"](h), layer["ffn_up"](h)
                act = [g / (1.0 + math.exp(-g)) * u for g, u in zip(gate, up, strict=True)]
                states[pos] = [a + b for a, b in zip(x, layer["ffn_down"](act), strict=True)]
        return [self._out(_rms_norm(states[p], self._out_norm, m.rms_eps)) for p in sorted(wanted)]
