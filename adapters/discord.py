"""The Discord adapter: slash commands and buttons in, job events rendered back as edited messages.

    adapter = DiscordAdapter(core)       # `easel serve` builds it when discord.token is set
    await adapter.run(stop)              # log in, connect, deliver job events until `stop` is set
    await adapter.sync_commands(guild)   # `easel discord sync [--guild ID]`: register the commands

Translation only: command options become the grammar's flags (so `/imagine prompt:a cat steps:500`
fails with the same message as `/imagine a cat --steps 500`), attachments go to the job service,
and every job event is shown by editing the command's response (queue position, progress, the
images with their seeds and buttons). The interaction is deferred at once; when its 15-minute token
runs out, results go to the channel instead (adapters/discord_reply.py). Buttons carry the job id in
their custom id (adapters/discord_render.py), so they work after a restart, and results finished
while the bot was down are delivered when it starts again (bot/delivery.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import discord
from discord import app_commands

from adapters.discord_render import (
    MAX_CONTENT_CHARS,
    JobButton,
    cancelled_text,
    done_text,
    error_text,
    failed_text,
    handoff_text,
    info_text,
    jobs_text,
    pack_results,
    progress_text,
    queued_text,
    released_text,
    result_view,
    started_text,
)
from adapters.discord_reply import Replier, ReplyTarget
from bot import followups
from bot.bootstrap import Core
from bot.config import LimitsConfig
from bot.delivery import Delivery, deliver_events
from bot.domain import SAMPLERS, InputImages, JobKind, JobsCommand, Requester
from bot.errors import ConfigError, EaselError, InvalidImage, Refused
from bot.events import EventKind
from bot.policy import describe_quota
from bot.service import SubmitResult

PLATFORM = "discord"
log = logging.getLogger("easel.discord")

# Slash command options and the grammar flag each one becomes. `negative` comes last: --no takes
# every word up to the next flag.
OPTION_FLAGS: dict[str, str] = {
    "seed": "seed", "steps": "steps", "cfg": "cfg", "aspect": "ar", "count": "n", "sampler": "sampler",
    "model": "model", "strength": "strength", "negative": "no",
}


def command_text(prompt: str, options: Mapping[str, object]) -> str:
    """The prompt followed by the given options as flags: what the grammar parses.

    >>> command_text("a cat --seed 5", {"steps": 30, "negative": "blurry, text", "cfg": None})
    'a cat --seed 5 --steps 30 --no blurry, text'
    """
    words = [prompt]
    for option, flag in OPTION_FLAGS.items():
        value = options.get(option)
        if value is None:
            continue
        # One word per flag value (a stray space in "16: 9" must not spill into the prompt); --no keeps its words.
        text = " ".join(str(value).split()) if flag == "no" else "".join(str(value).split())
        if text:
            words.append(f"--{flag} {text}")
    return " ".join(words)


def check_attachment(attachment: discord.Attachment, limits: LimitsConfig, what: str) -> None:
    """What Discord tells before the download: the size and the declared type. Decoding comes after."""
    if attachment.size > limits.max_upload_bytes:
        raise InvalidImage(f"the {what} is {_megabytes(attachment.size)}; the limit is "
                           f"{_megabytes(limits.max_upload_bytes)}; send a smaller or more compressed file")
    if attachment.content_type and not attachment.content_type.startswith("image/"):
        raise InvalidImage(f"the {what} is a {attachment.content_type} file, not a picture; "
                           f"attach a PNG, JPEG, WebP, GIF or BMP")


class EaselClient(discord.Client):
    """discord.py's client, knowing the adapter that answers its buttons."""

    def __init__(self, adapter: DiscordAdapter) -> None:
        # Easel never joins voice: silence discord.py's start-up warnings about voice libraries.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        # No privileged intents: interactions carry the member, permissions and channel they need.
        super().__init__(intents=discord.Intents(guilds=True))
        self.adapter = adapter

    async def job_button_pressed(self, interaction: discord.Interaction, action: str, job_id: str,
                                 index: int | None) -> None:
        await self.adapter.button_pressed(interaction, action, job_id, index)


