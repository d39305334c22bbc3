"""Provisioning: get a verified llama-server for this host into the per-user cache.

Names are loaded on first use so that importing the package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from llama_proc._lazy import lazy_exports

if TYPE_CHECKING:
    from llama_proc.provision.build import build_variant
    from llama_proc.provision.install import Install
    from llama_proc.provision.installer import install_atomically
    from llama_proc.provision.inventory import list_installs
    from llama_proc.provision.manifest import Manifest, Variant, load_manifest
    from llama_proc.provision.platform import HostInfo, detect_host
    from llama_proc.provision.resolve import ensure_server, resolve_server
    from llama_proc.provision.selection import Selection, select_variant
    from llama_proc.provision.smoke_model import fetch_smoke_model

__all__ = [
    "HostInfo",
    "Install",
    "Manifest",
    "Selection",
    "Variant",
    "build_variant",
    "detect_host",
    "ensure_server",
    "fetch_smoke_model",
    "install_atomically",
    "list_installs",
    "load_manifest",
    "resolve_server",
    "select_variant",
]

_WHERE: Final = {
    "HostInfo": "platform",
    "Install": "install",
    "Manifest": "manifest",
    "Selection": "selection",
    "Variant": "manifest",
    "build_variant": "build",
    "detect_host": "platform",
    "ensure_server": "resolve",
    "fetch_smoke_model": "smoke_model",
    "install_atomically": "installer",
    "list_installs": "inventory",
    "load_manifest": "manifest",
    "resolve_server": "resolve",
    "select_variant": "selection",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals(), __all__)
