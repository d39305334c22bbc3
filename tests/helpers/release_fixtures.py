"""Fake llama.cpp releases in the upstream layout, served by :class:`http_server.FileServer`.

Typical use (e.g. an ``ensure_server`` test)::

    from http_server import FileServer
    from release_fixtures import make_release, serve_release, write_variants_toml

    fixture = make_release(tmp_path, "b11434")                 # host's flavor, e.g. ubuntu-x64
    with FileServer() as server:
        mirror = serve_release(server, fixture)                # == server.url
        manifest_path = write_variants_toml(tmp_path / "variants.toml", fixture)
        settings = Settings(cache_dir=tmp_path / "cache", mirror=mirror)
        install = ensure_server(settings, manifest=load_manifest(manifest_path), ...)
        assert server.hits(fixture.download_path(fixture.main_asset)) == 1

Archives:

* ``.tar.gz`` (ubuntu-*, macos-*): one ``llama-<tag>/`` folder with an executable
  ``llama-server`` and ``ggml-rpc-server`` (POSIX shell shims that print
  ``version: <N> (abcdef0)`` to stderr on ``--version``) and a library symlink chain
  (``libllama.so -> libllama.so.0 -> libllama.so.0.0.1``, ``.dylib`` on macOS).
* ``.zip`` (win-*): files at the root (``llama-server.exe``...); ``win-cuda-<v>-x64`` also gets
  the separate ``cudart-llama-bin-win-cuda-<v>-x64.zip``.

The listing is GitHub-API shaped: ``assets: [{name, browser_download_url, size, digest}]``.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import re
import stat
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from llama_proc.provision.host.host_info import HostInfo

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "LINUX",
    "ON_LINUX",
    "ReleaseFixture",
    "attestation_document",
    "attestation_path",
    "fake_gguf",
    "host_flavor",
    "make_release",
    "make_tar",
    "make_wheel",
    "make_zip",
    "needs_linux",
    "serve_index",
    "serve_release",
    "serve_semver_release",
    "sha256_of",
    "shim_script",
    "write_variants_toml",
]

REPO = "ggml-org/llama.cpp"
COMMIT = "abcdef0"
_MTIME = 1_700_000_000
_REPO_ROOT = Path(__file__).resolve().parents[2]

LINUX = HostInfo(
    os="linux",
    arch="x86_64",
    libc="glibc",
    libc_version="2.39",
    cpu_features=frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"}),
)
"""A Linux x86_64 host (glibc 2.39, AVX2) that the shipped CPU prebuilt fits."""
ON_LINUX = sys.platform.startswith("linux")
needs_linux = pytest.mark.skipif(not ON_LINUX, reason="runs the Linux shims (smoke check)")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def host_flavor() -> str:
    """Upstream's asset flavor for this machine (what the host's cpu variant matches)."""
    machine = platform.machine().lower()
    arm = machine in ("arm64", "aarch64")
    if sys.platform == "darwin":
        return "macos-arm64" if arm else "macos-x64"
    if sys.platform == "win32":
        return "win-cpu-arm64" if arm else "win-cpu-x64"
    return "ubuntu-arm64" if arm else "ubuntu-x64"


def build_number(tag: str) -> int:
    digits = tag.removeprefix("b")
    return int(digits) if digits.isdigit() else 0


def shim_script(
    tag: str,
    *,
    name: str = "llama-server",
    server_script: Path | None = None,
    python: str = sys.executable,
    version_line: str | None = None,
) -> str:
    """A POSIX shell stand-in for a llama.cpp binary.

    ``--version`` prints ``version: <N> (abcdef0)`` (or ``version_line``) to stderr like the
    real binary. ``--list-devices`` prints upstream's list: a CUDA device when a CUDA runtime
    (``libcudart.so.*``) lies beside the shim, as for a CUDA build with its runtime twin, else
    ``(none)``. Any other call execs ``python server_script "$@"`` when a script is given,
    else fails with exit 1.
    """
    line = version_line or f"version: {build_number(tag)} ({COMMIT})"
    rest = (
        f'exec "{python}" "{server_script}" "$@"\n'
        if server_script is not None
        else f'echo "fake {name}: only --version is implemented" >&2\nexit 1\n'
    )
    return (
        "#!/bin/sh\n"
        f"# fake {name} made by llama-proc's tests\n"
        'if [ "$1" = "--version" ]; then\n'
        f'  echo "{line}" >&2\n'
        '  echo "built with fake-cc for fake-target" >&2\n'
        "  exit 0\n"
        "fi\n"
        'if [ "$1" = "--list-devices" ]; then\n'
        '  echo "Available devices:"\n'
        '  if ls "$(dirname "$0")"/libcudart.so.* >/dev/null 2>&1; then\n'
        '    echo "  CUDA0: NVIDIA Fake GPU (16384 MiB, 16000 MiB free)"\n'
        "  else\n"
        '    echo "  (none)"\n'
        "  fi\n"
        "  exit 0\n"
        "fi\n" + rest
    )


# ----------------------------------------------------------------------------- archive writers
def make_tar(path: Path, entries: Sequence[tuple[str, Any]]) -> Path:
    """Write a ``.tar.gz``. Entries: ``(name, bytes)`` (mode 0o644), ``(name, (bytes, mode))``,
    ``(name, {"dir": True})``, ``(name, {"symlink": target})``, ``(name, {"hardlink": target})``,
    ``(name, {"type": tarfile.CHRTYPE})`` for special members."""
    with tarfile.open(path, "w:gz") as tar:
        for name, spec in entries:
            info = tarfile.TarInfo(name)
            info.mtime = _MTIME
            data: bytes | None = None
            if isinstance(spec, bytes):
                data, info.mode = spec, 0o644
            elif isinstance(spec, tuple):
                data, info.mode = spec
            elif spec.get("dir"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif "symlink" in spec:
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, spec["symlink"], 0o777
            elif "hardlink" in spec:
                info.type, info.linkname = tarfile.LNKTYPE, spec["hardlink"]
            else:
                info.type = spec["type"]
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def make_zip(path: Path, entries: Sequence[tuple[str, Any]]) -> Path:
    """Write a ``.zip``. Entries: ``(name, bytes)``, ``(name, (bytes, unix_mode))`` where the
    mode may include file-type bits (``stat.S_IFLNK | 0o777`` with the target as bytes makes a
    symlink, ``stat.S_IFCHR`` a device)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, spec in entries:
            data, mode = (spec, 0o644) if isinstance(spec, bytes) else spec
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.create_system = 3  # Unix, so external_attr carries the mode
            if stat.S_IFMT(mode) == 0:
                mode |= stat.S_IFDIR if name.endswith("/") else stat.S_IFREG
            info.external_attr = (mode & 0xFFFF) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return path


