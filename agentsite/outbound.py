"""Requests to URLs that users or models choose (``http_get``, webhooks): where they may go.

Allowlist entries name hosts and ports (``pin`` then checks addresses): the name is resolved
once, every address must be public or in ``AGENTSITE_OUTBOUND_ALLOWED_NETWORKS``, and the request
goes to the checked address, with the name as Host header and TLS server name (no DNS rebinding).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"http": 80, "https": 443}
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# A host name or address in an allowlist entry: no URL punctuation, no wildcard but the prefix.
_NAME = re.compile(r"[^\s/\\@?#%*:\[\]]+")


class DestinationRefused(Exception):
    """The URL's host resolves to an address that may not be contacted (not worth retrying)."""


class DestinationUnresolved(Exception):
    """The URL's host could not be resolved; ``temporary`` when asking again may work."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


# --- allowlists -------------------------------------------------------------------------------


def _canonical(host: str) -> str:
    """A host name in lower case; an IPv6 address in its compressed form."""
    host = host.lower()
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            pass
    return host


@dataclass(frozen=True)
class Destination:
    """Where an http(s) URL points: scheme, host (lower case, IPv6 without brackets), port."""

    scheme: str
    host: str
    port: int

    @property
    def default_port(self) -> int:
        return DEFAULT_PORTS[self.scheme]


def destination(url: str) -> Destination:
    """The scheme, host and port (explicit or the scheme's default) of an http(s) URL.

    Raises ValueError with a message fit for the user when ``url`` is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError("not an http or https URL")
    host = _canonical((parts.hostname or "").rstrip("."))
    if not host:
        raise ValueError("the URL has no host")
    if port == 0:
        raise ValueError("port 0 cannot be connected to")
    return Destination(scheme, host, port or DEFAULT_PORTS[scheme])


@dataclass(frozen=True)
class HostPattern:
    """One allowlist entry: a host, or a domain's subdomains, on one port or any.

    ``port`` None means the default port of the URL's scheme (80 for http, 443 for https)."""

    host: str
    subdomains: bool = False  # subdomains of ``host`` match
    apex: bool = True  # ``host`` itself matches
    port: int | None = None
    any_port: bool = False

    def matches_host(self, host: str) -> bool:
        host = _canonical(host.rstrip("."))
        if host == self.host:
            return self.apex
        return self.subdomains and host.endswith("." + self.host)

    def matches(self, where: Destination) -> bool:
        if not self.matches_host(where.host):
            return False
        return self.any_port or where.port == (self.port or where.default_port)


def parse_host_pattern(entry: str, *, wildcard: str) -> HostPattern:
    """An allowlist entry: ``host``, ``host:port``, ``host:*``, ``[v6 address]:port``, each
    optionally with the ``wildcard`` prefix: ``"*."`` (a grant's ``hosts``: subdomains only) or
    ``"."`` (``AGENTSITE_WEBHOOK_ALLOWED_HOSTS``: the domain and its subdomains).

    Raises ValueError with a message fit for the operator."""
    text = entry.strip().lower()
    if "://" in text or "/" in text:
        raise ValueError("a host name with an optional :port, not a URL")
    subdomains = text.startswith(wildcard)
    if subdomains:
        text = text[len(wildcard) :]
    port_text: str | None = None
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("an IPv6 address is written [address] or [address]:port")
        try:
            host = str(ipaddress.IPv6Address(address))
        except ValueError:
            raise ValueError(f"{address!r} is not an IPv6 address") from None
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError("write an IPv6 address in brackets, e.g. [2001:db8::1]:8080")
    else:
        host, colon, after = text.partition(":")
        port_text = after if colon else None
        host = host.rstrip(".")
        if not _NAME.fullmatch(host) or "" in host.split("."):
            raise ValueError(
                f"not a host name (use a name such as docs.example.com, {wildcard}example.com "
                "for subdomains, or an IP address)"
            )
    if subdomains and (host.replace(".", "").isdigit() or ":" in host):
        raise ValueError("a wildcard applies to domain names, not to IP addresses")
    if port_text is None:
        return HostPattern(host, subdomains=subdomains, apex=not subdomains or wildcard == ".")
    if port_text == "*":
        port, any_port = None, True
    elif re.fullmatch(r"[0-9]{1,5}", port_text) and 1 <= int(port_text) <= 65535:
        port, any_port = int(port_text), False
    else:
        raise ValueError(f"the port must be a number from 1 to 65535, or *; not {port_text!r}")
    apex = not subdomains or wildcard == "."
    return HostPattern(host, subdomains=subdomains, apex=apex, port=port, any_port=any_port)


def host_patterns(entries: Iterable[str], *, wildcard: str) -> list[HostPattern]:
    """The valid entries of an allowlist (an invalid one matches nothing; the admin and the
    start-up checks report them)."""
    patterns = []
    for entry in entries:
        try:
            patterns.append(parse_host_pattern(str(entry), wildcard=wildcard))
        except ValueError:
            continue
    return patterns


def refusal_by_allowlist(where: Destination, patterns: Iterable[HostPattern]) -> str | None:
    """None when an entry allows the destination, else ``"host"`` (no entry names the host)
    or ``"port"`` (some do, on other ports)."""
    patterns = list(patterns)
    if any(p.matches(where) for p in patterns):
        return None
    return "port" if any(p.matches_host(where.host) for p in patterns) else "host"


# --- addresses --------------------------------------------------------------------------------


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """A network in CIDR form (``10.0.0.0/8``, ``fd00::/8``; an address alone is one host)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a network such as 10.20.0.0/16, fd00::/8 or 192.168.1.5"
        ) from None


def allowed_networks() -> list[Network]:
    """``AGENTSITE_OUTBOUND_ALLOWED_NETWORKS`` (checked when the settings load)."""
    return [parse_network(n) for n in settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS]


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches (IPv4-mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_kind(ip: IPAddress) -> str | None:
    """What kind of non-public address ``ip`` is ("a loopback address", ...), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:  # judged by the IPv4 address it reaches
            return address_kind(embedded)
        if ip.teredo is not None and (kind := address_kind(ip.teredo[1])):
            return kind
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    )
    for attribute, kind in checks:
        if getattr(ip, attribute):
            return kind
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if any(ip in network for network in _NOT_PUBLIC_V4 if ip.version == 4):
        return "a special-purpose address"
    return None if ip.is_global else "a non-public address"


