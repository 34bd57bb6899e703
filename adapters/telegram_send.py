"""Sending to Telegram without flooding it: a pace per chat, back-off on RetryAfter, merged edits.

Telegram allows a bot about one message a second in a private chat, twenty a minute in a group and
thirty a second overall, and answers more with 429 RetryAfter. `ChatPacer` is python-telegram-bot's
rate limiter hook (`Application.builder().rate_limiter(...)`) filled with Easel's rules, so every
request the bot makes (handlers' replies, deliveries, status edits) keeps to them without a wrapper
at each call: a message or edit waits for its chat's turn, and when Telegram says RetryAfter only
that chat is held for the time asked. `StatusBoard` keeps one status message per job: progress
changes only record the newest text, and one edit at the chat's turn shows whatever is newest, so a
job with fifty steps costs a handful of edits, not fifty.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

from telegram import InlineKeyboardMarkup
from telegram.error import BadRequest, NetworkError, RetryAfter, TelegramError
from telegram.ext import Application, BaseRateLimiter

log = logging.getLogger("easel.telegram")

ApiResult = bool | dict[str, Any] | list[dict[str, Any]]  # what a Bot API call answers, as JSON

GLOBAL_INTERVAL_S = 1 / 30  # Telegram's overall limit: about thirty messages a second
RETRIES = 4  # tries after the first, for RetryAfter and network errors (5xx, timeouts)
PACED_METHODS = ("send", "edit", "copy", "forward")  # what shows up in a chat; reads and answers are not paced


def retry_after_seconds(error: RetryAfter) -> float:
    with warnings.catch_warnings():  # the int form of retry_after is deprecated in favour of timedelta
        warnings.simplefilter("ignore")
        value = error.retry_after
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


class ChatPacer(BaseRateLimiter[None]):
    """Easel's pace for every Bot API request, installed as the Application's rate limiter.

    Not python-telegram-bot's ready-made AIORateLimiter: on a RetryAfter it "will halt all requests
    for retry_after + 0.1 seconds", so one chat's flood wait would stall every chat; here one user's
    429 never delays another's. Network errors (5xx, timeouts) are retried here too, although the
    interface expects a limiter to handle RetryAfter only: a retry must wait for the chat's turn like
    any other request, and this is the one place that knows it. getUpdates never comes here.
    """

    def __init__(self, private_interval_s: float, group_interval_s: float) -> None:
        self._private_interval_s = private_interval_s
        self._group_interval_s = group_interval_s
        self._next_at: dict[int | str, float] = {}  # chat id -> earliest time of its next request
        self._next_global_at = 0.0

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to release."""

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, ApiResult]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: None,
    ) -> ApiResult:
        """Make the request at its chat's turn; on RetryAfter or a network error, wait and retry."""
        chat_id = data.get("chat_id")
        paced = chat_id is not None and endpoint.startswith(PACED_METHODS)
        for attempt in range(RETRIES + 1):
            if paced:
                await self._take_turn(chat_id)
            try:
                return await callback(*args, **kwargs)
            except RetryAfter as error:
                if attempt == RETRIES:
                    raise
                seconds = retry_after_seconds(error)
                if paced:
                    log.warning("Telegram flood control: holding chat %s for %.0f s", chat_id, seconds)
                    self.hold(chat_id, seconds)
                else:
                    log.warning("Telegram flood control: retrying %s in %.0f s", endpoint, seconds)
                    await asyncio.sleep(seconds)
            except BadRequest:
                raise  # a BadRequest is a NetworkError in python-telegram-bot, but retrying cannot help
            except NetworkError as error:  # 5xx, timeouts, dropped connections
                if attempt == RETRIES:
                    raise
                delay = min(30.0, 0.5 * 2**attempt)
                log.warning("Telegram %s to chat %s failed (%s); retrying in %.1f s", endpoint, chat_id, error, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def hold(self, chat_id: int | str, seconds: float) -> None:
        """Send nothing to this chat for `seconds` (Telegram asked us to wait)."""
        until = time.monotonic() + seconds
        self._next_at[chat_id] = max(self._next_at.get(chat_id, 0.0), until)

    async def wait_for_turn(self, chat_id: int | str) -> None:
        """Return once a request to this chat would go at once (without taking the turn)."""
        while (delay := self._ready_at(chat_id) - time.monotonic()) > 0:
            await asyncio.sleep(delay)

    async def _take_turn(self, chat_id: int | str) -> None:
        # Re-check after every sleep: a RetryAfter may have moved the chat's turn while we slept.
        await self.wait_for_turn(chat_id)
        now = time.monotonic()
        group = not isinstance(chat_id, int) or chat_id < 0  # "@name" is a channel or supergroup
        self._next_at[chat_id] = now + (self._group_interval_s if group else self._private_interval_s)
        self._next_global_at = now + GLOBAL_INTERVAL_S

    def _ready_at(self, chat_id: int | str) -> float:
        return max(self._next_at.get(chat_id, 0.0), self._next_global_at)


class StatusBoard:
    """One status message per job, edited to its newest text at the chat's pace.

    Its edits run as `Application.create_task` tasks: the application awaits them on stop and hands
    an unexpected error to the adapter's one error hook.
    """

    def __init__(self, application: Application, pacer: ChatPacer) -> None:
        self._application = application
        self._pacer = pacer
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
        if key in self._syncing:
            return  # the running sync picks up the newest text
        if not self._application.running:
            return  # stopping: a task now would not be awaited; the job's next event or result shows its state
        self._syncing[key] = self._application.create_task(self._sync(key),
                                                           name=f"telegram-status-{chat_id}-{message_id}")

    async def settle(self, chat_id: int, message_id: int, text: str,
                     buttons: InlineKeyboardMarkup | None = None) -> None:
        """Show the final text (after any edit in flight) and stop updating the message."""
        key = (chat_id, message_id)
        self._final.add(key)
        syncing = self._syncing.get(key)
        if syncing is not None:
            # However the edit in flight ends (an error has gone to the error hook), the final text follows.
            await asyncio.wait({syncing})
        try:
            if self._shown.get(key) != text:
                await self._application.bot.edit_message_text(text, chat_id=chat_id, message_id=message_id,
                                                               reply_markup=buttons)
        except BadRequest as error:
            if "not modified" not in str(error):
                log.warning("cannot edit status message %s in chat %s: %s", message_id, chat_id, error)
        finally:
            self._wanted.pop(key, None)
            self._shown.pop(key, None)

    def cancel_edits(self) -> None:
        """Drop the progress edits in flight (at shutdown: a flood wait must not hold it up, and the
        next start shows each job's final status)."""
        for task in self._syncing.values():
            task.cancel()

    def _stale(self, key: tuple[int, int]) -> bool:
        return key not in self._final and key in self._wanted and self._wanted[key][1] != self._shown.get(key)

    async def _sync(self, key: tuple[int, int]) -> None:
        chat_id, message_id = key
        try:
            while self._stale(key):
                await self._pacer.wait_for_turn(chat_id)  # so the edit carries the newest text
                if not self._stale(key):
                    return
                text = self._wanted[key][1]
                try:
                    await self._application.bot.edit_message_text(text, chat_id=chat_id, message_id=message_id)
                except BadRequest as error:
                    if "not modified" not in str(error):
                        log.warning("stopped updating status message %s in chat %s: %s", message_id, chat_id,
                                    error)
                        return
                except TelegramError as error:
                    log.warning("could not update status message %s in chat %s: %s", message_id, chat_id, error)
                    return
                self._shown[key] = text
        finally:
            self._syncing.pop(key, None)
