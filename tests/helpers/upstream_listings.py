"""Upstream's real release listings (from the shared UPSTREAM-RELEASES.md notes), GitHub-API shaped.

Sizes and sha256 digests are the ones GitHub published for those assets; builds recorded by
name only carry ``size: None`` and ``digest: None``. The API lists assets by name, so the
``cudart-`` runtime twins come first: exactly the order a loose pattern trips over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "B11194",
    "B11434_NAMES",
    "LISTINGS",
    "Asset",
    "assets",
    "listing",
    "semver_listing",
]

REPO = "ggml-org/llama.cpp"

B11194: dict[str, tuple[int, str]] = {
    "llama-b11194-bin-ubuntu-x64.tar.gz": (17014362, "527c09064f3c89e4b6e1008a641e31903a04ccdd1c69abd0752acbbd4e1905f6"),
    "llama-b11194-bin-ubuntu-vulkan-x64.tar.gz": (30955864, "e4f8163eaf2e4d45639238a6fbc09f559e4ff5c0e7d612088a282ed128359c5e"),
    "llama-b11194-bin-ubuntu-cuda-13.4-x64.tar.gz": (151252143, "d4c637a0c8fd7bdca68d140c9a36cc6038067a7aa29f7b1994f52f2dafede8fd"),
    "cudart-llama-b11194-bin-ubuntu-cuda-13.4-x64.tar.gz": (440236666, "df147535ca08a49cb9be1ced3241e0a043dbedc8a0138b847f0c2e09012ac54c"),
    "llama-b11194-bin-ubuntu-cuda-12.8-x64.tar.gz": (170498826, "d415b688f353fcb5a387f272a5b6d783b8f09267b3b73e5e8920de6df9bffac9"),
    "cudart-llama-b11194-bin-ubuntu-cuda-12.8-x64.tar.gz": (594377795, "3ef39066810c3375bd2e30f418a8b7be7042a4e553e69ca0f9d8132c4fba4ca4"),
    "llama-b11194-bin-ubuntu-rocm-10.0-x64.tar.gz": (240223282, "b364ae02badfba6feb47931978b06aaf9c939a49f4f31d80290517fd4bacd604"),
    "llama-b11194-bin-ubuntu-arm64.tar.gz": (13608309, "92a8e5bb9f2f16804715fa6876f64691827a54d41d39dca67e2a83aa70f133ce"),
    "llama-b11194-bin-ubuntu-vulkan-arm64.tar.gz": (24776725, "1aa413dda941b31f58ff40205dcd9bad200eb569ef82623b8bc3adf8115162ef"),
    "llama-b11194-bin-ubuntu-cuda-13.4-arm64.tar.gz": (147066552, "3eecee705f32e964afb5a25b13d42af81385f9209c404479eb15deb3e567e957"),
    "cudart-llama-b11194-bin-ubuntu-cuda-13.4-arm64.tar.gz": (552521399, "8096d68b54c2d5043337e6a99bd446df495f0d409202a92ca70ddee8fa29d2ce"),
    "llama-b11194-bin-macos-arm64.tar.gz": (11767333, "cc5d31e048c1c440149a0aaf25a6e387823511c0f23561ec534a4ec07c14e9e1"),
    "llama-b11194-bin-macos-x64.tar.gz": (11250068, "fe9b6c1a2856647303b31401b89e9aab320416706c358c3ce4beb71d21b1f37a"),
    "llama-b11194-bin-win-cpu-x64.zip": (18579455, "a508189eb974891c6d665b00d7e1eb5f38adc98345ef1f4815d158dabe188edb"),
    "llama-b11194-bin-win-vulkan-x64.zip": (32469369, "2ba6c1f42f571c5e7d309aeae1052b846794003eca4c332b0ce5498b5bcd7305"),
    "llama-b11194-bin-win-cuda-13.4-x64.zip": (151727000, "54bcbaeece80d2d3096ab47babe88cbb1923e682e16a31557cd1f1b6579a1ca0"),
    "cudart-llama-bin-win-cuda-13.4-x64.zip": (423535356, "738f8c251ac22b70c3ae6f83a10cf222725df0395246a2cf58f32bdb85fbe668"),
    "llama-b11194-bin-win-cuda-12.4-x64.zip": (262445663, "419f7436783fe58640a0e2b6bfde5371ab755f23e3ed717c93aa4777f1deed7f"),
    "cudart-llama-bin-win-cuda-12.4-x64.zip": (391443627, "8c79a9b226de4b3cacfd1f83d24f962d0773be79f1e7b75c6af4ded7e32ae1d6"),
    "llama-b11194-bin-win-rocm-10.0-x64.zip": (256736852, "eed04cf34070ac1bf0c25dedda2dcd92fd1685086311cd039e43befd86897647"),
    "llama-b11194-bin-win-cpu-arm64.zip": (12051155, "ce9602bae7616831ec3863df7d509fb160183c4a784f98345086723b353d9beb"),
}  # fmt: skip
"""b11194 (commit 9f70b2cecd1a9a3f73ac525c47ca22a6ee9a7b69): every archive, size and digest."""

_B11039 = [
    "llama-b11039-bin-ubuntu-x64.tar.gz",
    "llama-b11039-bin-ubuntu-vulkan-x64.tar.gz",
    "llama-b11039-bin-ubuntu-cuda-12.8-x64.tar.gz",
    "llama-b11039-bin-ubuntu-cuda-13.3-x64.tar.gz",
    "cudart-llama-b11039-bin-ubuntu-cuda-12.8-x64.tar.gz",
    "cudart-llama-b11039-bin-ubuntu-cuda-13.3-x64.tar.gz",
    "llama-b11039-bin-win-cuda-12.4-x64.zip",
    "cudart-llama-bin-win-cuda-12.4-x64.zip",
]
_B11425: dict[str, tuple[int, str]] = {
    "llama-b11425-bin-ubuntu-cuda-12.8-x64.tar.gz": (171642941, "ff7f7134ee3677bddf9ead356a1bc8b9cbc479d2b1e26b9e0d6753a5401e632b"),
    "cudart-llama-b11425-bin-ubuntu-cuda-12.8-x64.tar.gz": (594377568, "efe82ad6fea3820fef207e7cf73748760de3dcf604c1aaa9aa01d4c1ec2f79cb"),
}  # fmt: skip
_B11457_API_ORDER = [
    "cudart-llama-b11457-bin-ubuntu-cuda-12.8-x64.tar.gz",
    "cudart-llama-b11457-bin-ubuntu-cuda-13.4-arm64.tar.gz",
    "cudart-llama-b11457-bin-ubuntu-cuda-13.4-x64.tar.gz",
    "llama-b11457-bin-ubuntu-arm64.tar.gz",
    "llama-b11457-bin-ubuntu-cuda-12.8-x64.tar.gz",
    "llama-b11457-bin-ubuntu-cuda-13.4-x64.tar.gz",
    "llama-b11457-bin-ubuntu-vulkan-x64.tar.gz",
]

B11434_NAMES: list[str] = sorted(
    [
        *(f"llama-b11434-bin-{flavor}" for flavor in (
            "macos-arm64.tar.gz", "macos-x64.tar.gz", "ubuntu-x64.tar.gz", "ubuntu-arm64.tar.gz",
            "ubuntu-s390x.tar.gz", "ubuntu-vulkan-x64.tar.gz", "ubuntu-vulkan-arm64.tar.gz",
            "ubuntu-cuda-12.8-x64.tar.gz", "ubuntu-cuda-13.4-x64.tar.gz",
            "ubuntu-cuda-13.4-arm64.tar.gz", "ubuntu-rocm-10.0-x64.tar.gz",
            "ubuntu-sycl-fp32-x64.tar.gz", "ubuntu-sycl-fp16-x64.tar.gz",
            "linux-arm64-snapdragon.tar.gz", "android-arm64.tar.gz",
            "win-cpu-x64.zip", "win-cpu-arm64.zip", "win-opencl-adreno-arm64.zip",
            "win-cuda-12.4-x64.zip", "win-cuda-13.4-x64.zip", "win-cuda-13.4-arm64.zip",
            "win-vulkan-x64.zip", "win-vulkan-arm64.zip", "win-sycl-x64.zip",
            "win-rocm-10.0-x64.zip",
        )),
        "cudart-llama-b11434-bin-ubuntu-cuda-12.8-x64.tar.gz",
        "cudart-llama-b11434-bin-ubuntu-cuda-13.4-x64.tar.gz",
        "cudart-llama-b11434-bin-ubuntu-cuda-13.4-arm64.tar.gz",
        "cudart-llama-bin-win-cuda-12.4-x64.zip",
        "cudart-llama-bin-win-cuda-13.4-x64.zip",
        "cudart-llama-bin-win-cuda-13.4-arm64.zip",
        "llama-b11434-xcframework.zip",
        "llama-b11434-ui.tar.gz",
    ]
)  # fmt: skip
"""The pinned build's archive names as its release-publish.yml lists them (names only)."""

