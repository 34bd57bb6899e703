"""API keys: bearer tokens for the HTTP API, and the per-browser sessions of the web chat.

Each key is its own user (platform "http", user id = the key's public id), so quotas, bans and
safety flags apply to a key the way they apply to a Discord or Telegram user. Only the SHA-256 of a
token is stored: a token is 32 random bytes, so a plain hash cannot be reversed, and looking it up by
its hash needs no secret comparison.

Example:
    keys = core.apikeys                                               # built once by bot.bootstrap
    token, key = await keys.create("support-bot", daily_images=500)   # show `token` once
    key = await keys.authenticate(token)                              # or raises Unauthorized
    requester = key.requester()
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from bot.clock import utcnow
from bot.database import Database
from bot.domain import Requester
from bot.errors import InvalidCommand, Unauthorized
from bot.models import ApiKey, User

PLATFORM = "http"
TOKEN_PREFIX = "esk_"  # "easel secret key": recognisable in a leaked log or a secret scanner
KINDS = ("api", "web")  # made by `easel apikey create`; made for one browser by the web chat


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyView:
    public_id: str  # e.g. "key_k7mq2x9a"; not secret, the user id of the key's jobs
    name: str
    kind: str
    daily_images_limit: int | None  # None = queue.daily_images_per_user
    created_at: datetime

    def requester(self, reply_to: dict[str, Any] | None = None) -> Requester:
        return Requester(platform=PLATFORM, user_id=self.public_id, display_name=self.name,
                         reply_to=reply_to or {})


@dataclass
class ApiKeys:
    db: Database
    clock: Callable[[], datetime] = utcnow  # bootstrap gives the core's one clock

    async def create(self, name: str, *, daily_images: int | None = None, kind: str = "api") -> tuple[str, ApiKeyView]:
        """Make a key and its user. Returns the token (shown once, never stored) and the key."""
        name = name.strip()
        if not name or len(name) > 128:
            raise InvalidCommand("an API key needs a name of 1 to 128 characters, e.g. --name support-bot")
        if daily_images is not None and daily_images < 0:
            raise InvalidCommand(f"--quota must be 0 or more images per day (got {daily_images})")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        public_id = "key_" + secrets.token_hex(6)
        now = self.clock()
        async with self.db.unit_of_work() as uow:
            user = User(platform=PLATFORM, platform_user_id=public_id, display_name=name[:128], role="user",
                        daily_images_limit=daily_images, created_at=now)
            key = ApiKey(public_id=public_id, name=name, kind=kind, key_sha256=_sha256(token), user=user,
                         created_at=now)
            uow.session.add(key)
            await uow.commit()
            return token, _view(key)

    async def authenticate(self, token: str | None) -> ApiKeyView:
        """The active key this bearer token belongs to; Unauthorized (never saying why in detail) if none."""
        if not token:
            raise Unauthorized("Send an API key as `Authorization: Bearer esk_...`; create one with "
                               "`easel apikey create --name NAME`")
        digest = _sha256(token)
        async with self.db.unit_of_work(write=False) as uow:
            key = await uow.session.scalar(select(ApiKey).where(ApiKey.key_sha256 == digest,
                                                                ApiKey.revoked_at.is_(None)))
            if key is None:
                raise Unauthorized("That API key is not valid (mistyped, or revoked); check the "
                                   "Authorization header")
            return _view(key)


def _view(key: ApiKey) -> ApiKeyView:
    return ApiKeyView(public_id=key.public_id, name=key.name, kind=key.kind,
                      daily_images_limit=key.user.daily_images_limit, created_at=key.created_at)
