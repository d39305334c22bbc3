"""What the resolution ladder looks for: :class:`Resolution`, the variant, build and why.

Its own module so the steps of the ladder (the prebuilt download, the build) can take it
without importing the ladder itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llama_proc.provision.cache import memo

if TYPE_CHECKING:
    from llama_proc.provision.host.platform import HostInfo
    from llama_proc.provision.host.selection import Selection
    from llama_proc.provision.manifest import Manifest, Variant

__all__ = ["Resolution"]


@dataclass(frozen=True)
class Resolution:
    """What the ladder will look for: the variant, the build and why."""

    selection: Selection
    build: str
    host: HostInfo
    manifest: Manifest

    @property
    def variant(self) -> Variant:
        """The selected variant."""
        return self.selection.variant

    @property
    def target(self) -> memo.Target:
        """The part of the plan a cache lookup needs (and :mod:`~.memo` remembers)."""
        return memo.Target(self.variant.id, self.build, self.selection.why)