LISTINGS: dict[str, dict[str, tuple[int | None, str | None]]] = {
    "b11194": dict(B11194),
    "b11039": dict.fromkeys(_B11039, (None, None)),
    "b11425": dict(_B11425),
    "b11434": dict.fromkeys(B11434_NAMES, (None, None)),
}


@dataclass(frozen=True)
class Asset:
    """One listing entry, the fields the manifest matches on."""

    name: str
    size: int | None
    sha256: str | None


def listing(tag: str, *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The GitHub release document for ``tag`` (assets by name, as the API lists them).

    Args:
        tag: one of the recorded builds (b11039, b11194, b11425, b11434, b11457).
        drop: asset names to leave out (e.g. a missing runtime twin).
    """
    if tag == "b11457":
        # Recorded in the API's own order; keep it as it was seen.
        entries: list[tuple[str, int | None, str | None]] = [
            (n, None, None) for n in _B11457_API_ORDER
        ]
    else:
        entries = [(n, s, d) for n, (s, d) in sorted(LISTINGS[tag].items())]
    return {
        "url": f"https://api.github.com/repos/{REPO}/releases/0",
        "tag_name": tag,
        "name": tag,
        "prerelease": True,
        "assets": [
            {
                "id": 100 + i,
                "name": name,
                "size": size,
                "digest": f"sha256:{digest}" if digest else None,
                "state": "uploaded",
                "browser_download_url": f"https://github.com/{REPO}/releases/download/{tag}/{name}",
            }
            for i, (name, size, digest) in enumerate(entries)
            if name not in drop
        ],
    }


def assets(tag: str, *, drop: tuple[str, ...] = ()) -> list[Asset]:
    """The listing's entries in API order, as :class:`Asset` values."""
    out = []
    for raw in listing(tag, drop=drop)["assets"]:
        digest = raw["digest"]
        out.append(Asset(raw["name"], raw["size"], digest.split(":", 1)[1] if digest else None))
    return out


NIGHTLY_TAG_ASSET = "nightly-tag.txt"


def semver_listing(tag: str, body: bytes, *, size: int | None = None) -> dict[str, Any]:
    """A release of upstream's scheme since Aug 2026: a ``vX.Y.Z`` tag without binaries.

    Its only asset is ``nightly-tag.txt`` (``body``, e.g. ``b"b11434\\n"``) naming the ``b`` build
    that has them; it is not a prerelease, so GitHub's ``/releases/latest`` points at it.

    Args:
        tag: e.g. ``v1.0.0``.
        body: the file's bytes.
        size: the size the listing claims (default: ``len(body)``).
    """
    import hashlib

    return {
        "url": f"https://api.github.com/repos/{REPO}/releases/1",
        "tag_name": tag,
        "name": f"llama.cpp {tag}",
        "draft": False,
        "prerelease": False,
        "assets": [
            {
                "id": 900,
                "name": NIGHTLY_TAG_ASSET,
                "content_type": "text/plain",
                "size": len(body) if size is None else size,
                "digest": f"sha256:{hashlib.sha256(body).hexdigest()}",
                "state": "uploaded",
                "browser_download_url": (
                    f"https://github.com/{REPO}/releases/download/{tag}/{NIGHTLY_TAG_ASSET}"
                ),
            }
        ],
    }
