"""The Telegram adapter: Easel on Telegram, in private chats and groups, as a bot of its own or
inside someone else's python-telegram-bot bot.

`EaselTelegram` is the one implementation: Easel's handlers and its delivery loop on one
python-telegram-bot `Application`. Two ways to run it:

    adapter = TelegramAdapter(core)   # `easel serve` with telegram.token: a bot of Easel's own, which
    await adapter.run(stop)           # long-polls, or with telegram.webhook_url receives updates from
                                      # Easel's HTTP server (adapters/telegram_webhook.py)

    easel = add_easel(application)    # inside your bot: Easel's handlers join your Application, and its
    application.run_polling()         # lifecycle (post_init/post_stop/post_shutdown) starts and stops Easel

What it does:
- `/imagine`, `/quota`, `/job`, `/jobs`, `/cancel`, `/help`, `/appeal`, `/mod` (and, as a bot of its
  own, `/start`) in messages; `/edit` and `/inpaint` in the caption of a picture or in a reply to
  one (python-telegram-bot's CommandHandler reads only text, hence `SlashCommand`). Commands for
  another bot (`/imagine@otherbot`) are left alone, and so, inside a host bot, are the host's own.
- Each job gets one status message, sent before the job is queued so its id is stored with the
  job: it is edited with the queue position and progress (telegram_send.StatusBoard keeps to
  Telegram's pace) and says how the job ended, even after a restart.
- Results come as a photo or an album with the seeds in the captions (plus lossless PNG files when
  `telegram.send_png_files`), with Re-roll, Variations, Upscale and Info buttons whose callback
  data holds only a job id.
- A message delivered twice (Telegram redelivers updates it was never told were read) makes one
  job: its chat and message id are the job's idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any

from telegram import Chat, InputFile, InputMediaDocument, InputMediaPhoto, Message, ReplyParameters, Update, User
from telegram.constants import ChatType
from telegram.error import BadRequest, Forbidden, InvalidToken, TelegramError
from telegram.ext import Application, BaseHandler, CallbackContext, CallbackQueryHandler, MessageHandler, filters

from adapters import telegram_render as render
from adapters import telegram_webhook
from adapters.telegram_inputs import Albums, gather_inputs, gather_training_pictures
from adapters.telegram_send import ChatPacer, StatusBoard
from bot import followups
from bot.animation import CLIP_NAME
from bot.bootstrap import Core, open_core
from bot.config import Settings, load_settings
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
    TeachCommand,
)
from bot.errors import ConfigError, EaselError
from bot.events import EventKind
from bot.grammar import COMMANDS, split_command
from bot.idempotency import earlier_job
from bot.policy import describe_params, describe_quota
from bot.styles import describe_styles
from bot.views import JobView

log = logging.getLogger("easel.telegram")

PLATFORM = "telegram"
GROUP_TYPES = (ChatType.GROUP, ChatType.SUPERGROUP)
ADMIN_CACHE_S = 600.0  # how long a group's administrator list is trusted
FINGERPRINT = "telegram-message"  # the same key always means the same message: no conflicts to tell
ALLOWED_UPDATES = ["message", "callback_query"]  # what Easel asks Telegram for (polling or webhook)
PLUGIN_GROUP = 100  # inside a host bot: Easel's handler groups (this one and the next), after the host's

Callback = Callable[[Update, CallbackContext], Awaitable[None]]


class SlashCommand(BaseHandler[Update, CallbackContext, None]):
    """A slash command in a new message's text or caption, meant for this bot.

    Matches Easel's `commands`. As a bot of its own (`whole_bot`) it also takes /start, and unknown
    commands in private chats or addressed as /name@thisbot, so the user hears what went wrong;
    inside a host bot those are the host's. Commands addressed to another bot are left alone.
    """

    def __init__(self, callback: Callback, *, commands: frozenset[str], whole_bot: bool, block: bool) -> None:
        super().__init__(callback, block=block)
        self.commands = commands
        self.whole_bot = whole_bot

    def check_update(self, update: object) -> bool:
        if not isinstance(update, Update) or update.message is None:
            return False
        message = update.message
        text = message.text or message.caption or ""
        if not text.startswith("/"):
            return False
        name, addressed_to, _ = split_command(text)
        if addressed_to is not None and addressed_to.lower() != (message.get_bot().username or "").lower():
            return False
        if name in self.commands:
            return True
        return self.whole_bot and (name == "start" or addressed_to is not None
                                   or message.chat.type == ChatType.PRIVATE)


def _is_easel_button(data: object) -> bool:
    return isinstance(data, str) and render.parse_callback(data) is not None


class EaselTelegram:
    """Easel's commands, buttons and job deliveries on one python-telegram-bot `Application`.

    `handlers()` are what the Application adds; `start()` opens the core (when Easel opens its own)
    and starts the delivery loop, `stop()` ends both. TelegramAdapter and add_easel do the wiring.
    """

    def __init__(self, application: Application, settings: Settings, core: Core | None = None, *,
                 whole_bot: bool, commands: Iterable[str] = COMMANDS) -> None:
        """`core`: None opens one from `settings` at `start()` and closes it at `stop()`. `whole_bot`:
        the Application is Easel's alone (see SlashCommand). `commands`: which of Easel's to answer."""
        unknown = sorted(set(commands) - set(COMMANDS))
        if unknown:
            raise ConfigError(f"Easel has no command {', '.join('/' + name for name in unknown)}; its "
                              f"commands are {', '.join('/' + name for name in COMMANDS)}")
        self.application = application
        self.settings = settings
        self.config = settings.telegram
        self.whole_bot = whole_bot
        self.commands = frozenset(commands)
        self._core = core
        self._owns_core = core is None
        self.albums = Albums(self.config.album_wait_s)
        # The host's ChatPacer, if it installed one; otherwise the host's limiter (if any) sets the pace.
        limiter = getattr(application.bot, "rate_limiter", None)  # a plain telegram.Bot has none
        self.pacer = limiter if isinstance(limiter, ChatPacer) else ChatPacer(self.config.private_interval_s,
                                                                              self.config.group_interval_s)
        self.board = StatusBoard(application, self.pacer)
        self._admins: dict[int, tuple[float, frozenset[int]]] = {}
        self.delivery: asyncio.Task[None] | None = None  # the delivery loop, between start() and stop()
        self._stop = asyncio.Event()
        self._following = asyncio.Event()  # set once every new job event is sure to be delivered

    @property
    def core(self) -> Core:
        if self._core is None:
            raise ConfigError("Easel has not been started: call `await easel.start()` after "
                              "`application.initialize()` (run_polling and run_webhook do it for you)")
        return self._core

    def handlers(self, group: int, *, block: bool) -> dict[int, list[BaseHandler]]:
        """Easel's handlers by group, for `application.add_handlers`: the album recorder in `group`
        (it sees every picture before any command does), the commands and buttons in `group + 1`.
        `block=False` runs them beside the Application's other updates (a host bot's own may be
        handled one at a time)."""
        return {
            group: [MessageHandler(filters.PHOTO | filters.Document.ALL, self._remember_album_item)],
            group + 1: [
                SlashCommand(self._guarded(self._on_command), commands=self.commands, whole_bot=self.whole_bot,
                             block=block),
                # As a bot of its own, every button is Easel's (a stale one is answered); in a host, only Easel's.
                CallbackQueryHandler(self._guarded(self._on_button), block=block,
                                     pattern=None if self.whole_bot else _is_easel_button),
            ],
        }

    # -- running ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start delivering job events; returns once every new one is sure to be followed, so no
        command's job misses its first event. Call it after `application.initialize()`."""
        if self.delivery is not None and not self.delivery.done():
            return
        if self._core is None:
            self._core = await open_core(self.settings)
        self._stop.clear()
        self._following.clear()
        self.delivery = asyncio.create_task(self._deliver(), name="easel-telegram-delivery")
        following = asyncio.ensure_future(self._following.wait())
        await asyncio.wait({following, self.delivery}, return_when=asyncio.FIRST_COMPLETED)
        following.cancel()
        if self.delivery.done():
            await self.stop()
            self.delivery.result()  # raises why it could not start

    async def stop(self) -> None:
        """Stop delivering (deliveries in flight may finish) and close the core Easel opened. Safe to repeat."""
        self._stop.set()
        if self.delivery is not None:
            await asyncio.gather(self.delivery, return_exceptions=True)  # an error was reported in _deliver
        self.board.cancel_edits()  # a flood wait must not hold up the stop; the next start shows the state
        if self._owns_core and self._core is not None:
            await self._core.close()
            self._core = None

    async def _deliver(self) -> None:
        try:
            await deliver_events(self.core.service, self.core.deliveries, PLATFORM, self._on_delivery, self._stop,
                                 self._following, concurrency=self.settings.delivery.concurrency)
        except Exception:
            if self._following.is_set():  # after start(): nobody else awaits this task
                log.exception("Easel's Telegram delivery loop stopped; undelivered results are sent after "
                              "the next start")
            raise

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
            elif isinstance(command, TeachCommand):
                await self._teach(message, command, requester)
            elif isinstance(command, QuotaCommand) and command.teach is not None:
                estimate = await self.core.teach.estimate(requester, command.teach)
                status = await self.core.service.quota(requester)
                await self._say(message, describe_quota(replace(status, cost=estimate.cost,
                                                                cost_of=describe_params(estimate.params))))
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

    async def _teach(self, message: Message, command: TeachCommand, requester: Requester) -> None:
        """/teach NAME as the caption of an album of pictures: queue the training; its progress edits the
        status message like a picture's, and its two comparison pictures come as an album."""
        pictures = await gather_training_pictures(message.get_bot(), message, self.albums, self.core.settings.limits)
        status = await self._say(message, "⏳ Queuing…")
        requester = replace(requester, reply_to={**requester.reply_to, "status_message_id": status.message_id})
        try:
            result = await self.core.teach.submit(requester, command, pictures)
        except EaselError as error:
            await self.board.settle(status.chat.id, status.message_id, render.error_text(error.message))
            return
        self.board.show(status.chat.id, status.message_id, render.queued_text(result.job.id, result.position)
                        + f"\nTeaching {command.name!r} from {len(pictures)} pictures ({result.cost:g} units).")

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
            await query.answer(f"{press.described.capitalize()} of job {press.job_id}…")
            status = await self._say(message, f"⏳ Queuing a {press.described} of job {press.job_id}…")
            requester = replace(requester, reply_to={**requester.reply_to, "status_message_id": status.message_id})
            make = {"reroll": lambda: followups.reroll(self.core.service, requester, press.job_id,
                                                       idempotency_key=key),
                    "variation": lambda: followups.variation(self.core.service, requester, press.job_id,
                                                             press.index, idempotency_key=key),
                    "upscale": lambda: followups.upscale(self.core.service, requester, press.job_id,
                                                         press.index, idempotency_key=key),
                    **{action: lambda: followups.reframe(self.core.service, requester, press.job_id, press.index,
                                                         press.action, idempotency_key=key)
                       for action in followups.REFRAMES}}[press.action]
            await self._submit(status, make)
        except EaselError as error:
            await self._say(message, render.error_text(error.message))

    # -- job events -------------------------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> bool:
        """Show one delivery; True once a final result is in front of the user.

        The delivery loop runs each job's deliveries in a lane of its own, so one chat's flood wait or
        slow upload never delays another chat's job; status edits go through the StatusBoard, which
        merges them at the chat's pace. Any error goes to the one error hook (`report`) and leaves
        the job undelivered: its result is sent again on the next start.
        """
        try:
            return await self._show(delivery)
        except Exception as error:
            await self.report(delivery, error)
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

        if job.params.motion is not None:  # an /animate clip, shown where its poster may be: it plays inline
            image, _ = pictures[0]
            clip = self.core.store.read_job_file(job.id, CLIP_NAME)
            await bot.send_animation(chat_id, InputFile(clip, filename=f"{job.id}-seed{image.seed}.mp4"),
                                     caption=caption(image), reply_markup=buttons, has_spoiler=image.spoiler, **where)
        elif len(pictures) == 1:
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
        """Send `text`; one longer than Telegram's 4096 characters (/help) goes as several messages, split
        between lines, so nothing is cut off. Returns the first."""
        parts = render.split_text(text, render.MAX_TEXT)
        first = await self.application.bot.send_message(chat_id, parts[0], **self._where(target))
        for part in parts[1:]:
            await self.application.bot.send_message(chat_id, part, **self._where(target))
        return first

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

    def _guarded(self, callback: Callback) -> Callback:
        """`callback` with its errors sent to Easel's hook rather than the Application's error
        handlers: inside a host bot those are the host's, and Easel's hook answers only Easel's updates."""
        async def handle(update: Update, context: CallbackContext) -> None:
            try:
                await callback(update, context)
            except Exception as error:
                await self.report(update, error)

        return handle

    async def report(self, update: object, error: BaseException | None) -> None:
        """Every error of Easel on Telegram ends here: a handler's (with its `Update`), a delivery's
        (with its `Delivery`) and, in Easel's own bot, the Application's others, such as a status
        edit's (an `Application.create_task` task, no update)."""
        if isinstance(update, Delivery):
            # Not marked delivered: a final result is sent again on the next start.
            log.error("showing the %s event of job %s failed", update.kind.value, update.job.id, exc_info=error)
            return
        if update is None:
            log.error("a Telegram background task failed", exc_info=error)
            return
        log.error("Telegram update %s failed", getattr(update, "update_id", "?"), exc_info=error)
        if isinstance(update, Update) and update.effective_message is not None:
            with contextlib.suppress(TelegramError):
                await self._say(update.effective_message,
                                "Sorry, something went wrong on our side; it has been logged. Please try again.")

    async def on_application_error(self, update: object, context: CallbackContext) -> None:
        """The Application's error handler, in Easel's own bot only."""
        await self.report(update, context.error)


