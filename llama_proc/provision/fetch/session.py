"""The HTTP session downloads and listings share.

llama-proc's User-Agent, the GitHub token for the API host only, and no redirect down to plain
http on another machine.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, Final

from llama_proc._version import __version__
from llama_proc.errors import DownloadError
from llama_proc.provision.fetch._headers_deadline import watched_adapter

if TYPE_CHECKING:
    import requests

    from llama_proc.provision.views import NetView


USER_AGENT: Final = f"llama-proc/{__version__}"


GITHUB_API_HOST: Final = "api.github.com"


class _GitHubTokenAuth:
    """Adds the token only to requests for the GitHub API, never to downloads or mirrors."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        parts = urllib.parse.urlsplit(request.url or "")
        if parts.scheme == "https" and parts.hostname == GITHUB_API_HOST:
            request.headers["Authorization"] = f"Bearer {self._token}"
        return request


def make_session(settings: NetView) -> requests.Session:
    """A ``requests`` session with llama-proc's User-Agent (and GitHub token, API host only).

    Args:
        settings: provides ``github_token``.
    """
    import requests  # noqa: PLC0415 - heavy; a cache hit never needs it

    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    for prefix in ("https://", "http://"):
        session.mount(prefix, watched_adapter())
    session.hooks["response"].append(_refuse_downgrade)
    if settings.github_token:
        session.auth = _GitHubTokenAuth(settings.github_token)
    return session


def is_local_url(url: str) -> bool:
    """Whether ``url`` stays on this machine: ``file://`` or an http(s) loopback host."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return True
    if scheme not in ("http", "https"):
        return False
    try:
        host = parts.hostname
    except ValueError:
        return False
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_remote(url: str) -> bool:
    """Plain http to another machine: anyone on the path can change what it serves."""
    return urllib.parse.urlsplit(url).scheme.lower() == "http" and not is_local_url(url)


def _refuse_downgrade(response: requests.Response, *_args: Any, **_kwargs: Any) -> None:
    """Refuse a redirect to plain http on another machine, before it is followed.

    Like a plain-http mirror: anyone on that path could swap the bytes, and for a listing the
    digests that vouch for them. Only a redirect from such a host itself (a plain-http mirror,
    allowed only with every asset pinned) may stay on plain http.
    """
    if not response.is_redirect:
        return
    target = urllib.parse.urljoin(response.url, response.headers.get("Location", ""))
    if plain_remote(target) and not plain_remote(response.url):
        msg = (
            f"{_safe_url(response.url)} redirects to {_safe_url(target)}, plain http to another "
            "machine: anyone on the path could swap what it serves; refused (use an https:// "
            "mirror, or one whose redirects stay on https)"
        )
        response.close()  # raising here skips requests' own close of a followed redirect
        raise DownloadError(msg)


def _safe_url(url: str) -> str:
    """The URL without credentials or query string, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