def make_wheel(path: Path, members: Mapping[str, bytes]) -> tuple[Path, str]:
    """A minimal wheel (a zip) holding ``members``; returns ``(path, sha256)``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path, sha256_of(path)


def fake_gguf(size: int = 4096) -> bytes:
    """Bytes that start like a GGUF v3 file (magic + version), then filler."""
    body = b"GGUF" + (3).to_bytes(4, "little")
    filler = bytes(range(256)) * ((size - len(body)) // 256 + 1)
    return body + filler[: size - len(body)]


# ----------------------------------------------------------------------------- releases
@dataclass
class ReleaseFixture:
    """A fake release on disk: archives plus a GitHub-API-shaped listing."""

    repo: str
    tag: str
    root: Path
    listing_path: Path
    listing: dict[str, Any]
    assets: dict[str, tuple[Path, str]]
    """asset name -> (file, sha256)."""
    flavors: list[str] = field(default_factory=list)

    @property
    def main_asset(self) -> str:
        """The archive of the first flavor."""
        return self.asset_name(self.flavors[0])

    def asset_name(self, flavor: str) -> str:
        ext = "zip" if flavor.startswith("win-") else "tar.gz"
        return f"llama-{self.tag}-bin-{flavor}.{ext}"

    def sha256(self, name: str) -> str:
        return self.assets[name][1]

    @property
    def listing_url_path(self) -> str:
        """``/repos/<repo>/releases/tags/<tag>``: the listing path under a mirror."""
        return f"/repos/{self.repo}/releases/tags/{self.tag}"

    def download_path(self, name: str) -> str:
        """``/<repo>/releases/download/<tag>/<name>``: an asset's path under a mirror."""
        return f"/{self.repo}/releases/download/{self.tag}/{name}"


