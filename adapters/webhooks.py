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
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from bot.bootstrap import Core
from bot.delivery import Delivery
from bot.errors import EaselError, InvalidCommand
from bot.events import EventKind
from bot.views import JobView

log = logging.getLogger("easel.webhooks")



async def check_webhook_target(url: str, allow_private: bool) -> None:
    """Refuse webhooks to loopback, private and link-local addresses unless allowed (see config)."""
    if allow_private:
        return
    host = urlsplit(url).hostname or ""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise InvalidCommand(f"webhook host {host!r} does not resolve; check webhook.url") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])  # drop an IPv6 zone id
        if not address.is_global:
            raise InvalidCommand(f"webhook.url points to a non-public address ({address}); this server is set "
                                 "to call only public addresses (http.allow_private_webhooks)")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The Easel-Signature header: `t=<unix time>,v1=<hex HMAC-SHA256 of "<t>." + body>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class WebhookSender:
    """POSTs a job's final state to its webhook, signed, retried with doubling waits. A webhook that
    still fails stays undelivered and is tried again when the adapter next starts."""

    def __init__(self, core: Core, job_json: Callable[[Delivery], dict[str, Any]]) -> None:
        self.core = core
        self.job_json = job_json  # the job as GET /v1/jobs/{id} shows it (adapters/http.py)
        self.config = core.settings.http
        self._client = httpx.AsyncClient(timeout=self.config.webhook_timeout_s, follow_redirects=False)
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
            # Checked again at delivery: the name may resolve elsewhere now than at submission.
            await check_webhook_target(webhook["url"], self.config.allow_private_webhooks)
            response = await self._client.post(webhook["url"], content=body, headers={
                "Content-Type": "application/json", "Easel-Event": f"job.{kind}", "Easel-Job": job.id,
                "Easel-Delivery-Attempt": str(attempt),
                "Easel-Signature": sign(webhook["secret"], int(time.time()), body)})
        except (httpx.HTTPError, EaselError) as error:
            log.info("webhook for job %s, attempt %d: %s", job.id, attempt, type(error).__name__)
            return False
        return response.is_success

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
