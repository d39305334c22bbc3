"""Provisioning: get a verified llama-server for this host into the per-user cache.

Names are loaded on first use so that importing the package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from llama_proc._lazy import lazy_exports

if TYPE_CHECKING:
    from llama_proc.models.smoke_model import fetch_smoke_model
    from llama_proc.provision.cache.installer import install_atomically
    from llama_proc.provision.cache.inventory import list_installs
    from llama_proc.provision.cache.record import Install
    from llama_proc.provision.compile.build import build_variant
    from llama_proc.provision.host.host_info import HostInfo
    from llama_proc.provision.host.platform import detect_host
    from llama_proc.provision.host.selection import Selection, select_variant
    from llama_proc.provision.manifest import load_manifest
    from llama_proc.provision.manifest_records import Manifest, Variant
    from llama_proc.provision.resolve import ensure_server, resolve_server

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
    "HostInfo": "host.host_info",
    "Install": "cache.record",
    "Manifest": "manifest_records",
    "Selection": "host.selection",
    "Variant": "manifest_records",
    "build_variant": "compile.build",
    "detect_host": "host.platform",
    "ensure_server": "resolve",
    "fetch_smoke_model": "llama_proc.models.smoke_model",
    "install_atomically": "cache.installer",
    "list_installs": "cache.inventory",
    "load_manifest": "manifest",
    "resolve_server": "resolve",
    "select_variant": "host.selection",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals(), __all__)