class DiscordAdapter:
    platform = PLATFORM

    def __init__(self, core: Core, *, gateway: bool = True, clock: Callable[[], float] = time.time) -> None:
        """`gateway=False` logs in over HTTP only: tests feed interactions to the client's state."""
        self.core = core
        self.config = core.settings.discord
        self.gateway = gateway
        self.clock = clock
        self.client = EaselClient(self)
        self.client.add_dynamic_items(JobButton)
        self.tree = _build_tree(self)
        self.replier = Replier(self.client, self.config.token_margin_s, clock)
        self._last_edit: dict[str, float] = {}  # job id -> when its message was last edited
        self.ready = asyncio.Event()  # set once logged in and following job events

    # -- running --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Log in, listen (gateway), and deliver job events until `stop` is set."""
        async with self.client:
            await self._login()
            following = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                delivery = group.create_task(
                    deliver_events(self.core.service, self.core.deliveries, PLATFORM, self.deliver, stop,
                                   ready=following, concurrency=self.core.settings.delivery.concurrency),
                    name="easel-discord-delivery")
                # Take interactions only once new job events are sure to be followed.
                await asyncio.wait([delivery, group.create_task(following.wait())],
                                   return_when=asyncio.FIRST_COMPLETED)
                self.ready.set()
                if self.gateway and not delivery.done():
                    group.create_task(self.client.connect(), name="easel-discord-gateway")
                try:
                    await delivery
                finally:
                    await self.client.close()  # ends connect()

    async def sync_commands(self, guild_id: int | None = None) -> list[str]:
        """Register the slash commands: in one server at once with `guild_id`, else globally."""
        async with self.client:
            await self._login()
            guild = discord.Object(id=guild_id) if guild_id is not None else None
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
        return [command.name for command in synced]

    async def _login(self) -> None:
        if self.config.token is None:
            raise ConfigError("discord.token is not set; set the DISCORD_TOKEN environment variable")
        try:
            await self.client.login(self.config.token.get_secret_value())
        except discord.LoginFailure:
            raise ConfigError("Discord refused the bot token (discord.token / DISCORD_TOKEN); copy it again "
                              "from the Bot page of your application in the Developer Portal") from None

    # -- commands -------------------------------------------------------------------------------

    async def generate(self, interaction: discord.Interaction, kind: JobKind, prompt: str,
                       options: Mapping[str, object], image: discord.Attachment | None = None,
                       mask: discord.Attachment | None = None) -> None:
        """/imagine, /edit, /inpaint: check, defer, download, submit. The delivery loop shows the rest."""
        # 1. What needs no request: the grammar, and the attachments' sizes and types.
        try:
            command = self.core.parser.parse_generation(kind, command_text(prompt, options))
            for attachment, what in ((image, "image"), (mask, "mask")):
                if attachment is not None:
                    check_attachment(attachment, self.core.settings.limits, what)
        except EaselError as error:
            await interaction.response.send_message(error_text(error.message), ephemeral=True)
            return

        # 2. Defer (Discord waits 3 seconds for a first answer), then download and submit.
        async def submit(requester: Requester) -> SubmitResult:
            inputs = InputImages(image=await _download(image, "image") if image else None,
                                 mask=await _download(mask, "mask") if mask else None)
            return await self.core.service.submit(requester, command, inputs)

        await self._deferred_submit(interaction, submit)

    async def quota(self, interaction: discord.Interaction) -> None:
        async def answer() -> str:
            return describe_quota(await self.core.service.quota(self.requester(interaction)))

        await self._deferred_answer(interaction, answer)

    async def job(self, interaction: discord.Interaction, job_id: str) -> None:
        async def answer() -> str:
            return info_text(self.core.deliveries.of_job(await self.core.service.get_job(job_id)))

        await self._deferred_answer(interaction, answer)

    async def jobs(self, interaction: discord.Interaction) -> None:
        async def answer() -> str:
            return jobs_text(await self.core.service.list_jobs(JobsCommand().limit, self.requester(interaction)))

        await self._deferred_answer(interaction, answer)

    async def cancel(self, interaction: discord.Interaction, job_id: str | None) -> None:
        async def answer() -> str:
            job = await self.core.service.cancel(self.requester(interaction), job_id)
            return f"Job `{job.id}` cancelled."

        await self._deferred_answer(interaction, answer)

    async def help(self, interaction: discord.Interaction) -> None:
        """The grammar's /help, in as many private messages as Discord's 2000 characters need."""
        parts = _code_blocks(self.core.parser.help_text())

        async def answer() -> str:
            return parts[0]

        await self._deferred_answer(interaction, answer)
        for part in parts[1:]:
            await interaction.followup.send(part, ephemeral=True)

    async def button_pressed(self, interaction: discord.Interaction, action: str, job_id: str,
                             index: int | None) -> None:
        """Re-roll, Variations and Upscale make a new job for the presser; Info and Delete act on this one."""
        try:
            await self._button(interaction, action, job_id, index)
        except Exception:
            # The buttons' error hook, as tree.error is the commands': log, and tell the user.
            log.exception("Discord button %s on job %s failed", action, job_id)
            await _tell_failure(interaction)

    async def _button(self, interaction: discord.Interaction, action: str, job_id: str, index: int | None) -> None:
        if action == "info":
            await self.job(interaction, job_id)
        elif action == "delete":
            await self._delete(interaction, job_id)
        elif action == "reroll":
            await self._deferred_submit(interaction, lambda who: followups.reroll(self.core.service, who, job_id))
        elif action == "vary":
            await self._deferred_submit(
                interaction, lambda who: followups.variation(self.core.service, who, job_id, index or 0))
        elif action == "upscale":
            await self._deferred_submit(
                interaction, lambda who: followups.upscale(self.core.service, who, job_id, index or 0))

    async def _delete(self, interaction: discord.Interaction, job_id: str) -> None:
        """Delete a result message: its owner or a moderator only."""
        await interaction.response.defer()  # acknowledges the press; @original is the result message
        try:
            job = await self.core.service.get_job(job_id)
            requester = self.requester(interaction)
            if requester.user_id != job.user_id and not requester.is_platform_moderator:
                raise Refused(f"only the owner of job {job.id} or a moderator can delete it")
            await interaction.delete_original_response()
        except EaselError as error:
            await interaction.followup.send(error_text(error.message), ephemeral=True)

    async def _deferred_submit(self, interaction: discord.Interaction,
                               submit: Callable[[Requester], Awaitable[SubmitResult]]) -> None:
        """Defer with a public "thinking" message that becomes the job's message, then submit."""
        response = await interaction.response.defer(thinking=True)
        message_id = getattr(response, "message_id", None)
        if message_id is None:
            message_id = (await interaction.original_response()).id
        target = ReplyTarget.of(interaction, message_id)
        try:
            await submit(self.requester(interaction, target))
        except EaselError as error:
            await interaction.edit_original_response(content=error_text(error.message))
        # The delivery loop shows the queue position, progress and result from the job's events.

    async def _deferred_answer(self, interaction: discord.Interaction, answer: Callable[[], Awaitable[str]]) -> None:
        """Defer privately, then show the answer (or the error) to the user alone."""
        await interaction.response.defer(thinking=True, ephemeral=True)
        try:
            text = await answer()
        except EaselError as error:
            text = error_text(error.message)
        await interaction.edit_original_response(content=text)

    def requester(self, interaction: discord.Interaction, target: ReplyTarget | None = None) -> Requester:
        """Who pressed or typed, and what Discord says about them and the channel (for the policy layer)."""
        user = interaction.user
        role_ids = {role.id for role in getattr(user, "roles", ())}
        moderator = interaction.permissions.manage_messages or bool(role_ids & set(self.config.moderator_role_ids))
        channel = interaction.channel
        nsfw_channel = bool(channel is not None and getattr(channel, "is_nsfw", lambda: False)())
        return Requester(platform=PLATFORM, user_id=str(user.id), display_name=user.display_name,
                         reply_to=target.as_dict() if target else {}, is_platform_moderator=moderator,
                         nsfw_allowed_here=self.config.nsfw == "nsfw_channels" and nsfw_channel)

    def complete_model(self, current: str) -> list[app_commands.Choice[str]]:
        return _choices(self.core.settings.models, current)

    def complete_sampler(self, current: str) -> list[app_commands.Choice[str]]:
        return _choices(SAMPLERS, current)

    # -- delivering job events ------------------------------------------------------------------

    async def deliver(self, delivery: Delivery) -> bool:
        """Show one delivery; True once a final result is in front of the user (bot/delivery.py)."""
        job = delivery.job
        if not job.reply_to:
            return delivery.is_final  # made without a Discord message to answer (nothing to show)
        target = ReplyTarget.from_dict(job.reply_to)
        if delivery.kind is EventKind.RELEASED:
            await self._show_images(delivery, target, released_text(job))
            return False
        if not delivery.is_final:
            await self._show_progress(delivery, target)
            return False
        self._last_edit.pop(job.id, None)
        if delivery.kind is EventKind.DONE:
            await self._show_images(delivery, target)
        else:
            text = cancelled_text(job) if delivery.kind is EventKind.CANCELLED else failed_text(job, delivery.error)
            if not await self.replier.edit(target, text):
                await self.replier.post(target, f"<@{target.user_id}> {text}")
        return True

    async def _show_progress(self, delivery: Delivery, target: ReplyTarget) -> None:
        job, now = delivery.job, self.clock()
        if delivery.kind is EventKind.PROGRESS and \
                now - self._last_edit.get(job.id, -1e9) < self.config.progress_edit_every_s:
            return  # throttled: Discord rate-limits edits, and nobody reads twenty per second
        if not self.replier.token_usable(target):
            return  # the result will go to the channel; no point posting progress there
        if self.replier.seconds_left(target) < max(self.config.token_margin_s, 60):
            text = handoff_text(job)  # the last edit this token may make: say where the result will be
        elif delivery.kind is EventKind.QUEUED:
            text = queued_text(job, delivery.position or 1)
        elif delivery.kind is EventKind.STARTED:
            text = started_text(job)
        else:
            text = progress_text(job, delivery.step, delivery.total)
        self._last_edit[job.id] = now
        await self.replier.edit(target, text)

    async def _show_images(self, delivery: Delivery, target: ReplyTarget, intro: str = "") -> None:
        """The images that may be shown, with their seeds and buttons (flagged ones as spoilers), and
        why any others are missing: in the response message, else in the channel. A release after an
        appeal (`intro`) always goes to the channel as a new message."""
        job = delivery.job
        pngs = [(image, self.core.store.read_bytes(image.sha256)) for image in delivery.images]
        packed = pack_results(job, pngs, target.upload_limit)
        view = result_view(delivery)
        for number, files in enumerate(packed.messages, start=1):
            note = " ".join(part for part in (delivery.notice, packed.note) if part) if number == 1 else ""
            content = done_text(delivery, str(target.user_id), note, (number, len(packed.messages)))
            if intro:
                content = f"{intro}\n{content}"
            buttons = view if number == 1 else None
            if number == 1 and not intro and await self.replier.edit(target, content, files=files, view=buttons):
                continue
            await self.replier.post(target, content, files=files, view=buttons)


