"""The 24-byte GGUF header check made before llama-server is spawned.

A missing or foreign model file becomes an immediate, clear
:class:`~llama_proc.errors.ModelFileError` instead of a failure after the server has started.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from llama_proc._text import printable
from llama_proc.errors import ModelFileError

GGUF_MAGIC: Final = b"GGUF"

_KNOWN_VERSIONS: Final = frozenset({1, 2, 3})

_HEADER_V1: Final = struct.Struct("<4sIII")

_HEADER: Final = struct.Struct("<4sIQQ")

_MAX_COUNT: Final = 1 << 40
"""Counts above this are not a real model: the header is corrupt."""


@dataclass(frozen=True)
class GgufHeader:
    """What the fixed GGUF header says about a model file."""

    path: Path
    version: int
    tensor_count: int
    metadata_count: int
    size: int
    """File size in bytes."""
    byte_order: str = "little"
    """``"little"`` or ``"big"`` (big-endian GGUF files exist for s390x)."""


def check_gguf(path: str | os.PathLike[str]) -> GgufHeader:
    """Read and validate the GGUF header of ``path``.

    Args:
        path: the model file.

    Returns:
        The parsed header.

    Raises:
        ModelFileError: the file is missing, is a directory, cannot be read, is not GGUF
            (wrong magic bytes), is truncated, or uses an unknown GGUF version.
    """
    model = Path(path).expanduser()
    shown = printable(str(model))  # a file name may hold terminal escapes
    try:
        with model.open("rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                # A pipe or device never ends or answers what it likes; nothing reads it twice.
                msg = f"model path {shown} is not a regular file; pass the path of a .gguf file"
                raise ModelFileError(msg)
            size = info.st_size
            head = fh.read(_HEADER.size)
    except FileNotFoundError:
        msg = f"model file {shown} does not exist; pass the path of a .gguf file"
        raise ModelFileError(msg) from None
    except IsADirectoryError:
        msg = f"model path {shown} is a directory; pass the path of a .gguf file"
        raise ModelFileError(msg) from None
    except OSError as err:
        msg = f"cannot read model file {shown}: {err.strerror or err}"
        raise ModelFileError(msg) from None
    if head[:4] != GGUF_MAGIC:
        hint = (
            " (it looks like a Git LFS pointer, not the model)" if head.startswith(b"vers") else ""
        )
        msg = (
            f"{shown} is not a GGUF model file: it starts with {head[:4]!r}, not b'GGUF'{hint}; "
            "convert it with llama.cpp's convert_hf_to_gguf.py or download a .gguf"
        )
        raise ModelFileError(msg)
    if len(head) < _HEADER_V1.size:
        msg = f"{shown} is truncated ({size} bytes): the GGUF header is incomplete"
        raise ModelFileError(msg)
    order = "little"
    (version,) = struct.unpack_from("<I", head, 4)
    if version not in _KNOWN_VERSIONS:
        (swapped,) = struct.unpack_from(">I", head, 4)
        if swapped in _KNOWN_VERSIONS:
            order, version = "big", swapped
        else:
            msg = (
                f"{shown} uses GGUF version {version}, which this check does not know "
                f"(known: {', '.join(map(str, sorted(_KNOWN_VERSIONS)))}); the file may be corrupt"
            )
            raise ModelFileError(msg)
    prefix = "<" if order == "little" else ">"
    if version == 1:
        _, _, tensors, kvs = struct.unpack(prefix + "4sIII", head[: _HEADER_V1.size])
    elif len(head) < _HEADER.size:
        msg = f"{shown} is truncated ({size} bytes): the GGUF header is incomplete"
        raise ModelFileError(msg)
    else:
        _, _, tensors, kvs = struct.unpack(prefix + "4sIQQ", head)
    if tensors > _MAX_COUNT or kvs > _MAX_COUNT:
        msg = f"{shown} has a corrupt GGUF header (tensor count {tensors}, metadata count {kvs})"
        raise ModelFileError(msg)
    return GgufHeader(model, version, tensors, kvs, size, order)
