"""Sending to Telegram without flooding it: a pace per chat, back-off on RetryAfter, merged edits.

Telegram allows a bot about one message a second in a private chat, twenty a minute in a group and
thirty a second overall, and answers more with 429 RetryAfter. `Sender.call` waits for the chat's
turn before every request, and when Telegram says RetryAfter it holds that chat (only that chat)
for the time asked, then tries again. `StatusBoard` keeps one status message per job: progress
changes only record the newest text, and one edit at the chat's pace shows whatever is newest, so
a job with fifty steps costs a handful of edits, not fifty.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import TypeVar

from telegram import Bot, InlineKeyboardMarkup
from telegram.error import BadRequest, NetworkError, RetryAfter, TelegramError

log = logging.getLogger("easel.telegram")

T = TypeVar("T")

GLOBAL_INTERVAL_S = 1 / 30  # Telegram's overall limit: about thirty messages a second
RETRIES = 4  # tries after the first, for RetryAfter and network errors (5xx, timeouts)


def retry_after_seconds(error: RetryAfter) -> float:
    with warnings.catch_warnings():  # the int form of retry_after is deprecated in favour of timedelta
        warnings.simplefilter("ignore")
        value = error.retry_after
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


class Sender:
    """Every request that sends to a chat goes through `call`, which keeps to Telegram's pace."""

    def __init__(self, private_interval_s: float, group_interval_s: float) -> None:
        self._private_interval_s = private_interval_s
        self._group_interval_s = group_interval_s
        self._next_at: dict[int, float] = {}  # chat id -> earliest time of its next request
        self._next_global_at = 0.0

    async def call(self, chat_id: int, request: Callable[[], Awaitable[T]]) -> T:
        """Run `request` at the chat's next turn; on RetryAfter or a network error, wait and retry."""
        for attempt in range(RETRIES + 1):
            await self._turn(chat_id)
            try:
                return await request()
            except RetryAfter as error:
                seconds = retry_after_seconds(error)
                log.warning("Telegram flood control: holding chat %s for %.0f s", chat_id, seconds)
                self.hold(chat_id, seconds)
                if attempt == RETRIES:
                    raise
            except BadRequest:
                raise  # a BadRequest is a NetworkError in python-telegram-bot, but retrying cannot help
            except NetworkError as error:  # 5xx, timeouts, dropped connections
                if attempt == RETRIES:
                    raise
                delay = min(30.0, 0.5 * 2**attempt)
                log.warning("Telegram request to chat %s failed (%s); retrying in %.1f s", chat_id, error, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def hold(self, chat_id: int, seconds: float) -> None:
        """Send nothing to this chat for `seconds` (Telegram asked us to wait)."""
        until = time.monotonic() + seconds
        self._next_at[chat_id] = max(self._next_at.get(chat_id, 0.0), until)

    async def _turn(self, chat_id: int) -> None:
        # Re-check after every sleep: a RetryAfter may have moved the chat's turn while we slept.
        while True:
            now = time.monotonic()
            ready_at = max(self._next_at.get(chat_id, 0.0), self._next_global_at)
            if ready_at <= now:
                interval = self._private_interval_s if chat_id > 0 else self._group_interval_s
                self._next_at[chat_id] = now + interval
                self._next_global_at = now + GLOBAL_INTERVAL_S
                return
            await asyncio.sleep(ready_at - now)


class StatusBoard:
    """One status message per job, edited to its newest text at the chat's pace."""

    def __init__(self, bot: Bot, sender: Sender, tasks: set[asyncio.Task]) -> None:
        self._bot = bot
        self._sender = sender
        self._tasks = tasks  # the adapter's tracked tasks, awaited on shutdown
        self._wanted: dict[tuple[int, int], tuple[tuple[int, int], str]] = {}  # key -> (rank, text)
        self._shown: dict[tuple[int, int], str] = {}
        self._syncing: dict[tuple[int, int], asyncio.Task] = {}
        self._final: set[tuple[int, int]] = set()

    def show(self, chat_id: int, message_id: int, text: str, rank: tuple[int, int] = (0, 0)) -> None:
        """Make the message say `text` soon; an update ranked below the one already wanted is dropped."""
        key = (chat_id, message_id)
        if key in self._final or (key in self._wanted and self._wanted[key][0] > rank):
            return
        self._wanted[key] = (rank, text)
        self._start_sync(key)

    async def settle(self, chat_id: int, message_id: int, text: str,
                     buttons: InlineKeyboardMarkup | None = None) -> None:
        """Show the final text (after any edit in flight) and stop updating the message."""
        key = (chat_id, message_id)
        self._final.add(key)
        syncing = self._syncing.get(key)
        if syncing is not None:
            await asyncio.shield(syncing)
        try:
            if self._shown.get(key) != text:
                await self._sender.call(chat_id, lambda: self._bot.edit_message_text(
                    text, chat_id=chat_id, message_id=message_id, reply_markup=buttons))
        except BadRequest as error:
            if "not modified" not in str(error):
                log.warning("cannot edit status message %s in chat %s: %s", message_id, chat_id, error)
        finally:
            self._wanted.pop(key, None)
            self._shown.pop(key, None)

    def _start_sync(self, key: tuple[int, int]) -> None:
        if key in self._syncing:
            return  # the running sync picks up the newest text
        task = asyncio.create_task(self._sync(key), name=f"telegram-status-{key[0]}-{key[1]}")
        self._syncing[key] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync(self, key: tuple[int, int]) -> None:
        chat_id, message_id = key
        try:
            while key not in self._final and key in self._wanted and self._wanted[key][1] != self._shown.get(key):

                async def edit() -> str:
                    text = self._wanted[key][1]  # the newest text at the moment of sending
                    await self._bot.edit_message_text(text, chat_id=chat_id, message_id=message_id)
                    return text

                try:
                    self._shown[key] = await self._sender.call(chat_id, edit)
                except BadRequest as error:
                    if "not modified" in str(error):
                        self._shown[key] = self._wanted[key][1]
                        continue
                    log.warning("stopped updating status message %s in chat %s: %s", message_id, chat_id, error)
                    return
                except TelegramError as error:
                    log.warning("could not update status message %s in chat %s: %s", message_id, chat_id, error)
                    return
        finally:
            self._syncing.pop(key, None)
