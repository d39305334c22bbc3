"""ggml's tensor types and llama.cpp's file types, as GGUF files number them.

Read by the GGUF reader and the memory estimate; the numbers follow ``ggml/include/ggml.h`` and
``include/llama.h``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Final, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Mapping


# ----------------------------------------------------------------------------- full header
class GgmlType(NamedTuple):
    """How ggml stores one tensor type: ``block_size`` elements in ``type_size`` bytes."""

    name: str
    block_size: int
    type_size: int


GGML_TYPES: Final[Mapping[int, GgmlType]] = MappingProxyType(
    {
        0: GgmlType("F32", 1, 4),
        1: GgmlType("F16", 1, 2),
        2: GgmlType("Q4_0", 32, 18),
        3: GgmlType("Q4_1", 32, 20),
        6: GgmlType("Q5_0", 32, 22),
        7: GgmlType("Q5_1", 32, 24),
        8: GgmlType("Q8_0", 32, 34),
        9: GgmlType("Q8_1", 32, 40),
        10: GgmlType("Q2_K", 256, 84),
        11: GgmlType("Q3_K", 256, 110),
        12: GgmlType("Q4_K", 256, 144),
        13: GgmlType("Q5_K", 256, 176),
        14: GgmlType("Q6_K", 256, 210),
        15: GgmlType("Q8_K", 256, 292),
        16: GgmlType("IQ2_XXS", 256, 66),
        17: GgmlType("IQ2_XS", 256, 74),
        18: GgmlType("IQ3_XXS", 256, 98),
        19: GgmlType("IQ1_S", 256, 50),
        20: GgmlType("IQ4_NL", 32, 18),
        21: GgmlType("IQ3_S", 256, 110),
        22: GgmlType("IQ2_S", 256, 82),
        23: GgmlType("IQ4_XS", 256, 136),
        24: GgmlType("I8", 1, 1),
        25: GgmlType("I16", 1, 2),
        26: GgmlType("I32", 1, 4),
        27: GgmlType("I64", 1, 8),
        28: GgmlType("F64", 1, 8),
        29: GgmlType("IQ1_M", 256, 56),
        30: GgmlType("BF16", 1, 2),
        34: GgmlType("TQ1_0", 256, 54),
        35: GgmlType("TQ2_0", 256, 66),
        39: GgmlType("MXFP4", 32, 17),
        40: GgmlType("NVFP4", 64, 36),
        41: GgmlType("Q1_0", 128, 18),
        42: GgmlType("Q2_0", 64, 18),
    }
)
"""ggml's tensor types by id (``enum ggml_type`` and its type traits in ``ggml/src/ggml.c``)."""

FILE_TYPES: Final[Mapping[int, str]] = MappingProxyType(
    {
        0: "ALL_F32",
        1: "MOSTLY_F16",
        2: "MOSTLY_Q4_0",
        3: "MOSTLY_Q4_1",
        7: "MOSTLY_Q8_0",
        8: "MOSTLY_Q5_0",
        9: "MOSTLY_Q5_1",
        10: "MOSTLY_Q2_K",
        11: "MOSTLY_Q3_K_S",
        12: "MOSTLY_Q3_K_M",
        13: "MOSTLY_Q3_K_L",
        14: "MOSTLY_Q4_K_S",
        15: "MOSTLY_Q4_K_M",
        16: "MOSTLY_Q5_K_S",
        17: "MOSTLY_Q5_K_M",
        18: "MOSTLY_Q6_K",
        19: "MOSTLY_IQ2_XXS",
        20: "MOSTLY_IQ2_XS",
        21: "MOSTLY_Q2_K_S",
        22: "MOSTLY_IQ3_XS",
        23: "MOSTLY_IQ3_XXS",
        24: "MOSTLY_IQ1_S",
        25: "MOSTLY_IQ4_NL",
        26: "MOSTLY_IQ3_S",
        27: "MOSTLY_IQ3_M",
        28: "MOSTLY_IQ2_S",
        29: "MOSTLY_IQ2_M",
        30: "MOSTLY_IQ4_XS",
        31: "MOSTLY_IQ1_M",
        32: "MOSTLY_BF16",
        36: "MOSTLY_TQ1_0",
        37: "MOSTLY_TQ2_0",
        38: "MOSTLY_MXFP4_MOE",
        39: "MOSTLY_NVFP4",
        40: "MOSTLY_Q1_0",
        41: "MOSTLY_Q2_0",
        1024: "GUESSED",
    }
)
"""``general.file_type`` values by id (``enum llama_ftype`` in ``include/llama.h``)."""
