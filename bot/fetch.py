"""Reference images by link: `{https://cdn.discordapp.com/...}` in a prompt, fetched safely.

    fetcher = ImageFetcher(settings.fetch)
    png_or_jpeg = await fetcher.fetch("https://cdn.discordapp.com/attachments/1/2/cat.png")

A link is the classic way into a server's private network (SSRF), so every hop, redirects included:
  1. must use an allowed scheme (https) and name an allowed host (platform CDNs by default);
  2. has its host resolved here, and is refused if ANY address is not public (bot/netguard.py, the
     address guard webhooks use too: loopback, private, link-local, multicast, reserved, and their
     IPv6 spellings such as IPv4-mapped, NAT64, 6to4 and Teredo);
  3. is then connected to *that checked address* (the Host header and TLS name stay the link's
     host), so a DNS answer that changes between the check and the connection cannot slip through.
The whole fetch has a time limit, the body a size limit (read in chunks, not trusted from
Content-Length), and the bytes must be a PNG, JPEG or WebP image. Errors name the host, never the
full link (signed CDN links carry tokens).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence

import httpx
from PIL import Image, UnidentifiedImageError

from bot.config import FetchConfig
from bot.errors import InvalidImage
from bot.netguard import (
    AddressRefused,
    AddressRule,
    HostNotFound,
    PinnedTarget,
    Resolver,
    is_public_address,
    pin,
    pinned_client,
    system_resolver,
)

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
REDIRECTS = (301, 302, 303, 307, 308)


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
                 address_allowed: AddressRule = is_public_address,
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
            async with asyncio.timeout(self.config.timeout_s), pinned_client(self.config.timeout_s) as client:
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
            response = await client.send(target.request(client, "GET"), stream=True)
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

    async def _checked(self, url: str) -> PinnedTarget:
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
        try:
            return await pin(parsed, resolver=self.resolver, address_allowed=self.address_allowed)
        except HostNotFound:
            raise InvalidImage(f"the image host {host} could not be found") from None
        except AddressRefused:
            raise InvalidImage(f"the image host {host} points to a private or local network address, "
                               "which Easel never fetches") from None

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