def _posix_archive_entries(
    tag: str, flavor: str, server_script: Path | None, version_line: str | None
) -> list[tuple[str, Any]]:
    top = f"llama-{tag}"
    mac = flavor.startswith("macos-")
    if mac:
        chain = ["libllama.dylib", "libllama.0.dylib", "libllama.0.0.1.dylib"]
    else:
        chain = ["libllama.so", "libllama.so.0", "libllama.so.0.0.1"]
    shim = {
        name: shim_script(
            tag, name=name, server_script=server_script, version_line=version_line
        ).encode()
        for name in ("llama-server", "ggml-rpc-server")
    }
    return [
        (f"{top}/", {"dir": True}),
        (f"{top}/llama-server", (shim["llama-server"], 0o755)),
        (f"{top}/ggml-rpc-server", (shim["ggml-rpc-server"], 0o755)),
        (f"{top}/{chain[2]}", b"\x7fELF fake shared library " + tag.encode()),
        (f"{top}/{chain[1]}", {"symlink": chain[2]}),
        (f"{top}/{chain[0]}", {"symlink": chain[1]}),
        (f"{top}/LICENSE", b"MIT (fake)\n"),
    ]


def _windows_entries(tag: str) -> list[tuple[str, Any]]:
    exe = b"MZ fake windows executable " + tag.encode()
    return [
        ("llama-server.exe", (exe, 0o755)),
        ("ggml-rpc-server.exe", (exe, 0o755)),
        ("llama.dll", b"MZ fake dll"),
        ("ggml.dll", b"MZ fake dll"),
    ]


def make_release(
    tmpdir: Path,
    tag: str = "b11434",
    variants: Iterable[str] | None = None,
    *,
    repo: str = REPO,
    digests: bool = True,
    extra_assets: Mapping[str, bytes] | None = None,
    server_script: Path | None = None,
    version_line: str | None = None,
    prerelease: bool = False,
) -> ReleaseFixture:
    """Build the archives and listing of a fake release under ``tmpdir/release-<tag>``.

    Args:
        tmpdir: parent folder.
        tag: release tag (``b<N>``); the shims report build N.
        variants: upstream flavors, e.g. ``ubuntu-x64``, ``ubuntu-vulkan-x64``,
            ``macos-arm64``, ``win-cpu-x64``, ``win-cuda-12.4-x64`` (adds the cudart zip).
            Default: this host's flavor.
        repo: ``owner/name``.
        digests: include ``digest: "sha256:..."`` per asset (older GitHub listings lack it).
        extra_assets: further ``name -> bytes`` assets (served too; e.g. decoys).
        server_script: make the shims exec ``python server_script "$@"`` (a fake server).
        version_line: what ``--version`` prints instead of ``version: <N> (abcdef0)``.
        prerelease: mark the release a prerelease (upstream's ``b`` tags are, since Aug 2026).
    """
    flavors = list(variants) if variants is not None else [host_flavor()]
    root = tmpdir / f"release-{tag}"
    root.mkdir(parents=True, exist_ok=True)
    fixture = ReleaseFixture(repo, tag, root, root / "listing.json", {}, {}, flavors)
    files: dict[str, Path] = {}
    for flavor in flavors:
        name = fixture.asset_name(flavor)
        if flavor.startswith("win-"):
            files[name] = make_zip(root / name, _windows_entries(tag))
            cuda = re.match(r"^win-cuda-([0-9.]+)-(x64|arm64)$", flavor)
            if cuda:
                cudart = f"cudart-llama-bin-win-cuda-{cuda.group(1)}-{cuda.group(2)}.zip"
                files[cudart] = make_zip(
                    root / cudart,
                    [(n, b"MZ fake cuda runtime") for n in ("cudart64_12.dll", "cublas64_12.dll")],
                )
        else:
            entries = _posix_archive_entries(tag, flavor, server_script, version_line)
            files[name] = make_tar(root / name, entries)
    for name, data in (extra_assets or {}).items():
        (root / name).write_bytes(data)
        files[name] = root / name
    assets = []
    for i, (name, path) in enumerate(files.items(), start=1):
        sha = sha256_of(path)
        fixture.assets[name] = (path, sha)
        entry: dict[str, Any] = {
            "id": 1000 + i,
            "name": name,
            "content_type": "application/zip" if name.endswith(".zip") else "application/gzip",
            "state": "uploaded",
            "size": path.stat().st_size,
            "browser_download_url": f"https://github.com/{repo}/releases/download/{tag}/{name}",
        }
        entry["digest"] = f"sha256:{sha}" if digests else None
        assets.append(entry)
    fixture.listing = {
        "url": f"https://api.github.com/repos/{repo}/releases/0",
        "tag_name": tag,
        "name": tag,
        "draft": False,
        "prerelease": prerelease,
        "assets": assets,
    }
    fixture.listing_path.write_text(json.dumps(fixture.listing, indent=1), encoding="utf-8")
    return fixture