def add_easel(application: Application, core: Core | None = None, *, settings: Settings | None = None,
              group: int = PLUGIN_GROUP, commands: Iterable[str] = COMMANDS) -> EaselTelegram:
    """Add Easel to a python-telegram-bot Application you built, beside your own handlers:

        application = Application.builder().token(TOKEN).build()
        application.add_handler(CommandHandler("ping", ping))  # yours
        add_easel(application)                                  # /imagine, /edit, /inpaint, ... and buttons
        application.run_polling()                               # or run_webhook

    Easel's handlers go in groups `group` and `group + 1` (after yours in group 0), answer only
    Easel's `commands` and buttons, and run beside your updates. Its core is `core`, or else one
    opened from `settings` (default: Easel's config, as `easel` reads it) at start and closed at
    stop. run_polling and run_webhook start Easel after your post_init and stop it before your
    post_stop; if you run the Application by hand, call `await easel.start()` after
    `application.initialize()` and `await easel.stop()` before `application.shutdown()`.
    """
    if core is not None:
        settings = core.settings
    elif settings is None:
        settings = load_settings()
    easel = EaselTelegram(application, settings, core, whole_bot=False, commands=commands)
    application.add_handlers(easel.handlers(group, block=False))
    _start_and_stop_with(application, easel)
    return easel


