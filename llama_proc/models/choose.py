"""Which files of a Hub repository a reference means: the quantization, split parts and mmproj.

Without a QUANT tag, llama.cpp's choice: Q4_K_M, then Q8_0, then the first model GGUF of the
repo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Final

from llama_proc.errors import (
    ModelFileError,
)
from llama_proc.models.model_ref import GGUF_SUFFIX, ModelRef
from llama_proc.vocab import MAX_SPLIT_PARTS

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


DEFAULT_QUANTS: Final = ("Q4_K_M", "Q8_0")
"""Quantizations tried, in order, when a reference names none (llama.cpp's ``-hf`` default)."""

MMPROJ_KEYWORD: Final = "mmproj"

PREFERRED_MMPROJ_TAG: Final = "F16"

# Names llama.cpp never loads as the main model: projectors, importance matrices, draft heads.
_NOT_A_MODEL: Final = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")

# llama.cpp's split and tag grammar (common/download.cpp: get_gguf_split_info).
_SPLIT_RE: Final = re.compile(r"(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})", re.IGNORECASE)

_TAG_RE: Final = re.compile(r"[-.](?P<tag>[A-Z0-9_]+)$", re.IGNORECASE)

_BITS_RE: Final = re.compile(r"\d+")


@dataclass(frozen=True)
class _GgufName:
    path: str
    prefix: str  # the name without ".gguf" and without the split suffix; tag included
    tag: str  # upper-cased quantization tag, "" when the name carries none
    index: int
    count: int


def _gguf_name(path: str) -> _GgufName | None:
    if not path.lower().endswith(GGUF_SUFFIX):
        return None
    prefix = path[: -len(GGUF_SUFFIX)]
    index = count = 1
    split = _SPLIT_RE.fullmatch(prefix)
    if split is not None:
        prefix, index, count = split["prefix"], int(split["index"]), int(split["count"])
    tag = _TAG_RE.search(prefix)
    return _GgufName(path, prefix, tag["tag"].upper() if tag else "", index, count)


def _is_model(path: str) -> bool:
    name = PurePosixPath(path).name.lower()
    return name.endswith(GGUF_SUFFIX) and not any(word in name for word in _NOT_A_MODEL)


def _first_parts(names: Sequence[str]) -> Iterator[_GgufName]:
    for path in names:
        info = _gguf_name(path)
        if info is not None and _is_model(path) and info.index == 1:
            yield info


def _quant_pattern(quant: str) -> re.Pattern[str]:
    # llama.cpp searches "<tag>[.-]" anywhere in the path; the left boundary keeps Q4_0 from
    # matching IQ4_0.
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}[.-]", re.IGNORECASE)


def _find_model(names: Sequence[str], quant: str | None) -> str | None:
    for tag in (quant,) if quant else DEFAULT_QUANTS:
        pattern = _quant_pattern(tag)
        for info in _first_parts(names):
            if pattern.search(info.path):
                return info.path
    if quant is None:
        return next((info.path for info in _first_parts(names)), None)
    return None


def _available_quants(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(info.tag for info in _first_parts(names) if info.tag))


def _split_parts(repo: str, names: Sequence[str], primary: str) -> tuple[str, ...]:
    first = _gguf_name(primary)
    if first is None or first.count <= 1:
        return (primary,)
    if first.count > MAX_SPLIT_PARTS:
        msg = (
            f"{repo} lists the split model {_shown(first.prefix)} in {first.count} parts; "
            f"llama-proc fetches at most {MAX_SPLIT_PARTS}: pick another quantization"
        )
        raise ModelFileError(msg)
    found: dict[int, str] = {}
    for path in names:
        info = _gguf_name(path)
        if info is not None and info.count == first.count and info.prefix == first.prefix:
            found[info.index] = path
    missing = [i for i in range(1, first.count + 1) if i not in found]
    if missing:
        msg = (
            f"{repo} holds only part of the split model {first.prefix} "
            f"(missing part {', '.join(map(str, missing))} of {first.count}); "
            "pick another quantization"
        )
        raise ModelFileError(msg)
    return tuple(found[i] for i in range(1, first.count + 1))


def _bits(tag: str) -> int:
    match = _BITS_RE.search(tag)
    return int(match.group()) if match else 0


def _find_mmproj(names: Sequence[str], model: str, quant: str | None) -> str | None:
    """The projector llama.cpp would pair with ``model``, preferring its quant, then F16.

    Like llama.cpp, only a projector in the model's folder or one above it qualifies, and the
    deepest such folder wins; among those: the same quantization tag, then F16, then the
    closest bit width.
    """
    model_dir = PurePosixPath(model).parent.parts
    tag = (quant or (_gguf_name(model) or _GgufName(model, "", "", 1, 1)).tag).upper()
    best: tuple[int, bool, bool, int] | None = None
    choice = None
    for path in names:
        name = PurePosixPath(path)
        if not path.lower().endswith(GGUF_SUFFIX) or MMPROJ_KEYWORD not in name.name.lower():
            continue
        folder = name.parent.parts
        if model_dir[: len(folder)] != folder:
            continue
        own = (_gguf_name(path) or _GgufName(path, "", "", 1, 1)).tag
        key = (
            len(folder),
            bool(tag) and own == tag,
            own == PREFERRED_MMPROJ_TAG,
            -abs(_bits(own) - _bits(tag)),
        )
        if best is None or key > best:
            best, choice = key, path
    return choice


def choose_files(
    ref: ModelRef, names: Sequence[str], *, with_mmproj: bool = False
) -> tuple[tuple[str, ...], str | None]:
    """Pick the files of ``ref`` among a repository's file names, the way llama.cpp does.

    Args:
        ref: the reference (a quantization, a file, or neither).
        names: the repository's file paths.
        with_mmproj: also pick the multimodal projector, when the repository has one.

    Returns:
        The model's files in order (all parts of a split GGUF) and the projector or None.

    Raises:
        ModelFileError: no file fits; the message lists what the repository has.
    """
    names = sorted(names)
    ggufs = [n for n in names if n.lower().endswith(GGUF_SUFFIX)]
    if ref.file is not None:
        if ref.file not in names:
            msg = f"{ref.repo} has no file {ref.file}; its GGUF files: {', '.join(ggufs) or 'none'}"
            raise ModelFileError(msg)
        primary: str | None = ref.file
        first = _gguf_name(ref.file)
        if first is not None and first.count > 1:
            # Any part names the whole model; llama-server is given the first one.
            primary = next(
                (
                    i.path
                    for n in names
                    if (i := _gguf_name(n)) and i.prefix == first.prefix and i.index == 1
                ),
                ref.file,
            )
    else:
        primary = _find_model(names, ref.quant)
    if primary is None:
        quants = _available_quants(names)
        if not quants and not any(_is_model(n) for n in ggufs):
            msg = (
                f"{ref.repo} has no GGUF model files; llama-server needs a GGUF repository "
                "(often named ...-GGUF)"
            )
        else:
            example = f" (e.g. {ref.repo}:{quants[0]})" if quants else ""
            msg = (
                f"{ref.repo} has no GGUF file for quantization {ref.quant}; it has: "
                f"{', '.join(quants) or 'untagged files only'}{example}"
            )
        raise ModelFileError(msg)
    parts = _split_parts(ref.repo, names, primary)
    mmproj = _find_mmproj(names, primary, ref.quant) if with_mmproj else None
    return parts, mmproj


def _shown(name: str) -> str:
    """A name from the hub, safe to print: escaped and cut short."""
    text = repr(name)
    return text if len(text) <= 120 else text[:117] + "..."
