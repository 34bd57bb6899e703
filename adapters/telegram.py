"""The Telegram adapter: Easel as a Telegram bot, in private chats and groups.

It runs python-telegram-bot's `Application` with long polling, handling updates concurrently so
one slow download never holds up another chat:

- `/imagine`, `/quota`, `/job`, `/jobs`, `/cancel`, `/help`, `/appeal`, `/mod` (and `/start`) in messages; `/edit` and
  `/inpaint` in the caption of a picture or in a reply to one (python-telegram-bot's
  CommandHandler reads only text, hence `SlashCommand`). Commands for another bot
  (`/imagine@otherbot`) are left alone.
- Each job gets one status message, sent before the job is queued so its id is stored with the
  job: it is edited with the queue position and progress (telegram_send.StatusBoard keeps to
  Telegram's pace) and says how the job ended, even after a restart.
- Results come as a photo or an album with the seeds in the captions (plus lossless PNG files when
  `telegram.send_png_files`), with Re-roll, Variations, Upscale and Info buttons whose callback
  data holds only a job id.
- A message delivered twice (Telegram redelivers updates it was never told were read) makes one
  job: its chat and message id are the job's idempotency key.

    adapter = TelegramAdapter(core)       # core.settings.telegram.token must be set
    await adapter.run(stop)               # until `stop` is set; `easel serve` does this
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

from telegram import Chat, InputFile, InputMediaDocument, InputMediaPhoto, Message, ReplyParameters, Update, User
from telegram.constants import ChatType
from telegram.error import BadRequest, Forbidden, InvalidToken, TelegramError
from telegram.ext import Application, BaseHandler, CallbackContext, CallbackQueryHandler, MessageHandler, filters

from adapters import telegram_render as render
from adapters.telegram_inputs import Albums, gather_inputs
from adapters.telegram_send import ChatPacer, StatusBoard
from bot import followups
from bot.bootstrap import Core
from bot.delivery import Delivery, ShownImage, deliver_events
from bot.domain import (
    AppealCommand,
    CancelCommand,
    GenerateCommand,
    HelpCommand,
    JobCommand,
    JobsCommand,
    LorasCommand,
    ModCommand,
    ModelsCommand,
    QuotaCommand,
    Requester,
    StylesCommand,
)
from bot.errors import ConfigError, EaselError
from bot.events import EventKind
from bot.grammar import COMMANDS, split_command
from bot.idempotency import earlier_job
from bot.policy import describe_quota
from bot.styles import describe_styles
from bot.views import JobView

log = logging.getLogger("easel.telegram")

PLATFORM = "telegram"
GROUP_TYPES = (ChatType.GROUP, ChatType.SUPERGROUP)
ADMIN_CACHE_S = 600.0  # how long a group's administrator list is trusted
FINGERPRINT = "telegram-message"  # the same key always means the same message: no conflicts to tell


class SlashCommand(BaseHandler[Update, CallbackContext, None]):
    """A slash command in a new message's text or caption, meant for this bot.

    Matches known commands (and, in private chats or when addressed as /name@thisbot, unknown ones,
    so the user hears what went wrong); leaves alone commands addressed to another bot.
    """

    def check_update(self, update: object) -> bool:
        if not isinstance(update, Update) or update.message is None:
            return False
        message = update.message
        text = message.text or message.caption or ""
        if not text.startswith("/"):
            return False
        name, addressed_to, _ = split_command(text)
        this_bot = (message.get_bot().username or "").lower()
        if addressed_to is not None:
            return addressed_to.lower() == this_bot
        return name in COMMANDS or name == "start" or message.chat.type == ChatType.PRIVATE


class TelegramAdapter:
    platform = PLATFORM

    def __init__(self, core: Core) -> None:
        if core.settings.telegram.token is None:
            raise ConfigError("the Telegram adapter needs telegram.token (set TELEGRAM_TOKEN)")
        self.core = core
        self.config = core.settings.telegram
        self.albums = Albums(self.config.album_wait_s)
        self.pacer = ChatPacer(self.config.private_interval_s, self.config.group_interval_s)
        self._admins: dict[int, tuple[float, frozenset[int]]] = {}
        self.application = self._build_application()
        self.board = StatusBoard(self.application, self.pacer)
        _keep_token_out_of_logs()

    # -- running ----------------------------------------------------------------------------------

    def _build_application(self) -> Application:
        config = self.config
        assert config.token is not None
        application = (
            Application.builder()
            .token(config.token.get_secret_value())
            .base_url(config.base_url)
            .base_file_url(config.base_file_url)
            .concurrent_updates(config.concurrent_updates)
            .get_updates_read_timeout(config.poll_timeout_s + 10)
            .media_write_timeout(120)
            .rate_limiter(self.pacer)  # every request keeps to Telegram's pace (telegram_send.ChatPacer)
            .build()
        )
        # The album recorder runs first (group -1) for every picture, captioned or not.
        application.add_handler(MessageHandler(filters.PHOTO | filters.Document.ALL, self._remember_album_item),
                                group=-1)
        application.add_handler(SlashCommand(self._on_command))
        application.add_handler(CallbackQueryHandler(self._on_button))
        application.add_error_handler(self._on_error)
        return application

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set: poll for updates and deliver job events (missed ones first)."""
        application = self.application
        try:
            await application.initialize()  # getMe: checks the token
        except InvalidToken:
            raise ConfigError("Telegram refused telegram.token (TELEGRAM_TOKEN); copy the token from "
                              "@BotFather again") from None
        # Started before deliveries, so status edits (Application.create_task) are tracked from the first.
        await application.start()
        ready = asyncio.Event()
        delivery = asyncio.create_task(
            deliver_events(self.core.service, self.core.deliveries, PLATFORM, self._on_delivery, stop, ready,
                           concurrency=self.core.settings.delivery.concurrency), name="telegram-delivery")
        try:
            # Take commands only once the delivery loop follows every new event (see deliver_events).
            following = asyncio.ensure_future(ready.wait())
            await asyncio.wait({delivery, following}, return_when=asyncio.FIRST_COMPLETED)
            following.cancel()
            if not delivery.done():
                assert application.updater is not None
                await application.updater.start_polling(timeout=self.config.poll_timeout_s,
                                                        allowed_updates=["message", "callback_query"])
                log.info("Telegram bot @%s is serving", application.bot.username)
            await delivery
        finally:
            if not delivery.done():  # start-up failed: stop delivering too
                delivery.cancel()
                await asyncio.gather(delivery, return_exceptions=True)
            if application.updater is not None and application.updater.running:
                await application.updater.stop()
            self.board.cancel_edits()
            if application.running:
                await application.stop()  # handles the updates already fetched, awaits the tasks it tracks
            await application.shutdown()

    # -- commands ---------------------------------------------------------------------------------

    async def _remember_album_item(self, update: Update, context: CallbackContext) -> None:
        if update.message is not None and update.message.media_group_id is not None:
            self.albums.add(update.message)

    async def _on_command(self, update: Update, context: CallbackContext) -> None:
        message = update.message
        assert message is not None and message.from_user is not None
        refusal = self._refusal(message.chat)
        if refusal is not None:
            await self._say(message, refusal)
            return
        text = message.text or message.caption or ""
        name, _, _ = split_command(text)
        if name == "start":
            example = self.core.parser.example_prompts()[0]
            await self._say(message, f"Hello! I draw pictures from your words. Try /imagine {example}\n\n"
                            + self._help())
            return
        try:
            command = self.core.parser.parse(text)
            requester = await self._requester(message.from_user, message.chat, message)
            if isinstance(command, GenerateCommand):
                await self._generate(message, command, requester)
            elif isinstance(command, QuotaCommand):
                await self._say(message, describe_quota(await self.core.service.quota(requester, command.command)))
            elif isinstance(command, AppealCommand | ModCommand):
                await self._say(message, await self.core.moderation.handle(requester, command))
            elif isinstance(command, JobsCommand):
                await self._say(message, render.jobs_text(await self.core.service.list_jobs(command.limit, requester)))
            elif isinstance(command, JobCommand):
                await self._say(message, render.describe_job(self.core.deliveries.of_job(
                    await self.core.service.get_job(command.job_id))))
            elif isinstance(command, CancelCommand):
                job = await self.core.service.cancel(requester, command.job_id)
                await self._say(message, f"🚫 Job {job.id} cancelled.")
            elif isinstance(command, HelpCommand):
                await self._say(message, self._help())
            elif isinstance(command, StylesCommand):
                await self._say(message, describe_styles(self.core.parser.styles.styles()))
            elif isinstance(command, ModelsCommand):
                await self._say(message, self.core.catalog.describe())
            elif isinstance(command, LorasCommand):
                await self._say(message, self.core.parser.networks.listing())
        except EaselError as error:
            await self._say(message, render.error_text(error.message))

    async def _generate(self, message: Message, command: GenerateCommand, requester: Requester) -> None:
        key = f"tg:{message.chat.id}:{message.message_id}"
        earlier = await earlier_job(self.core.service, requester, key)
        if earlier is not None:
            log.info("message %s was delivered again; it is job %s already", key, earlier.id)
            return
        # 1. The pictures, downloaded (errors go back to the user as they are).
        inputs = await gather_inputs(message.get_bot(), message, command.params.kind, self.albums,
                                     self.core.settings.limits)
        # 2. The status message, first, so its id is stored with the job and survives a restart.
        status = await self._say(message, "⏳ Queuing…")
        # A permutation prompt's further jobs send their results as replies of their own.
        requester = replace(requester, reply_to={**requester.reply_to, "status_message_id": status.message_id},
                            reply_to_others=requester.reply_to)
        # 3. Submit under the message's idempotency key.
        await self._submit(status, lambda: self.core.service.submit(
            requester, command, inputs, idempotency_key=key, fingerprint=FINGERPRINT))

    async def _submit(self, status: Message, submit: Any) -> JobView | None:
        """Run a submit and show its outcome in the status message."""
        try:
            result = await submit()
        except EaselError as error:
            await self.board.settle(status.chat.id, status.message_id, render.error_text(error.message))
            return None
        if result.replayed:
            await self.board.settle(status.chat.id, status.message_id,
                                    f"This was already received as job {result.job.id}.")
            return result.job
        text = render.queued_text(result.job.id, result.position)
        if result.others:
            text += f"\n+ {len(result.others)} more job(s), one per {{...}} option: " + \
                ", ".join(other.job.id for other in result.others)
        self.board.show(status.chat.id, status.message_id, text)
        return result.job

    # -- buttons ----------------------------------------------------------------------------------

    async def _on_button(self, update: Update, context: CallbackContext) -> None:
        query = update.callback_query
        assert query is not None
        press = render.parse_callback(query.data)
        message = query.message
        if press is None or not isinstance(message, Message):
            await query.answer("This button no longer works; send the command again.")
            return
        refusal = self._refusal(message.chat)
        if refusal is not None:
            await query.answer(refusal[:200], show_alert=True)
            return
        requester = await self._requester(query.from_user, message.chat, message)
        try:
            if press.action == "info":
                await query.answer()
                await self._say(message, render.describe_job(self.core.deliveries.of_job(
                    await self.core.service.get_job(press.job_id))))
                return
            key = f"tg:callback:{query.id}"
            earlier = await earlier_job(self.core.service, requester, key)
            if earlier is not None:
                await query.answer(f"Already queued as job {earlier.id}")
                return
            await query.answer(f"{press.action.capitalize()} of job {press.job_id}…")
            status = await self._say(message, f"⏳ Queuing a {press.action} of job {press.job_id}…")
            requester = replace(requester, reply_to={**requester.reply_to, "status_message_id": status.message_id})
            make = {"reroll": lambda: followups.reroll(self.core.service, requester, press.job_id,
                                                       idempotency_key=key),
                    "variation": lambda: followups.variation(self.core.service, requester, press.job_id,
                                                             press.index, idempotency_key=key),
                    "upscale": lambda: followups.upscale(self.core.service, requester, press.job_id,
                                                         press.index, idempotency_key=key)}[press.action]
            await self._submit(status, make)
        except EaselError as error:
            await self._say(message, render.error_text(error.message))

    # -- job events -------------------------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> bool:
        """Show one delivery; True once a final result is in front of the user.

        The delivery loop runs each job's deliveries in a lane of its own, so one chat's flood wait or
        slow upload never delays another chat's job; status edits go through the StatusBoard, which
        merges them at the chat's pace. Any error goes to the one error hook (`_on_error`) and leaves
        the job undelivered: its result is sent again on the next start.
        """
        try:
            return await self._show(delivery)
        except Exception as error:
            await self.application.process_error(delivery, error)
            return False

    async def _show(self, delivery: Delivery) -> bool:
        job = delivery.job
        chat_id = job.reply_to.get("chat_id")
        status_id = job.reply_to.get("status_message_id")
        if chat_id is None:
            return delivery.is_final  # not a job this adapter can answer
        if delivery.kind is EventKind.RELEASED:
            await self._send_results(delivery, intro=render.released_text(job))
            return False
        if not delivery.is_final:
            text = render.status_text(delivery)
            if text is not None and status_id is not None:
                self.board.show(chat_id, status_id, text, render.status_rank(delivery))
            return False
        final = render.final_text(delivery)
        try:
            if status_id is not None:
                await self.board.settle(chat_id, status_id, final)
            elif delivery.kind is not EventKind.DONE or not delivery.images:
                await self._send_text(chat_id, final, job.reply_to)
            if delivery.images:
                await self._send_results(delivery)
        except (Forbidden, BadRequest) as error:
            # The bot was removed from the chat, or the chat is gone: this result can never be shown.
            log.warning("cannot deliver job %s to chat %s: %s", job.id, chat_id, error)
        return True

    async def _send_results(self, delivery: Delivery, intro: str = "") -> None:
        """The images that may be shown, flagged ones behind Telegram's spoiler, with their buttons."""
        job, images = delivery.job, delivery.images
        chat_id, target = job.reply_to["chat_id"], job.reply_to
        pictures = [(image, self.core.store.read_bytes(image.sha256)) for image in images]
        buttons = render.result_buttons(job, images)
        where = self._where(target)
        bot = self.application.bot

        def caption(image: ShownImage) -> str:
            text = render.photo_caption(job, image, first=image is images[0])
            return f"{intro}\n{text}"[: render.MAX_CAPTION] if intro and image is images[0] else text

        if len(pictures) == 1:
            image, data = pictures[0]
            await bot.send_photo(chat_id, data, caption=caption(image), reply_markup=buttons,
                                 has_spoiler=image.spoiler, **where)
        else:
            album = await bot.send_media_group(chat_id, [
                InputMediaPhoto(data, caption=caption(image), has_spoiler=image.spoiler)
                for image, data in pictures], **where)
            # An album cannot carry buttons: they go on a message right under it.
            await bot.send_message(chat_id, render.album_summary(job, images), reply_markup=buttons,
                                   **self._where({**target, "message_id": album[0].message_id}))
        # A document has no spoiler in Telegram: a flagged image is never sent as a file.
        files = [(image, data) for image, data in pictures if not image.spoiler]
        if self.config.send_png_files and files:
            await self._send_png_files(job, files, where)

    async def _send_png_files(self, job: JobView, pictures: list, where: dict[str, Any]) -> None:
        chat_id = job.reply_to["chat_id"]
        files = [InputFile(data, filename=render.png_filename(job, image)) for image, data in pictures]
        if len(files) == 1:
            await self.application.bot.send_document(
                chat_id, files[0], caption=f"Lossless PNG · seed {pictures[0][0].seed}", **where)
            return
        await self.application.bot.send_media_group(chat_id, [
            InputMediaDocument(file, caption=f"seed {image.seed}") for file, (image, _) in zip(
                files, pictures, strict=True)], **where)

    # -- sending ----------------------------------------------------------------------------------

    async def _say(self, message: Message, text: str) -> Message:
        """Answer a message (in its forum topic, if any); the ChatPacer keeps it to the chat's pace."""
        target = {"chat_id": message.chat.id, "message_id": message.message_id,
                  "thread_id": message.message_thread_id if message.is_topic_message else None}
        return await self._send_text(message.chat.id, text, target)

    async def _send_text(self, chat_id: int, text: str, target: dict[str, Any]) -> Message:
        return await self.application.bot.send_message(chat_id, text[: render.MAX_TEXT], **self._where(target))

    @staticmethod
    def _where(target: dict[str, Any]) -> dict[str, Any]:
        """send_* arguments that answer the message in `target` (a job's reply_to)."""
        where: dict[str, Any] = {}
        if target.get("message_id") is not None:
            # The answer still arrives when the user has deleted their message meanwhile.
            where["reply_parameters"] = ReplyParameters(target["message_id"], allow_sending_without_reply=True)
        if target.get("thread_id") is not None:
            where["message_thread_id"] = target["thread_id"]
        return where

    # -- policy -----------------------------------------------------------------------------------

    def _refusal(self, chat: Chat) -> str | None:
        """Why the bot does not serve this chat, or None when it does (telegram.* settings)."""
        if chat.type == ChatType.PRIVATE:
            return None if self.config.private_chats else "Easel answers in groups only."
        if chat.type in GROUP_TYPES and (not self.config.allowed_chats or chat.id in self.config.allowed_chats):
            return None
        return (f"Easel is not enabled in this chat; its operator can add chat id {chat.id} to "
                "telegram.allowed_chats.")

    async def _requester(self, user: User, chat: Chat, message: Message) -> Requester:
        return Requester(
            platform=PLATFORM,
            user_id=str(user.id),
            display_name=user.full_name or user.username or str(user.id),
            reply_to={"chat_id": chat.id, "message_id": message.message_id,
                      "thread_id": message.message_thread_id if message.is_topic_message else None},
            is_platform_moderator=await self._is_moderator(user, chat),
            nsfw_allowed_here=chat.id in self.config.nsfw_chats,
        )

    async def _is_moderator(self, user: User, chat: Chat) -> bool:
        if user.id in self.config.admins:
            return True
        if not self.config.group_admins_moderate or chat.type not in GROUP_TYPES:
            return False
        cached = self._admins.get(chat.id)
        if cached is None or cached[0] < time.monotonic():
            try:
                members = await self.application.bot.get_chat_administrators(chat.id)
            except TelegramError as error:
                log.warning("cannot list the administrators of chat %s: %s", chat.id, error)
                return False
            cached = (time.monotonic() + ADMIN_CACHE_S, frozenset(member.user.id for member in members))
            self._admins[chat.id] = cached
        return user.id in cached[1]

    def _help(self) -> str:
        return self.core.parser.help_text() + "\n\n" + render.TELEGRAM_HELP

    # -- the one error hook -----------------------------------------------------------------------

    async def _on_error(self, update: object, context: CallbackContext) -> None:
        """Every error of this adapter ends here: a handler's (with its `Update`), a status edit's
        (an `Application.create_task` task, no update) and a delivery's (with its `Delivery`)."""
        if isinstance(update, Delivery):
            # Not marked delivered: a final result is sent again on the next start.
            log.error("showing the %s event of job %s failed", update.kind.value, update.job.id, exc_info=context.error)
            return
        if update is None:
            log.error("a Telegram background task failed", exc_info=context.error)
            return
        log.error("Telegram update %s failed", getattr(update, "update_id", "?"), exc_info=context.error)
        if isinstance(update, Update) and update.effective_message is not None:
            with contextlib.suppress(TelegramError):
                await self._say(update.effective_message,
                                "Sorry, something went wrong on our side; it has been logged. Please try again.")


def _keep_token_out_of_logs() -> None:
    """httpx logs every request URL at INFO, and python-telegram-bot logs its API URL at DEBUG: both
    hold the bot token. Keep those loggers above those levels, so `--debug` never prints the token."""
    for name, level in (("httpx", logging.WARNING), ("telegram", logging.INFO)):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < level:
            logger.setLevel(level)