def _start_and_stop_with(application: Application, easel: EaselTelegram) -> None:
    """Chain Easel into the Application's lifecycle hooks, keeping the host's own."""
    host_init, host_stop, host_shutdown = application.post_init, application.post_stop, application.post_shutdown

    async def post_init(app: Application) -> None:
        if host_init is not None:
            await host_init(app)
        await easel.start()

    async def post_stop(app: Application) -> None:
        await easel.stop()
        if host_stop is not None:
            await host_stop(app)

    async def post_shutdown(app: Application) -> None:
        await easel.stop()  # also when start-up failed and post_stop never ran
        if host_shutdown is not None:
            await host_shutdown(app)

    application.post_init, application.post_stop, application.post_shutdown = post_init, post_stop, post_shutdown


class TelegramAdapter:
    """Easel as a Telegram bot of its own (`easel serve` with telegram.token): updates by long polling,
    or, with telegram.webhook_url, posted by Telegram to Easel's HTTP server."""

    platform = PLATFORM

    def __init__(self, core: Core) -> None:
        if core.settings.telegram.token is None:
            raise ConfigError("the Telegram adapter needs telegram.token (set TELEGRAM_TOKEN)")
        self.core = core
        self.config = core.settings.telegram
        self.application = self._build_application()
        self.easel = EaselTelegram(self.application, core.settings, core, whole_bot=True)
        self.application.add_handlers(self.easel.handlers(-1, block=True))  # concurrent_updates sets the pace
        self.application.add_error_handler(self.easel.on_application_error)
        _keep_token_out_of_logs()

    def _build_application(self) -> Application:
        config = self.config
        assert config.token is not None
        return (
            Application.builder()
            .token(config.token.get_secret_value())
            .base_url(config.base_url)
            .base_file_url(config.base_file_url)
            .concurrent_updates(config.concurrent_updates)
            .get_updates_read_timeout(config.poll_timeout_s + 10)
            .media_write_timeout(120)
            # Every request keeps to Telegram's pace (telegram_send.ChatPacer).
            .rate_limiter(ChatPacer(config.private_interval_s, config.group_interval_s))
            .build()
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set: receive updates and deliver job events (missed ones first)."""
        application = self.application
        try:
            await application.initialize()  # getMe: checks the token
        except InvalidToken:
            raise ConfigError("Telegram refused telegram.token (TELEGRAM_TOKEN); copy the token from "
                              "@BotFather again") from None
        stopping = asyncio.ensure_future(stop.wait())
        try:
            # Started before deliveries, so status edits (Application.create_task) are tracked from the first.
            await application.start()
            await self.easel.start()  # take updates only once every new job event is followed
            async with self._receiving_updates():
                assert self.easel.delivery is not None
                await asyncio.wait({stopping, self.easel.delivery}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await self.easel.stop()
            if application.running:
                await application.stop()  # handles the updates already received, awaits the tasks it tracks
            await application.shutdown()
        delivery = self.easel.delivery
        if delivery is not None and not delivery.cancelled() and delivery.exception() is not None:
            raise delivery.exception()  # type: ignore[misc]

    @contextlib.asynccontextmanager
    async def _receiving_updates(self) -> AsyncIterator[None]:
        """Long polling, or with telegram.webhook_url, Telegram's posts to Easel's HTTP server."""
        application, config = self.application, self.config
        if not config.webhook_url:
            assert application.updater is not None
            await application.updater.start_polling(timeout=config.poll_timeout_s, allowed_updates=ALLOWED_UPDATES)
            log.info("Telegram bot @%s is serving (long polling)", application.bot.username)
            try:
                yield
            finally:
                if application.updater.running:
                    await application.updater.stop()
            return
        assert config.webhook_secret is not None
        with telegram_webhook.receiving(self.core, application):
            try:
                await application.bot.set_webhook(config.webhook_url, allowed_updates=ALLOWED_UPDATES,
                                                  secret_token=config.webhook_secret.get_secret_value(),
                                                  max_connections=config.webhook_max_connections)
            except BadRequest as error:
                raise ConfigError(f"Telegram refused telegram.webhook_url {config.webhook_url}: {error.message}; "
                                  "it must be an https URL Telegram can reach") from None
            log.info("Telegram bot @%s is serving (webhook %s)", application.bot.username, config.webhook_url)
            yield


def _keep_token_out_of_logs() -> None:
    """httpx logs every request URL at INFO, and python-telegram-bot logs its API URL at DEBUG: both
    hold the bot token. Keep those loggers above those levels, so `--debug` never prints the token."""
    for name, level in (("httpx", logging.WARNING), ("telegram", logging.INFO)):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < level:
            logger.setLevel(level)
