"""Build-provenance attestations: is a downloaded archive what upstream's release workflow made?

Upstream's releases carry GitHub build-provenance attestations: an in-toto statement naming each
asset's sha256 as a subject, signed through Sigstore by the release workflow. GitHub serves them
at ``{api}/repos/{repo}/attestations/sha256:{digest}`` (``{"attestations": [{"bundle": ...}]}``);
a mirror serves them at the same path under its root.

:func:`check_asset` fetches that document (bounded in size and time) and, with the optional
``sigstore`` library (``pip install 'llama-proc[attest]'``), verifies a bundle offline against
Sigstore's embedded trust root: the statement must name the archive's sha256, the signature
must hold, and the signing certificate must be GitHub Actions' for the release's repository.

The states recorded in ``install.json`` (``"attestation"``):

* ``verified``: a bundle passed every check;
* ``absent``: none is served (HTTP 404, or no file on a ``file://`` mirror);
* ``unavailable``: one may exist but could not be checked (offline, a network error, or
  ``sigstore`` not installed);
* ``failed``: a bundle is served and does not verify; the install is refused
  (:class:`~llama_proc.errors.AttestationError`), never recorded.

The archive's sha256 has already been verified when this runs, so an attestation adds provenance;
its absence does not make the bytes unverified.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from llama_proc.errors import AttestationError
from llama_proc.provision.fetch.releases import GITHUB_ACCEPT, GITHUB_API_VERSION, api_base

if TYPE_CHECKING:
    from collections.abc import Sequence

    import requests

    from llama_proc.provision.views import NetView

__all__ = ["Attestation", "AttestationState", "check_asset", "summarize"]

logger = logging.getLogger(__name__)

MAX_ATTESTATION_BYTES: Final = 2 * 1024 * 1024
"""A bundle is a few KiB; a document of several is far below this. More is refused."""
ATTESTATION_TIMEOUT: Final = 20.0
"""Seconds for the connection and for each read of the attestation document."""
GITHUB_ACTIONS_ISSUER: Final = "https://token.actions.githubusercontent.com"
IN_TOTO_PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
ATTEST_EXTRA: Final = "pip install 'llama-proc[attest]'"
_CHUNK: Final = 64 * 1024
_HTTP_NOT_FOUND: Final = 404

AttestationState = Literal["verified", "absent", "unavailable", "failed"]


@dataclass(frozen=True)
class Attestation:
    """What was found out about one asset's attestation."""

    state: AttestationState
    detail: str

    def to_json(self) -> dict[str, str]:
        """The ``install.json`` form."""
        return {"state": self.state, "detail": self.detail}


def check_asset(
    repo: str,
    name: str,
    sha256: str,
    settings: NetView,
    session: requests.Session,
) -> Attestation:
    """Fetch and verify the attestation of the asset ``name`` whose sha256 is ``sha256``.

    Args:
        repo: ``owner/name``; the signing workflow must belong to it.
        name: the asset's file name (for messages).
        sha256: the asset's verified sha256 (lowercase hex).
        settings: mirror, offline flag.
        session: the ``requests`` session of the install.

    Returns:
        ``verified``, ``absent`` or ``unavailable`` (see the module docstring).

    Raises:
        AttestationError: a bundle is served and is malformed, too big, names another digest,
            or does not verify.
    """
    url = f"{api_base(settings)}/repos/{repo}/attestations/sha256:{sha256}"
    raw = _fetch(url, settings, session)
    if isinstance(raw, Attestation):
        return raw
    bundles = _bundles(raw, url, name)
    if not bundles:
        # GitHub's API may give only a link to each bundle; following it would send the
        # install to yet another host, so those are left unchecked and said so.
        return Attestation("unavailable", "the API gives only bundle_url links; not followed")
    for bundle in bundles:
        _check_subject(bundle, sha256, url, name)
    try:
        from sigstore.errors import Error as SigstoreError  # noqa: PLC0415  optional, heavy
        from sigstore.models import Bundle  # noqa: PLC0415
        from sigstore.verify import Verifier, policy  # noqa: PLC0415
    except ImportError:
        return Attestation("unavailable", f"a bundle is served; {ATTEST_EXTRA} to verify it")
    rule = policy.AllOf(
        [
            policy.OIDCIssuerV2(GITHUB_ACTIONS_ISSUER),
            policy.OIDCSourceRepositoryURI(f"https://github.com/{repo}"),
        ]
    )
    try:
        verifier = Verifier.production(offline=True)
    except (SigstoreError, OSError, ValueError) as err:
        return Attestation("unavailable", f"sigstore's trust root could not be loaded: {err}")
    problems: list[str] = []
    for bundle in bundles:
        try:
            kind, _payload = verifier.verify_dsse(Bundle.from_json(json.dumps(bundle)), rule)
        except (SigstoreError, ValueError) as err:
            problems.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
            continue
        if kind == IN_TOTO_PAYLOAD_TYPE:
            return Attestation("verified", f"signed by {repo}'s GitHub Actions workflow")
        problems.append(f"payload type {kind!r}")
    msg = (
        f"the attestation of {name} ({url}) does not verify: {'; '.join(problems)}; the archive "
        "may not be upstream's: refusing it (check LLAMA_PROC_MIRROR)"
    )
    raise AttestationError(msg)