def serve_release(server: Any, fixture: ReleaseFixture, **faults: Any) -> str:
    """Serve the listing and every asset in the mirror layout; returns the mirror URL.

    ``faults`` (see :class:`http_server.Route`) apply to every asset; change one asset's
    faults afterwards with ``server.route(fixture.download_path(name))``.
    """
    server.add(fixture.listing_url_path, fixture.listing_path, content_type="application/json")
    for name, (path, _sha) in fixture.assets.items():
        server.add(fixture.download_path(name), path, **faults)
    return str(server.url)


def serve_semver_release(
    server: Any,
    tag: str,
    body: bytes,
    *,
    repo: str = REPO,
    size: int | None = None,
    latest: bool = False,
) -> str:
    """Serve a ``vX.Y.Z`` release whose only asset is ``nightly-tag.txt`` holding ``body``.

    Args:
        server: the :class:`http_server.FileServer`.
        tag: the semver tag.
        body: what ``nightly-tag.txt`` holds (e.g. ``b"b11434\\n"``).
        repo: ``owner/name``.
        size: the size its listing claims (default: ``len(body)``).
        latest: also serve the listing at ``/repos/<repo>/releases/latest``.

    Returns:
        The path ``nightly-tag.txt`` is served at.
    """
    from upstream_listings import NIGHTLY_TAG_ASSET, semver_listing

    doc = semver_listing(tag, body, size=size)
    server.add_json(f"/repos/{repo}/releases/tags/{tag}", doc)
    if latest:
        server.add_json(f"/repos/{repo}/releases/latest", doc)
    path = f"/{repo}/releases/download/{tag}/{NIGHTLY_TAG_ASSET}"
    server.add(path, body, content_type="text/plain")
    return path


def attestation_path(sha256: str, repo: str = REPO) -> str:
    """Where GitHub's API (and a mirror) serves the attestations of an asset with ``sha256``."""
    return f"/repos/{repo}/attestations/sha256:{sha256}"