async def _download(attachment: discord.Attachment, what: str) -> bytes:
    try:
        return await attachment.read()
    except discord.HTTPException as error:
        raise InvalidImage(f"could not download the {what} from Discord (HTTP {error.status}); "
                           f"attach it again") from None


def _choices(names: Any, current: str) -> list[app_commands.Choice[str]]:
    current = current.lower()
    return [app_commands.Choice(name=name, value=name) for name in names if current in name.lower()][:25]


def _code_blocks(text: str, limit: int = MAX_CONTENT_CHARS) -> list[str]:
    """`text` as code blocks of whole lines, each message within `limit` characters."""
    room = limit - len("```\n\n```")
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line[:room]
        if blocks[-1] and sum(len(kept) + 1 for kept in blocks[-1]) + len(line) > room:
            blocks.append([])
        blocks[-1].append(line)
    return ["```\n" + "\n".join(block) + "\n```" for block in blocks]


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


# -- the slash commands ------------------------------------------------------------------------------

_GENERATION_HELP = {
    "prompt": "what to draw; flags work here too, e.g. a castle --seed 5",
    "negative": "what to keep out of the picture (--no)",
    "seed": "repeat a picture with the same seed and settings (--seed)",
    "steps": "more is slower and finer (--steps)",
    "cfg": "how closely to follow the prompt (--cfg)",
    "aspect": "aspect ratio W:H, e.g. 16:9 (--ar)",
    "count": "how many images (--n)",
    "sampler": "the sampler (--sampler)",
    "model": "the model (--model)",
}


