"""Completion webhooks: a job's final state POSTed to the URL its submitter gave, signed and retried.

    sender = WebhookSender(core, job_json)      # the HTTP adapter builds it; job_json renders a job
    await deliver_events(core.service, "http", sender.on_event, stop)

The receiver checks `Easel-Signature` (`t=<unix time>,v1=<hex HMAC-SHA256 of "<t>." + body>`) with
the secret it gave. A webhook that still fails after its retries stays undelivered and is tried
again when the adapter next starts (bot/delivery.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from bot.bootstrap import Core
from bot.delivery import Delivery
from bot.errors import EaselError, InvalidCommand
from bot.events import EventKind
from bot.netguard import (
    AddressRefused,
    AddressRule,
    HostNotFound,
    PinnedTarget,
    Resolver,
    any_address,
    is_public_address,
    pin,
    pinned_client,
    system_resolver,
)
from bot.views import JobView

log = logging.getLogger("easel.webhooks")



async def check_webhook_target(url: str, allow_private: bool, *, resolver: Resolver = system_resolver,
                               address_allowed: AddressRule = is_public_address) -> PinnedTarget:
    """Resolve webhook.url's host once and refuse it if any address is not public (bot/netguard.py),
    unless http.allow_private_webhooks is on; return the URL pinned to the checked address, so that the
    POST goes where the check looked."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise InvalidCommand("webhook.url is not a valid URL; give one like https://example.com/hook") from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidCommand("webhook.url must start with http:// or https://")
    try:
        return await pin(parsed, resolver=resolver, address_allowed=any_address if allow_private else address_allowed)
    except HostNotFound as error:
        raise InvalidCommand(f"webhook host {error.host!r} does not resolve; check webhook.url") from None
    except AddressRefused as error:
        raise InvalidCommand(f"webhook.url points to a non-public address ({error.address}); this server is set "
                             "to call only public addresses (http.allow_private_webhooks)") from None


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The Easel-Signature header: `t=<unix time>,v1=<hex HMAC-SHA256 of "<t>." + body>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class WebhookSender:
    """POSTs a job's final state to its webhook, signed, retried with doubling waits. A webhook that
    still fails stays undelivered and is tried again when the adapter next starts."""

    def __init__(self, core: Core, job_json: Callable[[Delivery], dict[str, Any]], *,
                 resolver: Resolver = system_resolver, address_allowed: AddressRule = is_public_address) -> None:
        self.core = core
        self.job_json = job_json  # the job as GET /v1/jobs/{id} shows it (adapters/http.py)
        self.config = core.settings.http
        self.resolver = resolver  # injectable, like address_allowed, so tests can stage DNS rebinding
        self.address_allowed = address_allowed
        self._client = pinned_client(self.config.webhook_timeout_s)
        self._tasks: set[asyncio.Task[None]] = set()

    async def on_event(self, delivery: Delivery) -> bool:
        """The delivery loop's handler: POSTs final results (and images released after an appeal).
        True when there is nothing to push (no webhook)."""
        if not (delivery.is_final or delivery.kind is EventKind.RELEASED):
            return False
        job = delivery.job
        webhook = job.reply_to.get("webhook")
        if not webhook:
            return True  # the client polls or streams events; nothing to push
        task = asyncio.create_task(self._deliver(webhook, delivery), name=f"webhook-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return False  # _deliver marks the job delivered once the receiver said 2xx

    async def _deliver(self, webhook: dict[str, str], delivery: Delivery) -> None:
        job = delivery.job
        body = json.dumps({"event": f"job.{delivery.kind}", "job": self.job_json(delivery)}).encode()
        delay = self.config.webhook_backoff_s
        for attempt in range(1, self.config.webhook_attempts + 1):
            if await self._post(webhook, delivery.kind, job, body, attempt):
                if delivery.is_final:
                    await self.core.service.mark_delivered(job.id)
                return
            if attempt < self.config.webhook_attempts:
                await asyncio.sleep(delay)
                delay *= 2
        log.warning("webhook for job %s failed %d times; it is tried again when the server restarts",
                    job.id, self.config.webhook_attempts)

    async def _post(self, webhook: dict[str, str], kind: EventKind, job: JobView, body: bytes, attempt: int) -> bool:
        try:
            # Checked again at delivery (the name may resolve elsewhere now than at submission), and
            # sent to the address just checked: no second lookup for DNS rebinding to answer.
            target = await check_webhook_target(webhook["url"], self.config.allow_private_webhooks,
                                                resolver=self.resolver, address_allowed=self.address_allowed)
            response = await self._client.send(target.request(self._client, "POST", content=body, headers={
                "Content-Type": "application/json", "Easel-Event": f"job.{kind}", "Easel-Job": job.id,
                "Easel-Delivery-Attempt": str(attempt),
                "Easel-Signature": sign(webhook["secret"], int(time.time()), body)}))
        except (httpx.HTTPError, EaselError) as error:
            log.info("webhook for job %s, attempt %d: %s", job.id, attempt, type(error).__name__)
            return False
        return response.is_success

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
