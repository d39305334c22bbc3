"""ggml's block formats, in pure Python: encode random blocks, decode them, round activations.

Only the types the compute check's model uses (F32, F16, Q4_0, Q4_1, Q8_0, Q4_K), laid out as in
``ggml/src/ggml-common.h``. :func:`dequantize_row` decodes a row of weights exactly as ggml's
``dequantize_row_*`` does; :func:`round_activations` reproduces what ggml does to the other
operand of a matrix product before the dot products (``vec_dot_type``: Q8_0 blocks for Q4_0,
Q4_1 and Q8_0 weights, Q8_K super-blocks for Q4_K, F16 for F16), so a reference product
differs from ggml's only by the order of float additions.
"""

from __future__ import annotations

import math
import struct
from enum import IntEnum
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import random
    from collections.abc import Sequence

__all__ = [
    "BLOCK",
    "QuantType",
    "dequantize_row",
    "encode_random_row",
    "f16_round",
    "round_activations",
    "row_bytes",
]


class QuantType(IntEnum):
    """The ggml tensor types the check uses, by their ``enum ggml_type`` id."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    Q4_K = 12


BLOCK: Final = {
    QuantType.F32: (1, 4),
    QuantType.F16: (1, 2),
    QuantType.Q4_0: (32, 18),
    QuantType.Q4_1: (32, 20),
    QuantType.Q8_0: (32, 34),
    QuantType.Q4_K: (256, 144),
}
"""(elements per block, bytes per block) of each type."""
_QK8: Final = 32
_QKK: Final = 256
_K_SCALE_BYTES: Final = 12
_Q4K_MAX_SCALE: Final = 63
_HALF: Final = struct.Struct("<e")


def f16_round(value: float) -> float:
    """``value`` rounded to IEEE half precision (ggml's ``GGML_FP32_TO_FP16``), saturating."""
    try:
        return float(_HALF.unpack(_HALF.pack(value))[0])
    except OverflowError:
        return math.copysign(65504.0, value)


def row_bytes(kind: QuantType, n: int) -> int:
    """Bytes of one row of ``n`` elements."""
    per, size = BLOCK[kind]
    return n // per * size


def _nibbles(rng: random.Random, count: int) -> bytes:
    return rng.randbytes(count)


def encode_random_row(kind: QuantType, n: int, sigma: float, rng: random.Random) -> bytes:
    """A row of ``n`` random weights of spread about ``sigma``, encoded as ``kind``.

    Quantized types get random codes and scales directly (no float quantizer is needed, and the
    decoded values are exactly what ggml will read).
    """
    out = bytearray()
    if kind is QuantType.F32:
        return struct.pack(f"<{n}f", *(rng.gauss(0.0, sigma) for _ in range(n)))
    if kind is QuantType.F16:
        return struct.pack(f"<{n}e", *(f16_round(rng.gauss(0.0, sigma)) for _ in range(n)))
    per, _ = BLOCK[kind]
    for _ in range(n // per):
        if kind is QuantType.Q4_0:  # (q - 8) * d: spread ~4.6 d
            out += _HALF.pack(sigma / 4.6 * rng.uniform(0.5, 1.5)) + _nibbles(rng, 16)
        elif kind is QuantType.Q4_1:  # q * d + m
            d = sigma / 4.6 * rng.uniform(0.5, 1.5)
            out += _HALF.pack(d) + _HALF.pack(-7.5 * d) + _nibbles(rng, 16)
        elif kind is QuantType.Q8_0:  # q * d, q in [-127, 127]: spread ~73 d
            d = sigma / 73.0 * rng.uniform(0.5, 1.5)
            codes = bytes((rng.randint(-127, 127) & 0xFF) for _ in range(_QK8))
            out += _HALF.pack(d) + codes
        else:  # Q4_K: 8 sub-blocks of 32, each d*sc*q - dmin*m, 6-bit sc and m
            d = sigma / (4.6 * 6.0)
            scales = [rng.randint(4, 8) for _ in range(8)]
            mins = [min(_Q4K_MAX_SCALE, round(s * 7.5)) for s in scales]
            out += _HALF.pack(d) + _HALF.pack(d) + _pack_k4(scales, mins) + _nibbles(rng, 128)
    return bytes(out)


def _pack_k4(scales: Sequence[int], mins: Sequence[int]) -> bytes:
    """The 12-byte 6-bit scale/min packing of Q4_K (the inverse of ``get_scale_min_k4``)."""
    q = [0] * _K_SCALE_BYTES
    for j in range(8):
        sc, m = scales[j], mins[j]
        if j < 4:
            q[j] = (q[j] & 0xC0) | sc
            q[j + 4] = (q[j + 4] & 0xC0) | m
        else:
            q[j + 4] = (sc & 0x0F) | ((m & 0x0F) << 4)
            q[j - 4] |= (sc >> 4) << 6
            q[j] |= (m >> 4) << 6
    return bytes(q)


def _scale_min_k4(j: int, q: bytes | memoryview) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def dequantize_row(kind: QuantType, data: bytes | memoryview, n: int) -> list[float]:
    """Decode one row of ``n`` elements (``dequantize_row_*`` in ggml)."""
    view = memoryview(data)
    if kind is QuantType.F32:
        return list(struct.unpack_from(f"<{n}f", view))
    if kind is QuantType.F16:
        return list(struct.unpack_from(f"<{n}e", view))
    per, size = BLOCK[kind]
    out: list[float] = []
    for b in range(n // per):
        blk = view[b * size : (b + 1) * size]
        if kind is QuantType.Q4_0:
            d = _HALF.unpack_from(blk)[0]
            qs = blk[2:18]
            out += [((x & 0x0F) - 8) * d for x in qs] + [((x >> 4) - 8) * d for x in qs]
        elif kind is QuantType.Q4_1:
            d, m = _HALF.unpack_from(blk)[0], _HALF.unpack_from(blk, 2)[0]
            qs = blk[4:20]
            out += [(x & 0x0F) * d + m for x in qs] + [(x >> 4) * d + m for x in qs]
        elif kind is QuantType.Q8_0:
            d = _HALF.unpack_from(blk)[0]
            out += [q * d for q in struct.unpack_from("<32b", blk, 2)]
        else:
            out += _dequantize_q4k(blk)
    return out


def _dequantize_q4k(blk: memoryview) -> list[float]:
    d, dmin = _HALF.unpack_from(blk)[0], _HALF.unpack_from(blk, 2)[0]
    scales = blk[4 : 4 + _K_SCALE_BYTES]
    qs = blk[4 + _K_SCALE_BYTES :]
    out: list[float] = []
    for chunk in range(4):  # 64 values: low nibbles of 32 bytes, then their high nibbles
        sc1, m1 = _scale_min_k4(2 * chunk, scales)
        sc2, m2 = _scale_min_k4(2 * chunk + 1, scales)
        q = qs[chunk * 32 : chunk * 32 + 32]
        d1, mm1, d2, mm2 = d * sc1, dmin * m1, d * sc2, dmin * m2
        out += [d1 * (x & 0x0F) - mm1 for x in q] + [d2 * (x >> 4) - mm2 for x in q]
    return out


def _round_q8_0(x: Sequence[float]) -> list[float]:
    out: list[float] = []
    for b in range(0, len(x), _QK8):
        blk = x[b : b + _QK8]
        amax = max(abs(v) for v in blk)
        d = amax / 127.0
        inv = 1.0 / d if d else 0.0
        dh = f16_round(d)
        out += [round(v * inv) * dh for v in blk]
    return out


def _round_q8_k(x: Sequence[float]) -> list[float]:
    out: list[float] = []
    for b in range(0, len(x), _QKK):
        blk = x[b : b + _QKK]
        peak = max(blk, key=abs)
        if peak == 0:
            out += [0.0] * len(blk)
            continue
        iscale = -127.0 / peak
        d = 1.0 / iscale
        out += [min(127, round(iscale * v)) * d for v in blk]
    return out


def round_activations(kind: QuantType, x: Sequence[float]) -> list[float]:
    """``x`` as ggml hands it to the dot products with weights of type ``kind``."""
    if kind is QuantType.F32:
        return list(x)
    if kind is QuantType.F16:
        return [f16_round(v) for v in x]
    if kind is QuantType.Q4_K:
        return _round_q8_k(x)
    return _round_q8_0(x)  # Q4_0 and Q8_0 take Q8_0; Q4_1 takes Q8_1, the same codes
