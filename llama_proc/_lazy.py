"""Lazy re-exports for package ``__init__`` modules (keeps ``import llama_proc`` cheap)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, where: Mapping[str, str], namespace: dict[str, Any], exported: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` that import each name on first use.

    Args:
        package: the package's ``__name__``.
        where: public name -> module holding it, relative to ``package`` (``"cache"``) or
            absolute (``"llama_proc.config"``).
        namespace: the package's ``globals()``; a loaded name is cached there.
        exported: the package's ``__all__``.
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module protocol's name
        module = where.get(name)
        if module is None:
            msg = f"module {package!r} has no attribute {name!r}"
            raise AttributeError(msg)
        path = module if module.startswith("llama_proc.") else f"{package}.{module}"
        value = getattr(importlib.import_module(path), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807 - the module protocol's name
        return sorted({*namespace, *exported})

    return __getattr__, __dir__
