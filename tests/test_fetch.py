"""Reference images by link, and the SSRF attempts they invite.

Two real HTTP servers run on loopback: a "CDN" on 127.0.0.2, which these tests let stand in for a
public address, and a "victim" on 127.0.0.1 that counts every request it gets: each attempt to reach
it (or a private, link-local or IPv6 loopback address) must be refused before any connection is made.
DNS is injected (a dict), so names "resolve" to those addresses without touching real DNS; no traffic
ever leaves the loopback interface (10.x and 169.254.169.254 are refused before connecting).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from adapters.console import ConsoleChat
from bot.bootstrap import Core
from bot.config import FetchConfig
from bot.domain import JobKind, JobStatus
from bot.errors import InvalidImage
from bot.fetch import ImageFetcher
from bot.netguard import is_public_address, system_resolver
from tests.conftest import alice, png_bytes

CAT = png_bytes(64, 64, (10, 200, 30))


class Handler(BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        url = urlparse(self.path)
        if url.path == "/cat.png":
            self._send(200, CAT, "image/png")
        elif url.path == "/text":
            self._send(200, b"hello, not a picture\n", "text/plain")
        elif url.path == "/big-declared":
            self._send(200, CAT + b"\0" * 5000, "image/png")
        elif url.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"400\r\n" + b"\0" * 1024 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/slow":
            time.sleep(1.5)
            self._send(200, CAT, "image/png")
        elif url.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(url.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif url.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"no", "text/plain")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve(host: str) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    server.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ThreadingHTTPServer, ThreadingHTTPServer]]:
    cdn, cdn_thread = serve("127.0.0.2")
    victim, victim_thread = serve("127.0.0.1")
    yield cdn, victim
    for server, thread in ((cdn, cdn_thread), (victim, victim_thread)):
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def cdn(servers) -> str:
    return f"http://cdn.test:{servers[0].server_port}"


@pytest.fixture
def victim(servers) -> ThreadingHTTPServer:
    servers[1].hits.clear()
    return servers[1]


DNS = {
    "cdn.test": ["127.0.0.2"],
    "loop.test": ["127.0.0.1"],
    "intranet.test": ["10.1.2.3"],
    "metadata.test": ["169.254.169.254"],
    "v6loop.test": ["::1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "mixed.test": ["127.0.0.2", "127.0.0.1"],  # one bad answer is enough to refuse
}


async def fake_dns(host: str, port: int) -> list[str]:
    return list(DNS.get(host, []))


def stand_in_for_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The real rule, except that the test CDN's 127.0.0.2 counts as public."""
    return address == ipaddress.ip_address("127.0.0.2") or is_public_address(address)


def fetcher(allowed: list[str] | None = None, **config: object) -> ImageFetcher:
    # Any host by default, so that the address rule alone is what refuses the SSRF attempts.
    settings = FetchConfig(allowed_hosts=allowed or ["*"], max_bytes=4096, timeout_s=1.0, max_redirects=2, **config)
    return ImageFetcher(settings, resolver=fake_dns, address_allowed=stand_in_for_public, schemes=("http", "https"))


async def test_an_allowed_image_is_fetched(cdn: str) -> None:
    assert await fetcher().fetch(f"{cdn}/cat.png") == CAT


def victim_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/secret",
        f"http://[::1]:{port}/secret",
        f"http://[::ffff:127.0.0.1]:{port}/secret",
        f"http://[64:ff9b::7f00:1]:{port}/secret",  # NAT64 of 127.0.0.1
        f"http://[2002:7f00:1::]:{port}/secret",  # 6to4 of 127.0.0.1
        "http://10.0.0.7/admin",
        "http://169.254.169.254/latest/meta-data/",
        f"http://loop.test:{port}/secret",
        "http://intranet.test/admin",
        "http://metadata.test/latest/meta-data/",
        f"http://v6loop.test:{port}/secret",
        f"http://mapped.test:{port}/secret",
        f"http://mixed.test:{port}/secret",
    ]


