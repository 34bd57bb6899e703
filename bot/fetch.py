"""Reference images by link: `{https://cdn.discordapp.com/...}` in a prompt, fetched safely.

    fetcher = ImageFetcher(settings.fetch)
    png_or_jpeg = await fetcher.fetch("https://cdn.discordapp.com/attachments/1/2/cat.png")

A link is the classic way into a server's private network (SSRF), so every hop, redirects included:
  1. must use an allowed scheme (https) and name an allowed host (platform CDNs by default);
  2. has its host resolved here, and is refused if ANY address is private, loopback, link-local,
     multicast, reserved or otherwise not public (IPv4-mapped IPv6 included);
  3. is then connected to *that checked address* (the Host header and TLS name stay the link's
     host), so a DNS answer that changes between the check and the connection cannot slip through.
The whole fetch has a time limit, the body a size limit (read in chunks, not trusted from
Content-Length), and the bytes must be a PNG, JPEG or WebP image. Errors name the host, never the
full link (signed CDN links carry tokens).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

import httpx
from PIL import Image, UnidentifiedImageError

from bot.config import FetchConfig
from bot.errors import InvalidImage

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
REDIRECTS = (301, 302, 303, 307, 308)


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses, as the operating system resolves them."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_public_address(address: IPAddress) -> bool:
    """True only for globally routable unicast addresses: never loopback, private (10/8, 172.16/12,
    192.168/16, fc00::/7), link-local (169.254/16: cloud metadata; fe80::/10), carrier NAT, multicast,
    reserved or unspecified; IPv4 inside IPv6 (::ffff:127.0.0.1) is judged as the IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return is_public_address(embedded)
    return address.is_global and not (address.is_private or address.is_loopback or address.is_link_local
                                      or address.is_multicast or address.is_reserved or address.is_unspecified)


def host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """`cdn.discordapp.com` matches itself; `*.example.com` matches its subdomains; `*` matches any."""
    host = host.lower().rstrip(".")
    for pattern in allowed_hosts:
        pattern = pattern.lower().rstrip(".")
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class ImageFetcher:
    """Fetches reference images under the rules above. `resolver`, `address_allowed` and `schemes`
    are injectable so tests can stand a loopback server in for a CDN."""

    def __init__(self, config: FetchConfig, *, resolver: Resolver = system_resolver,
                 address_allowed: Callable[[IPAddress], bool] = is_public_address,
                 schemes: Sequence[str] = ("https",)) -> None:
        self.config = config
        self.resolver = resolver
        self.address_allowed = address_allowed
        self.schemes = tuple(schemes)

    async def fetch(self, url: str) -> bytes:
        """The image bytes behind `url`, or InvalidImage saying which rule refused it."""
        if not self.config.enabled:
            raise InvalidImage("image links are turned off here (fetch.enabled); attach the picture instead")
        host = _host_of(url)
        try:
            async with asyncio.timeout(self.config.timeout_s), httpx.AsyncClient(
                    trust_env=False, follow_redirects=False, timeout=self.config.timeout_s) as client:
                return await self._follow(client, url)
        except TimeoutError:
            raise InvalidImage(f"fetching the image from {host} took longer than {self.config.timeout_s:g} s; "
                               "attach the picture instead") from None
        except httpx.HTTPError as e:
            raise InvalidImage(f"could not fetch the image from {host} ({type(e).__name__}); "
                               "attach the picture instead") from None

    async def _follow(self, client: httpx.AsyncClient, url: str) -> bytes:
        for _hop in range(self.config.max_redirects + 1):
            target = await self._checked(url)
            request = client.build_request("GET", target.pinned, headers={"Host": target.host_header},
                                           extensions={"sni_hostname": target.ascii_host})
            response = await client.send(request, stream=True)
            try:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    url = str(target.url.join(response.headers["location"]))
                    continue
                if response.status_code != 200:
                    raise InvalidImage(f"{target.host} answered HTTP {response.status_code} for the image link")
                return _as_image(await self._body(response, target.host), target.host)
            finally:
                await response.aclose()
        raise InvalidImage(f"the image link redirected more than {self.config.max_redirects} times")

    async def _checked(self, url: str) -> _Target:
        """Steps 1 and 2: scheme, host and every resolved address."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise InvalidImage("the image link is not a valid URL") from None
        if parsed.scheme not in self.schemes:
            raise InvalidImage(f"image links must start with {' or '.join(s + '://' for s in self.schemes)}")
        host = parsed.raw_host.decode("ascii")
        if not host or not host_allowed(host, self.config.allowed_hosts):
            raise InvalidImage(f"{host or 'that link'} is not an allowed image host; links may point to "
                               f"{', '.join(self.config.allowed_hosts)}. Attach the picture instead")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = [ipaddress.ip_address(a.split("%")[0]) for a in await self.resolver(host, port)]
            except (OSError, ValueError):
                addresses = []
            if not addresses:
                raise InvalidImage(f"the image host {host} could not be found")
        for address in addresses:
            if not self.address_allowed(address):
                raise InvalidImage(f"the image host {host} points to a private or local network address, "
                                   "which Easel never fetches")
        return _Target(parsed, host, addresses[0])

    async def _body(self, response: httpx.Response, host: str) -> bytes:
        limit = self.config.max_bytes
        too_big = InvalidImage(f"the image at {host} is larger than {limit // 1024} KiB, the most Easel fetches")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in response.aiter_bytes():  # decoded: the limit holds for compressed bodies too
            body += chunk
            if len(body) > limit:
                raise too_big
        return bytes(body)


class _Target:
    """One checked hop: the link as given, and the same request pinned to the checked address."""

    def __init__(self, url: httpx.URL, host: str, address: IPAddress) -> None:
        self.url = url
        self.host = host
        self.ascii_host = url.raw_host.decode("ascii")
        self.host_header = url.netloc.decode("ascii")  # host, or host:port when the link names a port
        self.pinned = url.copy_with(host=str(address))


def _host_of(url: str) -> str:
    try:
        return httpx.URL(url).raw_host.decode("ascii") or "the link"
    except httpx.InvalidURL:
        return "the link"


def _as_image(data: bytes, host: str) -> bytes:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
    except (UnidentifiedImageError, OSError):
        image_format = None
    if image_format not in IMAGE_FORMATS:
        raise InvalidImage(f"the file at {host} is not a PNG, JPEG or WebP image")
    return data
