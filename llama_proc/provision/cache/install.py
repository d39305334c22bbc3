"""Deprecated: the install record moved to :mod:`llama_proc.provision.cache.record`.

(``record`` is the record; :mod:`~llama_proc.provision.cache.installer` makes it.) Importing this
module warns once and gives the same names; it goes away in a later release.
"""

from __future__ import annotations

import warnings

from llama_proc.provision.cache.record import *
from llama_proc.provision.cache.record import __all__  # noqa: F401

warnings.warn(
    "llama_proc.provision.cache.install moved to llama_proc.provision.cache.record; "
    "import it from there",
    DeprecationWarning,
    stacklevel=2,
)
