"""A models folder (``--models-dir DIR``, or ``--config DIR``) laid out as llama.cpp's router reads it.

::

    DIR/
      SmolLM2-135M-Instruct.Q4_1.gguf      -> model "SmolLM2-135M-Instruct.Q4_1"
      Big-Model/                           -> model "Big-Model" (one multi-file model)
        Big-Model-Q4_K_M-00001-of-00002.gguf
        Big-Model-Q4_K_M-00002-of-00002.gguf
      vision/                              -> model "vision", with its projector
        model.gguf
        mmproj-model-f16.gguf

A file in DIR is a model named by its stem (the first shard stands for a split model). A
folder holding one model (one file or the shards of one split model, plus at most one
``mmproj*.gguf`` projector) is one model named by the folder; the older name
``folder/stem`` stays as an alias. A folder holding several models offers each as
``folder/stem``, deeper folders likewise. Hidden files and folders are skipped. A symlink
whose target is outside DIR is refused: the folder is the boundary of what is served.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ConfigError
from llama_proc.proxy.model_spec import ModelsConfig, ModelSpec
from llama_proc.proxy.models_config import split_defaults

if TYPE_CHECKING:
    from collections.abc import Mapping

    from llama_proc.proxy.body_policy import BodyCaps
    from llama_proc.proxy.flag_caps import FlagCaps

__all__ = ["MAX_DEPTH", "scan_models_dir"]

logger = logging.getLogger(__name__)

MAX_DEPTH: Final = 8
"""Deepest folder under DIR searched for models."""
_SHARD_RE: Final = re.compile(r"-(\d{5})-of-(\d{5})$")
GGUF: Final = ".gguf"
MMPROJ_PREFIX: Final = "mmproj"


def scan_models_dir(
    directory: Path,
    *,
    defaults: Mapping[str, Any] | None = None,
    caps: FlagCaps | None = None,
    body_caps: BodyCaps | None = None,
) -> ModelsConfig:
    """Offer the models in ``directory``, laid out as llama.cpp's router reads it.

    Args:
        directory: the folder.
        defaults: a ``[defaults]``-style table applied to every model found.
        caps: server-wide caps the defaults must keep; None = not checked here.
        body_caps: server-wide request-body caps; None = only the hard ceilings.

    Raises:
        ConfigError: the folder does not exist, a symlink in it leads outside it, or the
            defaults are invalid or beyond a cap.
    """
    if not directory.is_dir():
        msg = f"models directory {directory} does not exist or is not a folder"
        raise ConfigError(msg)
    root = directory.resolve()
    base_options, base_extra, base_ttl, base_flags, base_body = split_defaults(
        defaults or {}, where=str(directory), caps=caps, body_caps=body_caps
    )
    found: dict[str, tuple[Path, Path | None, tuple[str, ...]]] = {}
    _scan(directory, root, "", found, depth=0, seen=set())
    models: dict[str, ModelSpec] = {}
    for model_id, (gguf, mmproj, aliases) in sorted(found.items()):
        options = dict(base_options)
        if mmproj is not None:
            options["mmproj"] = str(mmproj)
        models[model_id] = ModelSpec(
            id=model_id,
            path=gguf,
            options=MappingProxyType(options),
            extra_args=base_extra,
            aliases=aliases,
            idle_ttl=base_ttl,
            source=f"dir:{directory}",
            request_flags=base_flags,
            request_body=base_body,
        )
    if not models:
        logger.warning("no .gguf files found under %s", directory)
    try:
        return ModelsConfig(models)
    except ConfigError as err:
        msg = f"models directory {directory}: {err}"
        raise ConfigError(msg) from None


def _scan(
    folder: Path,
    root: Path,
    prefix: str,
    found: dict[str, tuple[Path, Path | None, tuple[str, ...]]],
    depth: int,
    seen: set[Path],
) -> None:
    real = folder.resolve()
    if real in seen:
        return  # a link back to a folder already scanned: no loops, no model twice
    seen.add(real)
    files: list[Path] = []
    folders: list[Path] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        _inside(path, root)
        if entry.is_dir():
            folders.append(path)
        elif entry.is_file() and entry.name.lower().endswith(GGUF):
            files.append(path)
    models, projectors = _models_in(files)
    if depth > 0 and len(models) == 1 and len(projectors) <= 1:
        # One model per folder, as the router expects for split and multimodal models.
        ((stem, gguf),) = models.items()
        folder_id = prefix.rstrip("/")
        found.setdefault(folder_id, (gguf, projectors[0] if projectors else None, (prefix + stem,)))
    else:
        for stem, gguf in models.items():
            found.setdefault(prefix + stem, (gguf, None, ()))
    if depth >= MAX_DEPTH:
        return
    for sub in folders:
        _scan(sub, root, f"{prefix}{sub.name}/", found, depth + 1, seen)


def _models_in(files: list[Path]) -> tuple[dict[str, Path], list[Path]]:
    """Stem -> file (first shard for a split model), and the projector files."""
    models: dict[str, Path] = {}
    projectors: list[Path] = []
    for path in files:
        if path.name.lower().startswith(MMPROJ_PREFIX):
            projectors.append(path)
            continue
        stem = path.name[: -len(GGUF)]
        shard = _SHARD_RE.search(stem)
        if shard is not None:
            if int(shard.group(1)) != 1:
                continue
            stem = stem[: shard.start()]
        models[stem] = path
    return models, projectors


def _inside(path: Path, root: Path) -> None:
    """Refuse a path whose real location is outside the models folder."""
    real = path.resolve()
    if real != root and not real.is_relative_to(root):
        msg = (
            f"models directory {root}: {path.name} is a link to {real}, outside the folder; "
            "move the model into the folder or remove the link"
        )
        raise ConfigError(msg)
