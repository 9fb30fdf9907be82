"""The address of the client that sent a request, for limits counted per client.

The peer (``REMOTE_ADDR``), unless the peer is one of ``AGENTSITE_TRUSTED_PROXIES``: then the
right-most address of ``X-Forwarded-For`` that is not itself a trusted proxy. Addresses to the
left of it were written by whoever the first trusted proxy heard from, so anyone can put
anything there; the right-most untrusted one is the address a trusted proxy saw connect.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import Any

from django.conf import settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

UNKNOWN = "unknown"  # no peer address (a Unix socket): every such client shares one bucket


@functools.lru_cache(maxsize=4)
def _networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def parse_address(value: str) -> Address | None:
    """An IP address from a peer or a forwarded entry (``1.2.3.4``, ``1.2.3.4:5678``,
    ``[::1]:80``, an IPv4-mapped IPv6 address); None if it is not one."""
    value = value.strip()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)


def client_address(request: Any) -> str:
    """The client's address for ``request`` (a Django or DRF request, or its ``META``)."""
    meta: Mapping[str, Any] = request if isinstance(request, Mapping) else request.META
    peer = parse_address(str(meta.get("REMOTE_ADDR") or ""))
    if peer is None:
        return UNKNOWN
    networks = _networks(tuple(settings.AGENTSITE_TRUSTED_PROXIES))
    if not networks or not _trusted(peer, networks):
        return str(peer)
    # Several X-Forwarded-For headers arrive joined by commas, in order.
    entries = [e.strip() for e in meta.get("HTTP_X_FORWARDED_FOR", "").split(",") if e.strip()]
    hops: list[Address] = []
    for entry in reversed(entries):
        address = parse_address(entry)
        if address is None:
            # Not an address ("unknown", garbage) where the right-most untrusted hop should
            # be: the walk stops, lest the client's own entries to its left be believed.
            return f"{UNKNOWN}:{entry[:64]}"
        if not _trusted(address, networks):
            return str(address)
        hops.append(address)
    # Every hop is a trusted proxy (or none was given): the farthest one is the client.
    return str(hops[-1]) if hops else str(peer)
