"""Where a job's Discord messages go, and how they get there when the interaction token is gone.

A slash command or button press gives a token that can edit its response and send follow-ups for
15 minutes. Jobs can take longer, and the bot can restart in between, so the job stores a
`ReplyTarget` (its `reply_to`): the token, when it expires, the response message, the channel, the
user and the channel's upload limit. `Replier` uses the token while it has more than `margin_s`
left and Discord still accepts it; after that it posts in the channel with the bot's own token,
replying to the original message and mentioning the user. No result is lost to an expired token.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import discord

from adapters.discord_render import DEFAULT_UPLOAD_LIMIT, ResultFile

TOKEN_LIFETIME = timedelta(minutes=15)
# Discord's JSON error codes meaning "this token (or its message) can no longer be used".
_TOKEN_GONE_CODES = frozenset({
    10008,  # Unknown Message: the response was deleted
    10015,  # Unknown Webhook: the interaction's webhook is gone
    50027,  # Invalid Webhook Token: the 15 minutes are over
})


@dataclass(frozen=True)
class ReplyTarget:
    """A job's address on Discord, stored as the job's `reply_to` (snowflakes as strings, as in JSON)."""

    application_id: int
    token: str
    channel_id: int
    user_id: int
    message_id: int | None  # the deferred response ("Easel is thinking...") the job edits
    expires_at: float  # Unix time the token stops working
    upload_limit: int  # bytes one message may carry in that channel
    guild_id: int | None = None

    @classmethod
    def of(cls, interaction: discord.Interaction, message_id: int | None) -> ReplyTarget:
        return cls(
            application_id=interaction.application_id,
            token=interaction.token,
            channel_id=interaction.channel_id or 0,
            user_id=interaction.user.id,
            message_id=message_id,
            expires_at=(interaction.created_at + TOKEN_LIFETIME).timestamp(),
            upload_limit=getattr(interaction, "filesize_limit", None) or DEFAULT_UPLOAD_LIMIT,
            guild_id=interaction.guild_id,
        )

    def as_dict(self) -> dict[str, Any]:
        return {key: str(value) if isinstance(value, int) and key.endswith("_id") else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplyTarget:
        def snowflake(key: str) -> int | None:
            return int(data[key]) if data.get(key) is not None else None

        return cls(application_id=int(data["application_id"]), token=str(data["token"]),
                   channel_id=int(data["channel_id"]), user_id=int(data["user_id"]),
                   message_id=snowflake("message_id"), expires_at=float(data["expires_at"]),
                   upload_limit=int(data.get("upload_limit") or DEFAULT_UPLOAD_LIMIT),
                   guild_id=snowflake("guild_id"))


class Replier:
    """Edits and posts a job's messages: with the interaction token while it lives, else in the channel."""

    def __init__(self, client: discord.Client, margin_s: float, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.margin_s = margin_s
        self.clock = clock
        self._dead_tokens: set[str] = set()  # refused by Discord: do not try them again

    def seconds_left(self, target: ReplyTarget) -> float:
        """How long the token may still be used (0 once it is expired, refused, or within the margin)."""
        if target.token in self._dead_tokens:
            return 0.0
        return max(0.0, target.expires_at - self.margin_s - self.clock())

    def token_usable(self, target: ReplyTarget) -> bool:
        return self.seconds_left(target) > 0

    async def edit(self, target: ReplyTarget, content: str, *, files: Sequence[ResultFile] = (),
                   view: discord.ui.View | None = None) -> bool:
        """Edit the job's response message. False when the token cannot do it any more."""
        if target.message_id is None or not self.token_usable(target):
            return False
        try:
            await self._webhook(target).edit_message(
                target.message_id, content=content, attachments=_files(files), view=view)
        except discord.HTTPException as error:
            if not _token_gone(error):
                raise
            self._dead_tokens.add(target.token)
            return False
        return True

    async def post(self, target: ReplyTarget, content: str, *, files: Sequence[ResultFile] = (),
                   view: discord.ui.View | None = None) -> None:
        """A new message for the user: a follow-up while the token lives, else a channel message."""
        mention = discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(target.user_id)])
        if self.token_usable(target):
            try:
                await self._webhook(target).send(content, files=_files(files), view=view or discord.utils.MISSING,
                                                 allowed_mentions=mention, wait=True)
                return
            except discord.HTTPException as error:
                if not _token_gone(error):
                    raise
                self._dead_tokens.add(target.token)
        channel = self.client.get_partial_messageable(target.channel_id, guild_id=target.guild_id)
        reference = None
        if target.message_id is not None:
            reference = discord.MessageReference(message_id=target.message_id, channel_id=target.channel_id,
                                                 fail_if_not_exists=False)
        await channel.send(content, files=_files(files), view=view or discord.utils.MISSING,
                           allowed_mentions=mention, reference=reference or discord.utils.MISSING)

    def _webhook(self, target: ReplyTarget) -> discord.Webhook:
        return discord.Webhook.partial(target.application_id, target.token, client=self.client)


def _files(files: Sequence[ResultFile]) -> list[discord.File]:
    """Fresh File objects per request: discord.py reads (and rewinds) them while sending."""
    return [discord.File(io.BytesIO(file.data), filename=file.name, spoiler=file.spoiler) for file in files]


def _token_gone(error: discord.HTTPException) -> bool:
    return error.status == 401 or error.code in _TOKEN_GONE_CODES