# IPv4 blocks ipaddress counts as global that no public service lives in: the IETF protocol
# assignments (192.0.0.0/24, e.g. 192.0.0.8) and the deprecated 6to4 relay anycast.
_NOT_PUBLIC_V4 = tuple(ipaddress.ip_network(n) for n in ("192.0.0.0/24", "192.88.99.0/24"))


def _allowed(ip: IPAddress, networks: list[Network]) -> bool:
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c.version == n.version and c in n for c in candidates for n in networks)


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (getaddrinfo), in the order to try them."""
    # AI_ADDRCONFIG: no IPv6 addresses first on a host without IPv6 (only the first is tried).
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)
    return [str(info[4][0]) for info in infos]


# The resolver every check uses. Tests replace it (the ``fake_dns`` fixture) to give names
# local addresses without asking a DNS server.
resolver: Callable[[str, int], list[str]] = system_resolver

_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]  # an address in the URL: nothing to resolve
    except ValueError:
        pass
    try:
        found = resolver(host, port)
    except socket.gaierror as exc:
        temporary = exc.errno not in _NO_SUCH_NAME
        detail = exc.strerror or str(exc)
        raise DestinationUnresolved(
            f"could not resolve {host!r} ({detail})"
            if temporary
            else f"{host!r} does not resolve to an address ({detail})",
            temporary=temporary,
        ) from None
    except (UnicodeError, ValueError):  # e.g. a label longer than 63 characters
        raise DestinationUnresolved(f"{host!r} is not a valid host name", temporary=False) from None
    addresses = []
    for text in found:
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            raise DestinationRefused(f"{host!r} resolves to {text!r}, not an IP address") from None
    if not addresses:
        raise DestinationUnresolved(f"{host!r} does not resolve to an address", temporary=False)
    return addresses


@dataclass(frozen=True)
class Target:
    """Where to send a request: ``url`` has the checked address in place of the name; send
    ``headers`` and ``extensions`` with it so the server and TLS still see the name."""

    url: str
    address: str
    host_header: str
    server_name: str | None  # None when the URL names an address (no SNI then)

    @property
    def headers(self) -> dict[str, str]:
        return {"Host": self.host_header}

    @property
    def extensions(self) -> dict[str, Any]:
        return {"sni_hostname": self.server_name} if self.server_name else {}


def pin(url: str) -> Target:
    """Resolve the host of an http(s) ``url`` once and check every address it resolves to.

    Raises DestinationRefused when one is loopback, private, link-local, multicast or otherwise
    not public (and not in ``AGENTSITE_OUTBOUND_ALLOWED_NETWORKS``), DestinationUnresolved when
    the name does not resolve, ValueError when ``url`` is not an http(s) URL."""
    where = destination(url)
    try:
        parsed = httpx.URL(url)
        name = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    addresses = _resolve(name, where.port)
    networks = allowed_networks()
    for ip in addresses:
        kind = None if _allowed(ip, networks) else address_kind(ip)
        if kind:
            if str(ip) == where.host:
                raise DestinationRefused(f"{ip} is {kind}, which may not be contacted")
            raise DestinationRefused(
                f"{where.host!r} resolves to {ip}, {kind}, which may not be contacted"
            )
    chosen = addresses[0]
    try:
        literal = bool(ipaddress.ip_address(name))
    except ValueError:
        literal = False
    try:
        pinned = str(parsed.copy_with(host=str(chosen)))
    except httpx.InvalidURL:  # e.g. an IPv6 address with a zone, of an allowed network
        raise DestinationRefused(f"{where.host!r} resolves to {chosen}, which cannot be used")
    return Target(
        url=pinned,
        address=str(chosen),
        host_header=parsed.netloc.decode("ascii"),
        server_name=None if literal else name,
    )


@functools.lru_cache(maxsize=4)
def _ssl_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    # Loading the CA bundle takes tens of milliseconds of CPU: once per process, not per call.
    return httpx.create_ssl_context(trust_env=True)


def http_client(**options: Any) -> httpx.Client:
    """An httpx client for pinned requests: no proxy, .netrc or other environment settings (a
    proxy would connect to whatever it resolves, and its TLS tunnel would not verify the name),
    but the CA bundle of SSL_CERT_FILE / SSL_CERT_DIR when set."""
    verify = _ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    return httpx.Client(trust_env=False, verify=verify, **options)
