"""What a models config becomes: a :class:`ModelSpec` per model, a :class:`ModelsConfig`.

Every config format (:mod:`llama_proc.proxy.models_config`) produces these; the pool, the flag
checker and the app read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from llama_proc.errors import ConfigError
from llama_proc.proxy.body_policy import BodyPolicy
from llama_proc.proxy.flag_policy import FlagPolicy

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

    from llama_proc.models.hub import ModelRef

__all__ = ["ModelSpec", "ModelsConfig"]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model the proxy can serve.

    Attributes:
        id: the name clients put in ``model``.
        path: the GGUF file (first shard for split models); None for a reference not fetched
            yet.
        ref: the Hugging Face reference the config names (``model = "org/repo:QUANT"``).
        mmproj: also fetch the referenced repository's multimodal projector.
        options: :class:`~llama_proc.runtime.ServerArgs` keyword arguments.
        extra_args: trusted extra llama-server flags from the config, placed before per-request
            flags.
        aliases: other names that resolve to this model.
        idle_ttl: seconds an idle server stays up; None = the pool default, 0 = never unload.
        source: where the entry came from (for ``/v1/models`` and error messages).
        request_flags: which ``X-Llama-Flags`` clients may send for this model (none by
            default).
        request_body: this model's limits on request bodies, under the server-wide caps.
    """

    id: str
    path: Path | None = None
    ref: ModelRef | None = None
    mmproj: bool = False
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    extra_args: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    idle_ttl: float | None = None
    source: str = ""
    request_flags: FlagPolicy = field(default_factory=FlagPolicy)
    request_body: BodyPolicy = field(default_factory=BodyPolicy)

    def __post_init__(self) -> None:
        if self.path is None and self.ref is None:
            msg = f"model {self.id!r} needs a path or a Hugging Face reference"
            raise ConfigError(msg)


@dataclass(frozen=True)
class ModelsConfig:
    """The set of models the proxy serves, by id, with alias lookup."""

    models: Mapping[str, ModelSpec]
    _names: Mapping[str, str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        names: dict[str, str] = {model_id: model_id for model_id in self.models}
        for spec in self.models.values():
            for alias in spec.aliases:
                if names.setdefault(alias, spec.id) != spec.id:
                    msg = (
                        f"model alias {alias!r} of {spec.id!r} is already used by "
                        f"{names[alias]!r}; give it a different name"
                    )
                    raise ConfigError(msg)
        object.__setattr__(self, "_names", MappingProxyType(names))

    def resolve(self, name: str) -> ModelSpec | None:
        """The model called ``name`` (an id or an alias), or None."""
        model_id = self._names.get(name)
        return None if model_id is None else self.models[model_id]

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.models.values())