def _self_signed_der() -> bytes:
    """A short-lived self-signed EC certificate (DER): well formed, and no Fulcio issued it."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not fulcio")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(minutes=5))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def attestation_document(
    *subject_sha256: str, name: str = "asset", well_formed: bool = False
) -> dict[str, Any]:
    """GitHub's attestations answer holding one Sigstore bundle shaped like upstream's.

    Its DSSE envelope holds a real in-toto statement naming ``subject_sha256``; nothing signed
    it. By default the certificate and log entry are placeholders (sigstore cannot parse the
    bundle); ``well_formed`` gives a self-signed certificate and a complete (unsigned) log
    entry, so sigstore parses it and its verifier must reject the certificate chain.
    """
    import base64
    import time

    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": name, "digest": {"sha256": s}} for s in subject_sha256],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {"buildType": "https://actions.github.io/buildtypes/workflow/v1"}
        },
    }
    payload = base64.b64encode(json.dumps(statement).encode()).decode()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    zeros = b64(bytes(32))
    entry = {
        "logIndex": "1",
        "logId": {"keyId": zeros},
        "kindVersion": {"kind": "dsse", "version": "0.0.1"},
        "integratedTime": str(int(time.time())),  # within the certificate's validity
        "inclusionPromise": {"signedEntryTimestamp": b64(b"not a signed entry timestamp")},
        "inclusionProof": {
            "logIndex": "1",
            "rootHash": zeros,
            "treeSize": "2",
            "hashes": [zeros],
            "checkpoint": {"envelope": "rekor.sigstore.dev - 1\n2\nAAAA\n\n- rekor AAAA\n"},
        },
        "canonicalizedBody": b64(b"{}"),
    }
    bundle = {
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {
            "certificate": {
                "rawBytes": b64(_self_signed_der() if well_formed else b"not a certificate")
            },
            "tlogEntries": [entry] if well_formed else [],
        },
        "dsseEnvelope": {
            "payload": payload,
            "payloadType": "application/vnd.in-toto+json",
            "signatures": [{"sig": base64.b64encode(b"not a signature").decode()}],
        },
    }
    return {"attestations": [{"bundle": bundle, "repository_id": 612354784}]}


def write_variants_toml(
    path: Path,
    fixture: ReleaseFixture,
    *,
    pin: bool | Mapping[str, str] = False,
    base: Path | None = None,
    smoke_model: Mapping[str, str] | None = None,
) -> Path:
    """Write a manifest for ``fixture``: the repo's variants.toml with its build set to the tag.

    Args:
        path: where to write.
        fixture: the release.
        pin: True pins every fixture asset's real sha256 in each variant whose patterns match
            it; a mapping pins those ``name -> sha256`` values instead (e.g. a wrong one).
        base: manifest to start from (default: the repository's variants.toml).
        smoke_model: replacement ``[smoke_model]`` keys (project, version, filename, sha256,
            member).
    """
    from llama_proc.provision.manifest import parse_manifest

    text = (base or _REPO_ROOT / "variants.toml").read_text(encoding="utf-8")
    text = re.sub(r'(?m)^build = "b\d+"$', f'build = "{fixture.tag}"', text, count=1)
    text = re.sub(r'(?m)^repo = "[^"]*"$', f'repo = "{fixture.repo}"', text, count=1)
    if smoke_model is not None:
        body = "".join(f'{k} = "{v}"\n' for k, v in smoke_model.items())
        text = re.sub(
            r"(?ms)^\[smoke_model\]\n.*?(?=^\[|\Z)", "[smoke_model]\n" + body + "\n", text
        )
    if pin:
        pins = {n: s for n, (_p, s) in fixture.assets.items()} if pin is True else dict(pin)
        manifest = parse_manifest(text, str(path))
        for variant in manifest.variants:
            if not variant.has_prebuilt:
                continue
            patterns = [variant.asset_regex(fixture.tag), *variant.extra_asset_regexes(fixture.tag)]
            chosen = {n: s for n, s in pins.items() if any(p.search(n) for p in patterns)}
            if not chosen:
                continue
            table = ", ".join(f'"{n}" = "{s}"' for n, s in chosen.items())
            text = text.replace(
                f'id = "{variant.id}"\n', f'id = "{variant.id}"\nsha256 = {{ {table} }}\n', 1
            )
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- package index
def serve_index(
    server: Any,
    project: str,
    files: Mapping[str, Path | bytes],
    *,
    hashes: Mapping[str, str | None] | None = None,
    prefix: str = "/simple",
) -> str:
    """Serve a PEP 691 JSON project page plus its files; returns the index URL.

    The page lives at ``{prefix}/{normalized project}/`` and links each file with a relative
    URL (``../../files/<name>``) and its sha256 (``hashes`` overrides; None omits it).
    """
    from llama_proc.provision.fetch.index import normalize_project

    entries = []
    for name, body in files.items():
        data_path = body if isinstance(body, Path) else None
        sha = sha256_of(data_path) if data_path else hashlib.sha256(body).hexdigest()  # type: ignore[arg-type]
        if hashes is not None and name in hashes:
            sha = hashes[name]  # type: ignore[assignment]
        server.add(f"/files/{name}", body)
        entries.append(
            {
                "filename": name,
                "url": f"../../files/{name}",
                "hashes": {"sha256": sha} if sha else {},
                "requires-python": ">=3.8",
            }
        )
    page = {"meta": {"api-version": "1.1"}, "name": normalize_project(project), "files": entries}
    server.add_json(
        f"{prefix}/{normalize_project(project)}/",
        page,
        content_type="application/vnd.pypi.simple.v1+json",
    )
    return f"{server.url}{prefix}"