async def test_private_loopback_and_link_local_targets_are_refused(victim: ThreadingHTTPServer) -> None:
    for url in victim_urls(victim.server_port):
        with pytest.raises(InvalidImage, match="private or local network address"):
            await fetcher().fetch(url)
    assert victim.hits == []


async def test_a_redirect_to_them_is_refused_too(cdn: str, victim: ThreadingHTTPServer) -> None:
    for url in victim_urls(victim.server_port):
        with pytest.raises(InvalidImage, match="private or local network address"):
            await fetcher().fetch(f"{cdn}/redirect?to={url}")
    assert victim.hits == []


async def test_real_dns_for_localhost_is_refused(victim: ThreadingHTTPServer) -> None:
    real = ImageFetcher(FetchConfig(allowed_hosts=["*"]), resolver=system_resolver, schemes=("http",))
    with pytest.raises(InvalidImage, match="private or local network address"):
        await real.fetch(f"http://localhost:{victim.server_port}/secret")
    assert victim.hits == []


async def test_only_allowed_hosts_and_https_by_default(cdn: str) -> None:
    with pytest.raises(InvalidImage, match=r"evil\.example is not an allowed image host"):
        await fetcher(allowed=["cdn.test"]).fetch("http://evil.example/cat.png")
    with pytest.raises(InvalidImage, match=r"evil\.example is not an allowed image host"):
        await fetcher(allowed=["cdn.test"]).fetch(f"{cdn}/redirect?to=http://evil.example/cat.png")
    default = ImageFetcher(FetchConfig())
    with pytest.raises(InvalidImage, match=r"must start with https://"):
        await default.fetch("http://cdn.discordapp.com/attachments/1/2/cat.png")
    with pytest.raises(InvalidImage, match="not an allowed image host"):
        await default.fetch("https://example.com/cat.png")


async def test_size_time_redirect_and_content_limits(cdn: str) -> None:
    for path in ("/big-declared", "/big-chunked"):
        with pytest.raises(InvalidImage, match="larger than 4 KiB"):
            await fetcher().fetch(cdn + path)
    with pytest.raises(InvalidImage, match="took longer than 1 s"):
        await fetcher().fetch(f"{cdn}/slow")
    with pytest.raises(InvalidImage, match="redirected more than 2 times"):
        await fetcher().fetch(f"{cdn}/loop")
    with pytest.raises(InvalidImage, match="is not a PNG, JPEG or WebP image"):
        await fetcher().fetch(f"{cdn}/text")
    with pytest.raises(InvalidImage, match="answered HTTP 404"):
        await fetcher().fetch(f"{cdn}/missing.png")
    with pytest.raises(InvalidImage, match="could not be found"):
        await fetcher().fetch("http://nowhere.test/cat.png")


# -- through the job service and the console ---------------------------------------------------------


async def test_edit_takes_its_image_from_a_link(core: Core, cdn: str) -> None:
    core.service.fetcher = fetcher()
    result = await core.service.submit(alice(), core.parser.parse(f"/edit {{{cdn}/cat.png}} make it winter"))
    job = result.job
    assert job.params.kind is JobKind.EDIT and job.params.prompt == "make it winter"
    assert job.status is JobStatus.QUEUED and core.store.read_bytes(job.init_image_sha).startswith(b"\x89PNG")


async def test_a_refused_link_is_a_one_line_error_and_nothing_is_queued(
        core: Core, victim: ThreadingHTTPServer) -> None:
    core.service.fetcher = fetcher()
    out = io.StringIO()
    chat = ConsoleChat(core, out, requester=alice(), progress=False)
    await chat.handle(f"/edit {{http://loop.test:{victim.server_port}/secret}} make it winter")
    await asyncio.sleep(0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the image host loop.test points to a private")
    assert await core.service.list_jobs() == [] and victim.hits == []
