"""URL helpers: redaction for logs and results, and the SSRF guard for outbound requests.

A presigned S3 URL is a write credential carried in its query string, so anything that
leaves the process (result, log line, exception message) goes through ``redact_url``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from requests.adapters import HTTPAdapter

from handlers.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = frozenset({"http", "https"})
# RFC 6052 well-known NAT64 prefix: DNS64 on IPv6-only hosts maps public IPv4 into it.
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
# A '?' right after a URL/path character and followed by key=value: a query string in free text
# (urllib3's debug line logs "PUT /bucket/key?X-Amz-...=..." without scheme or host).
_QUERY_IN_TEXT = re.compile(r"(?<=[\w/.~%-])\?[^\s\"'<>]*=[^\s\"'<>]*")


def redact_url(url: str) -> str:
    """``scheme://host[:port]/path``: query string, fragment and userinfo removed."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Replace every query string found in free text (log messages, tracebacks) by ``?<redacted>``."""
    return _QUERY_IN_TEXT.sub("?<redacted>", text)


class RedactQueryFilter(logging.Filter):
    """Handler filter that strips query strings from messages and tracebacks.

    Install it on the log *handlers* (filters on a logger do not see records propagated
    from child loggers): third-party loggers such as urllib3 log full request paths,
    presigned signatures included, at DEBUG.
    """

    redact = staticmethod(redact_text)  # subclasses widen what is scrubbed (worker.logs)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


class HostResolutionError(OSError):
    """DNS gave no answer for a URL's host: transient, not the job's fault."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped or NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public_address(embedded)
        # 6to4 and Teredo tunnel to an IPv4 address that must be public too.
        tunnelled = [ip.sixtofour] if ip.sixtofour is not None else []
        if ip.teredo is not None:
            tunnelled.extend(ip.teredo)
        if not all(is_public_address(v4) for v4 in tunnelled):
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (a literal IP resolves to itself)."""
    literal = _literal_address(host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise HostResolutionError(f"cannot resolve host {host!r}") from exc
    addresses = [_literal_address(str(info[4][0])) for info in infos]
    resolved = [address for address in addresses if address is not None]
    if not resolved:
        raise HostResolutionError(f"host {host!r} resolved to no IP address")
    return resolved


@dataclass(frozen=True, kw_only=True)
class UrlGuard:
    """Refuses URLs that are not http(s) or whose host resolves to a non-public address.

    ``check`` gives early, field-named errors; ``pinned_address`` is what the HTTP client
    connects to (``PinnedAddressAdapter``): the name is resolved once, that answer is checked
    and used, so a DNS server that answers differently the second time (rebinding with TTL 0)
    cannot swap a private address in between.
    """

    allow_private: bool = False
    # Explicit exceptions, e.g. an S3-compatible endpoint on the LAN; checked before the policy.
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def build(cls, *, allow_private: bool = False, allowed_networks: Iterable[str] = ()) -> UrlGuard:
        networks = tuple(ipaddress.ip_network(network, strict=False) for network in allowed_networks)
        return cls(allow_private=allow_private, allowed_networks=networks)

    def check(self, url: str, *, field: str) -> None:
        """Raise ``InvalidInput`` naming ``field`` for a refused URL; ``HostResolutionError`` if DNS fails."""
        shown = redact_url(url)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise InvalidInput(f"{field}: {shown!r} is not a valid URL") from None
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise InvalidInput(
                f"{field}: URL scheme {scheme or '(none)'!r} is not allowed; use http or https"
            )
        host = parts.hostname
        if not host:
            raise InvalidInput(f"{field}: URL {shown!r} has no host")
        if self.allow_private:
            return
        if port is None:
            port = 443 if scheme == "https" else 80
        for address in resolve_host(host, port):
            if not self._allowed(address):
                raise InvalidInput(
                    f"{field}: URL {shown!r} resolves to non-public address {address} "
                    "(loopback/private/link-local/reserved addresses are refused)"
                )

    def pinned_address(self, host: str, port: int) -> IPAddress | None:
        """The checked address to connect to for ``host``; None when private URLs are allowed
        (nothing to protect: the client resolves as usual)."""
        if self.allow_private:
            return None
        addresses = resolve_host(host, port)
        for address in addresses:
            if not self._allowed(address):
                raise InvalidInput(
                    f"URL host {host!r} resolves to non-public address {address} at connect time"
                )
        return addresses[0]

    def _allowed(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address.version == net.version and address in net for net in self.allowed_networks):
            return True
        return is_public_address(address)


class PinnedAddressAdapter(HTTPAdapter):
    """requests' adapter connecting to the address the guard checked, not to a second lookup.

    The TCP connection goes to that IP while the Host header, TLS SNI and certificate check keep
    the URL's host name, so HTTPS and virtual hosts work unchanged. A hand-written subclass: no
    well-kept library pins the checked address for requests (requests-toolbelt's host-header
    adapter needs the caller to rewrite each URL, which breaks redirects and presigned URLs).
    Behind a proxy the proxy resolves the name, and nothing is pinned.
    """

    def __init__(self, guard: UrlGuard) -> None:
        super().__init__()
        self._guard = guard

    def build_connection_pool_key_attributes(
        self, request: Any, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        host, port, scheme = host_params["host"], host_params["port"], host_params["scheme"]
        default_port = 443 if scheme == "https" else 80
        address = self._guard.pinned_address(host, port or default_port)
        if address is not None and _literal_address(host) is None:
            host_params["host"] = str(address)
            # What http.client would have sent for the name (a presigned URL signs this header).
            request.headers["Host"] = host if port in (None, default_port) else f"{host}:{port}"
            if scheme == "https":
                pool_kwargs.update(server_hostname=host, assert_hostname=host)
        return host_params, pool_kwargs