def summarize(found: Sequence[tuple[str, Attestation]]) -> dict[str, Any]:
    """One ``install.json`` record for an install's archives: the weakest state, and each."""
    order: tuple[AttestationState, ...] = ("absent", "unavailable", "verified")
    state = min((a.state for _n, a in found), key=order.index, default="absent")
    details = "; ".join(f"{n}: {a.detail}" for n, a in found if a.state == state)
    return {
        "state": state,
        "detail": details,
        "assets": {n: a.to_json() for n, a in found},
    }


def _fetch(url: str, settings: NetView, session: requests.Session) -> bytes | Attestation:
    """The attestation document, or the state to record when there is none to check."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        path = Path(urllib.parse.unquote(parts.path))
        if not path.is_file():
            return Attestation("absent", "the mirror serves no attestation")
        if path.stat().st_size > MAX_ATTESTATION_BYTES:
            _too_big(url)
        return path.read_bytes()
    if settings.offline:
        return Attestation("unavailable", "offline mode: not fetched")
    import requests  # noqa: PLC0415 - heavy; only on the install path

    try:
        response = session.get(
            url,
            headers={"Accept": GITHUB_ACCEPT, "X-GitHub-Api-Version": GITHUB_API_VERSION},
            timeout=ATTESTATION_TIMEOUT,
            stream=True,
        )
        with response:
            if response.status_code == _HTTP_NOT_FOUND:
                return Attestation("absent", "none is published for this sha256")
            if response.status_code >= 400:
                reason = f"HTTP {response.status_code} {response.reason}"
                return Attestation("unavailable", f"{url}: {reason}")
            body = bytearray()
            for chunk in response.iter_content(_CHUNK):
                body += chunk
                if len(body) > MAX_ATTESTATION_BYTES:
                    _too_big(url)
    except requests.RequestException as err:
        logger.warning("could not fetch the attestation %s: %s", url, err)
        return Attestation("unavailable", f"{url}: {type(err).__name__}")
    return bytes(body)


def _too_big(url: str) -> None:
    msg = (
        f"the attestation document {url} holds more than {MAX_ATTESTATION_BYTES} bytes; no "
        "bundle is that big: refusing it (check LLAMA_PROC_MIRROR)"
    )
    raise AttestationError(msg)


def _malformed(url: str, name: str, what: str) -> AttestationError:
    msg = (
        f"the attestation of {name} ({url}) is malformed ({what}); refusing the archive "
        "(check LLAMA_PROC_MIRROR)"
    )
    return AttestationError(msg)


def _bundles(raw: bytes, url: str, name: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise _malformed(url, name, f"not JSON: {err}") from err
    entries = data.get("attestations") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise _malformed(url, name, "no 'attestations' list")
    bundles: list[dict[str, Any]] = []
    for entry in entries:
        inline = entry.get("bundle") if isinstance(entry, dict) else None
        if isinstance(inline, dict):
            bundles.append(inline)
        elif not (isinstance(entry, dict) and isinstance(entry.get("bundle_url"), str)):
            raise _malformed(url, name, "an entry has neither a 'bundle' object nor a bundle_url")
    return bundles


def _check_subject(bundle: dict[str, Any], sha256: str, url: str, name: str) -> None:
    """The statement must name ``sha256``: read before the signature, and checked either way."""
    envelope = bundle.get("dsseEnvelope")
    payload = envelope.get("payload") if isinstance(envelope, dict) else None
    if not isinstance(payload, str):
        raise _malformed(url, name, "no DSSE envelope payload")
    try:
        statement = json.loads(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError) as err:
        raise _malformed(url, name, "the payload is not a base64 JSON statement") from err
    subjects = statement.get("subject") if isinstance(statement, dict) else None
    if not isinstance(subjects, list):
        raise _malformed(url, name, "the statement has no subject list")
    digests = [
        s["digest"].get("sha256")
        for s in subjects
        if isinstance(s, dict) and isinstance(s.get("digest"), dict)
    ]
    if sha256 not in digests:
        shown = ", ".join(str(d) for d in digests) or "none"
        msg = (
            f"the attestation of {name} ({url}) is for sha256 {shown}, not the archive's "
            f"{sha256}; refusing the archive (check LLAMA_PROC_MIRROR)"
        )
        raise AttestationError(msg)