def _build_tree(adapter: DiscordAdapter) -> app_commands.CommandTree:
    """The commands, each a thin call into the adapter. Registered with Discord by `easel discord sync`."""
    tree = app_commands.CommandTree(adapter.client)

    @tree.command(name="imagine", description="Make images from a prompt")
    @app_commands.describe(**_GENERATION_HELP)
    async def imagine(interaction: discord.Interaction, prompt: str, negative: str | None = None,
                      seed: int | None = None, steps: int | None = None, cfg: float | None = None,
                      aspect: str | None = None, count: int | None = None, sampler: str | None = None,
                      model: str | None = None) -> None:
        options = {"negative": negative, "seed": seed, "steps": steps, "cfg": cfg, "aspect": aspect,
                   "count": count, "sampler": sampler, "model": model}
        await adapter.generate(interaction, JobKind.IMAGINE, prompt, options)

    @tree.command(name="edit", description="Repaint an attached picture guided by a prompt")
    @app_commands.describe(image="the picture to start from", strength="how much to change, 0 to 1 (--strength)",
                           **_GENERATION_HELP)
    async def edit(interaction: discord.Interaction, image: discord.Attachment, prompt: str,
                   strength: float | None = None, negative: str | None = None, seed: int | None = None,
                   steps: int | None = None, cfg: float | None = None, aspect: str | None = None,
                   count: int | None = None, sampler: str | None = None, model: str | None = None) -> None:
        options = {"strength": strength, "negative": negative, "seed": seed, "steps": steps, "cfg": cfg,
                   "aspect": aspect, "count": count, "sampler": sampler, "model": model}
        await adapter.generate(interaction, JobKind.EDIT, prompt, options, image=image)

    @tree.command(name="inpaint", description="Repaint the white parts of a mask")
    @app_commands.describe(image="the picture", mask="white = repaint, black = keep (same shape as the picture)",
                           strength="how much to change, 0 to 1 (--strength)", **_GENERATION_HELP)
    async def inpaint(interaction: discord.Interaction, image: discord.Attachment, mask: discord.Attachment,
                      prompt: str, strength: float | None = None, negative: str | None = None,
                      seed: int | None = None, steps: int | None = None, cfg: float | None = None,
                      aspect: str | None = None, count: int | None = None, sampler: str | None = None,
                      model: str | None = None) -> None:
        options = {"strength": strength, "negative": negative, "seed": seed, "steps": steps, "cfg": cfg,
                   "aspect": aspect, "count": count, "sampler": sampler, "model": model}
        await adapter.generate(interaction, JobKind.INPAINT, prompt, options, image=image, mask=mask)

    for command in (imagine, edit, inpaint):
        command.autocomplete("model")(_autocomplete(adapter.complete_model))
        command.autocomplete("sampler")(_autocomplete(adapter.complete_sampler))

    @tree.command(name="quota", description="How many images you have left today")
    async def quota(interaction: discord.Interaction) -> None:
        await adapter.quota(interaction)

    @tree.command(name="job", description="A job's settings, seeds and status")
    @app_commands.describe(id="the job id, e.g. k7mq2x9a")
    async def job(interaction: discord.Interaction, id: str) -> None:
        await adapter.job(interaction, id)

    @tree.command(name="jobs", description="Your recent jobs, newest first")
    async def jobs(interaction: discord.Interaction) -> None:
        await adapter.jobs(interaction)

    @tree.command(name="cancel", description="Cancel a job; without an id, your newest unfinished one")
    @app_commands.describe(id="the job id (optional)")
    async def cancel(interaction: discord.Interaction, id: str | None = None) -> None:
        await adapter.cancel(interaction, id)

    @tree.command(name="help", description="Commands, flags, limits and examples")
    async def help_(interaction: discord.Interaction) -> None:
        await adapter.help(interaction)

    @tree.error
    async def on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        # The one error hook: a bug is logged, and the user hears that something failed on our side.
        log.error("Discord command failed", exc_info=error)
        await _tell_failure(interaction)

    return tree


async def _tell_failure(interaction: discord.Interaction) -> None:
    """After a bug: the user hears that something failed on our side (the log has the details)."""
    text = error_text("something went wrong on the bot's side; it has been logged, please try again")
    try:
        if interaction.response.is_done():
            await interaction.edit_original_response(content=text)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException:
        log.warning("could not tell the user about the failed interaction")


def _autocomplete(complete: Callable[[str], list[app_commands.Choice[str]]]) -> Any:
    async def callback(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return complete(current)

    return callback
