"""The address guard: the one rule for what Easel may connect to on a user's behalf, and the one way to
connect there. Reference-image links (bot/fetch.py) and completion webhooks (adapters/webhooks.py) use it.

    target = await pin(httpx.URL("https://hooks.example.com/easel"))   # resolve, check every address
    async with pinned_client(timeout=10) as client:
        response = await client.send(target.request(client, "POST", content=b"{}"))

A URL given by a user is the classic way into a server's private network (SSRF), so:
  1. its host is resolved here, once, and refused if ANY address fails `is_public_address`;
  2. the request then goes to *that checked address*, with the Host header and the TLS name (SNI and
     certificate check) still the URL's host, so a DNS answer that changes between the check and the
     connection (DNS rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
AddressRule = Callable[[IPAddress], bool]

NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: a /48 prefix, RFC 6052's /48 layout
DOCUMENTATION = tuple(ipaddress.ip_network(n) for n in (  # examples only; Python 3.11 calls 3fff::/20 global
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "3fff::/20"))


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses, as the operating system resolves them."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address reaches through a translation or tunnel, or () when none:
    IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::/96, 64:ff9b:1::/48), 6to4 (2002::/16), and Teredo
    (2001::/32: its server and its client)."""
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address in NAT64_WELL_KNOWN:
        return (ipaddress.IPv4Address(address.packed[12:]),)
    if address in NAT64_LOCAL_USE:  # bits 48-63 and 72-87; bits 64-71 are the zero "u" octet
        return (ipaddress.IPv4Address(address.packed[6:8] + address.packed[9:11]),)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo
    return ()


def is_public_address(address: IPAddress) -> bool:
    """True only for globally routable unicast addresses. Never loopback, private (10/8, 172.16/12,
    192.168/16), carrier NAT (100.64/10), link-local (169.254/16: cloud metadata; fe80::/10), unique
    local (fc00::/7), site-local (fec0::/10), multicast, reserved, unspecified or documentation.

    An IPv6 address that carries an IPv4 address (see `embedded_ipv4`) is judged as that IPv4 address:
    64:ff9b::a9fe:a9fe is 169.254.169.254 and refused, while 64:ff9b::808:808 is 8.8.8.8 and allowed,
    because an IPv6-only server behind NAT64 reaches every IPv4-only site that way.

        >>> is_public_address(ipaddress.ip_address("2002:7f00:1::"))   # 6to4 for 127.0.0.1
        False
    """
    if isinstance(address, ipaddress.IPv6Address):
        carried = embedded_ipv4(address)
        if carried:
            return all(is_public_address(ipv4) for ipv4 in carried)
        if address.is_site_local:
            return False
    if any(address in network for network in DOCUMENTATION):
        return False
    return address.is_global and not (address.is_private or address.is_loopback or address.is_link_local
                                      or address.is_multicast or address.is_reserved or address.is_unspecified)


def any_address(address: IPAddress) -> bool:
    """The rule when the operator allowed private targets (http.allow_private_webhooks)."""
    return True


class HostNotFound(Exception):
    """The host resolved to no address. Callers say so in their own words."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.host = host


class AddressRefused(Exception):
    """One of the host's addresses failed the rule. Callers say so in their own words."""

    def __init__(self, host: str, address: IPAddress) -> None:
        super().__init__(f"{host} -> {address}")
        self.host = host
        self.address = address


@dataclass(frozen=True)
class PinnedTarget:
    """A URL whose every address was checked, and the address its request goes to."""

    url: httpx.URL  # as given
    host: str  # the URL's host, ASCII (IDNA) form: the Host header and the TLS name
    address: IPAddress  # checked; the connection goes here and nowhere else

    def request(self, client: httpx.AsyncClient, method: str, *, headers: dict[str, str] | None = None,
                **kwargs: Any) -> httpx.Request:
        """`method` on the URL, built to connect to the checked address: the Host header is the URL's
        host (and port, when it names one) and TLS sends and verifies the URL's host name."""
        return client.build_request(method, self.url.copy_with(host=str(self.address)),
                                    headers={**(headers or {}), "Host": self.url.netloc.decode("ascii")},
                                    extensions={"sni_hostname": self.host}, **kwargs)


async def pin(url: httpx.URL, *, resolver: Resolver = system_resolver,
              address_allowed: AddressRule = is_public_address) -> PinnedTarget:
    """Resolve `url`'s host once (an address literal is taken as it is) and check every address; raise
    HostNotFound or AddressRefused, else return the URL pinned to the first address."""
    host = url.raw_host.decode("ascii")
    if not host:
        raise HostNotFound(host)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(a.partition("%")[0]) for a in await resolver(host, port)]
        except (OSError, ValueError):  # a resolver error, or an answer that is no address
            addresses = []
    if not addresses:
        raise HostNotFound(host)
    for address in addresses:
        if not address_allowed(address):
            raise AddressRefused(host, address)
    return PinnedTarget(url, host, addresses[0])


def pinned_client(timeout: float) -> httpx.AsyncClient:
    """The client for `PinnedTarget.request`s. It takes no proxy from the environment (a proxy would
    resolve names itself), follows no redirect on its own (each hop must be pinned again), and keeps no
    idle connection: one was verified for one host's TLS name and must not carry another host's
    request that happens to go to the same address."""
    return httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=timeout,
                             limits=httpx.Limits(max_keepalive_connections=0))
