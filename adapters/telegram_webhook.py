"""Telegram's webhook: the route of Easel's HTTP server that Telegram posts updates to, for hosts that
cannot long-poll (telegram.webhook_url).

`easel serve` runs the HTTP server and the Telegram bot side by side. The bot, once started, lends
its Application with `receiving` and calls setWebhook; the route (mounted by adapters/http.py on
the path of telegram.webhook_url) puts each update Telegram posts on that Application's update
queue, where long polling would have put it. A post must carry telegram.webhook_secret in the
X-Telegram-Bot-Api-Secret-Token header, as Telegram sends it; any other is refused with 403 and
never handled, since an update speaks for a Telegram user (and for Easel's moderators).

    with receiving(core, application):   # adapters/telegram.py, while the bot runs in webhook mode
        await application.bot.set_webhook(url, secret_token=secret)
"""

from __future__ import annotations

import contextlib
import hmac
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

from fastapi import APIRouter, Request, Response
from telegram import Update
from telegram.ext import Application

from adapters.api.deps import CoreDep
from adapters.api.errors import HttpError
from bot.bootstrap import Core
from bot.config import TelegramConfig
from bot.errors import InvalidCommand

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"

# The running Telegram bot of each core (by id: a Core is not hashable), while it takes webhook updates.
_receivers: dict[int, Application] = {}


@contextlib.contextmanager
def receiving(core: Core, application: Application) -> Iterator[None]:
    """While the block runs, updates posted to the webhook route of `core`'s HTTP server go to `application`."""
    _receivers[id(core)] = application
    try:
        yield
    finally:
        _receivers.pop(id(core), None)


def router(config: TelegramConfig) -> APIRouter:
    """The webhook route, on the path of `config.webhook_url` (the TLS proxy in front keeps the path)."""
    routes = APIRouter()

    # Telegram's private door, not part of Easel's API: left out of /openapi.json.
    @routes.post(urlsplit(config.webhook_url).path, include_in_schema=False)
    async def receive_telegram_update(request: Request, core: CoreDep) -> Response:
        # 1. Only Telegram knows the secret; nothing else is read before it is checked.
        expected = core.settings.telegram.webhook_secret
        given = request.headers.get(SECRET_HEADER, "")
        if expected is None or not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
            raise HttpError(403, "forbidden", f"only Telegram may post to this webhook, with the secret token "
                            f"(telegram.webhook_secret) in the {SECRET_HEADER} header")
        # 2. The running bot; while there is none, Telegram keeps the update and posts it again later.
        application = _receivers.get(id(core))
        if application is None:
            raise HttpError(503, "unavailable", "Easel's Telegram bot is not running yet; Telegram posts the "
                            "update again later")
        # 3. The update, on the queue the Application handles, as if long polling had fetched it.
        try:
            data = json.loads(await request.body())
            update = Update.de_json(data, application.bot) if isinstance(data, dict) else None
        except (ValueError, TypeError, KeyError):
            update = None
        if update is None or not isinstance(data.get("update_id"), int):
            raise InvalidCommand("the body is not a Telegram update: send a JSON object with an update_id")
        await application.update_queue.put(update)
        return Response(status_code=200)

    return routes
