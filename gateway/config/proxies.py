"""Which egress proxy, as curl and requests read it: ``upstream.proxy_url``
when set (``"direct"``: none), else ``https_proxy`` / ``HTTPS_PROXY`` for an
https upstream, ``http_proxy`` / ``HTTP_PROXY`` for http, then ``all_proxy`` /
``ALL_PROXY`` (lower case first), unless ``no_proxy`` / ``NO_PROXY`` names the
host (``*``, a name and its subdomains, an address, or an address range like
``10.0.0.0/8``). Credentials in a proxy URL are never displayed.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

DIRECT = "direct"


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)  # Proxy-Authorization

    @property
    def display(self) -> str:
        """For logs: where it is, never who logs in."""
        return f"http://{self.host}:{self.port}"


def parse_proxy(url: str) -> Proxy:
    """An ``http://[user:pass@]host[:port]`` proxy URL; ``ValueError`` says what is wrong."""
    if "://" not in url:
        url = "http://" + url  # curl's default scheme for a proxy
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// proxies are supported, not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError("the proxy URL names no host")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("the proxy URL's port is not a number") from None
    authorization = None
    if parts.username is not None:
        user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(user_pass.encode()).decode("ascii")
    return Proxy(parts.hostname, port, authorization)


def proxy_display(proxy_url: str) -> str:
    """A proxy setting for a log line: where, never who."""
    if not proxy_url or proxy_url == DIRECT:
        return DIRECT
    try:
        return parse_proxy(proxy_url).display
    except ValueError:
        return "invalid"


def proxy_from_environment(upstream_url: str, environ: Mapping[str, str]) -> str:
    """The proxy URL the environment gives for ``upstream_url``; "" for none."""

    def variable(name: str) -> str:
        return environ.get(name.lower()) or environ.get(name.upper()) or ""

    parts = urlsplit(upstream_url)
    scheme_proxy = "https_proxy" if parts.scheme == "https" else "http_proxy"
    proxy = variable(scheme_proxy) or variable("all_proxy")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not proxy or _bypassed(parts.hostname or "", port, variable("no_proxy")):
        return ""
    return proxy


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``no_proxy`` names the host: ``*``; a name, which covers its
    subdomains (a leading dot changes nothing); ``name:port``; an address; or
    an address range (``10.0.0.0/8``)."""
    host = host.lower().strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        if not entry:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
                continue
            except ValueError:
                pass
        name, colon, entry_port = entry.rpartition(":") if entry.count(":") == 1 else ("", "", "")
        if colon:
            if entry_port != str(port):
                continue
            entry = name
        entry = entry.lstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False
