"""The address guard (bot/netguard.py) and completion webhooks' use of it.

The guard is checked over the addresses an SSRF attempt would use, IPv6 spellings of IPv4 included.
Webhooks are checked at submission through the real HTTP API, and against DNS rebinding with an
injected resolver: a receiver on 127.0.0.2 (let stand in for a public address, as in test_fetch.py)
and a "victim" on 127.0.0.1 share one port, so the webhook URL http://localhost:<port>/hook reaches
either, depending only on the address the POST connects to. The system's own DNS says localhost is
127.0.0.1, so any connection that looked the name up again would land on the victim.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from adapters.webhooks import WebhookSender, check_webhook_target
from bot.bootstrap import Core
from bot.delivery import Delivery
from bot.domain import Requester
from bot.errors import InvalidCommand
from bot.events import EventKind
from bot.netguard import is_public_address
from tests.http_fixtures import server, settings  # noqa: F401
from tests.test_fetch import stand_in_for_public

REFUSED = [
    # IPv4: loopback, private, link-local (cloud metadata), carrier NAT, this network, multicast,
    # reserved, broadcast, documentation
    "127.0.0.1", "10.0.0.7", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.51.100.7", "203.0.113.9",
    # IPv6: loopback, unspecified, link-local, ULA, site-local, multicast, documentation, discard
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "fec0::1", "feff::1", "ff02::1", "ff0e::1",
    "2001:db8::1", "3fff::1", "100::1",
    # IPv4 inside IPv6, each naming a private IPv4 address
    "::ffff:127.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "::7f00:1",  # IPv4-compatible (deprecated)
    "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b::a00:7",  # NAT64, well-known prefix
    "64:ff9b:1:a9fe:a9:fe00::", "64:ff9b:1:7f00:0:100::",  # NAT64, local-use /48 (169.254.169.254, 127.0.0.1)
    "2002:7f00:1::", "2002:a9fe:a9fe::1", "2002:c0a8:101::",  # 6to4 of 127.0.0.1, 169.254.169.254, 192.168.1.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
]

ALLOWED = [
    "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2001:4860:4860::8888",
    # Decided: an IPv6 spelling of a public IPv4 address is as public as that address; an IPv6-only
    # server behind NAT64 reaches every IPv4-only webhook receiver this way.
    "64:ff9b::808:808", "2002:808:808::1",
]


@pytest.mark.parametrize("address", REFUSED)
def test_the_guard_refuses_non_public_addresses_in_every_spelling(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_the_guard_allows_public_addresses(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


async def test_webhooks_to_ipv6_spellings_of_private_addresses_are_refused_at_submission(server) -> None:  # noqa: F811
    server.core.settings.http.allow_private_webhooks = False
    token = await server.new_key()
    async with server.client(token) as client:
        for url in ("http://[64:ff9b::a9fe:a9fe]/hook", "http://[2002:7f00:1::]/",
                    "http://[::ffff:169.254.169.254]/hook", "http://[fd00::1]/hook"):
            response = await client.post("/v1/jobs", json={"command": "/imagine a cat", "webhook": {
                "url": url, "secret": "0123456789abcdef"}})
            assert response.status_code == 400, (url, response.text)
            message = response.json()["message"]
            assert "non-public address" in message and "http.allow_private_webhooks" in message, message
        assert (await client.get("/v1/jobs")).json() == []


# -- DNS rebinding -------------------------------------------------------------------------------------


class Recorder(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.hits.append(dict(self.headers))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver_and_victim() -> Iterator[tuple[ThreadingHTTPServer, ThreadingHTTPServer]]:
    """A receiver on 127.0.0.2 and a victim on 127.0.0.1, on one port."""
    for _ in range(20):
        victim = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        try:
            receiver = ThreadingHTTPServer(("127.0.0.2", victim.server_port), Recorder)
        except OSError:  # that port is taken on 127.0.0.2: try another
            victim.server_close()
            continue
        break
    else:
        pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")
    threads = []
    for http_server in (receiver, victim):
        http_server.hits = []  # type: ignore[attr-defined]
        threads.append(threading.Thread(target=http_server.serve_forever, daemon=True))
        threads[-1].start()
    yield receiver, victim
    for http_server, thread in zip((receiver, victim), threads, strict=True):
        http_server.shutdown()
        http_server.server_close()
        thread.join()


class RebindingDNS:
    """An attacker's DNS with a zero TTL: 127.0.0.2 (the stand-in public address) for the first
    `checks` lookups, 127.0.0.1 for every one after."""

    def __init__(self, checks: int) -> None:
        self.checks = checks
        self.lookups = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        return ["127.0.0.2" if self.lookups <= self.checks else "127.0.0.1"]


async def submit_and_deliver(core: Core, url: str, dns: RebindingDNS) -> str:
    """Submission's check, then one delivery attempt, run to its end; returns the job id."""
    core.settings.http.allow_private_webhooks = False
    core.settings.http.webhook_attempts = 1
    await check_webhook_target(url, False, resolver=dns, address_allowed=stand_in_for_public)
    webhook = {"url": url, "secret": "0123456789abcdef"}
    requester = Requester(platform="http", user_id="key-1", display_name="tests", reply_to={"webhook": webhook})
    job = (await core.service.submit(requester, core.parser.parse("/imagine a cat"))).job
    sender = WebhookSender(core, lambda delivery: {"id": delivery.job.id}, resolver=dns,
                           address_allowed=stand_in_for_public)
    try:
        assert await sender.on_event(Delivery(kind=EventKind.DONE, job=job)) is False
        attempt = next(task for task in asyncio.all_tasks() if task.get_name() == f"webhook-{job.id}")
        await asyncio.wait_for(attempt, timeout=30)
    finally:
        await sender.close()
    return job.id


async def test_the_webhook_post_goes_to_the_checked_address_not_a_second_lookup(
        core: Core, receiver_and_victim) -> None:
    receiver, victim = receiver_and_victim
    url = f"http://localhost:{victim.server_port}/hook"
    dns = RebindingDNS(checks=2)  # submission and delivery see 127.0.0.2; any later lookup, 127.0.0.1
    job_id = await submit_and_deliver(core, url, dns)
    assert victim.hits == []
    assert [hit["Host"] for hit in receiver.hits] == [f"localhost:{victim.server_port}"]
    assert dns.lookups == 2  # one per check: the connection looked nothing up
    assert (await core.service.get_job(job_id)).delivered_at is not None


async def test_a_name_rebound_to_loopback_after_submission_is_refused_at_delivery(
        core: Core, receiver_and_victim, caplog: pytest.LogCaptureFixture) -> None:
    receiver, victim = receiver_and_victim
    dns = RebindingDNS(checks=1)  # public at submission, loopback from delivery on
    with caplog.at_level(logging.INFO, logger="easel.webhooks"):
        job_id = await submit_and_deliver(core, f"http://localhost:{victim.server_port}/hook", dns)
    assert victim.hits == [] and receiver.hits == []
    assert f"webhook for job {job_id}, attempt 1: InvalidCommand" in caplog.text
    assert (await core.service.get_job(job_id)).delivered_at is None


async def test_private_targets_are_allowed_when_the_setting_says_so() -> None:
    with pytest.raises(InvalidCommand, match=r"non-public address \(64:ff9b::a9fe:a9fe\).*allow_private_webhooks"):
        await check_webhook_target("http://[64:ff9b::a9fe:a9fe]/hook", False)
    target = await check_webhook_target("http://[64:ff9b::a9fe:a9fe]/hook", True)
    assert str(target.address) == "64:ff9b::a9fe:a9fe"
