"""The Discord adapter: slash commands and buttons in, job events rendered back as edited messages.

`EaselCog` is the one implementation of Easel on Discord: a discord.py Cog with the slash commands,
the result buttons and the delivery loop. It runs on any `commands.Bot`:

    adapter = DiscordAdapter(core)       # `easel serve`: a bot of Easel's own with the cog, when discord.token is set
    await adapter.run(stop)              # log in, connect, deliver job events until `stop` is set
    await adapter.sync_commands(guild)   # `easel discord sync [--guild ID]`: register the commands

    await bot.add_cog(EaselCog(bot, core))               # inside someone else's bot (a plugin), or
    await bot.load_extension("adapters.discord_plugin")  # the same as a discord.py extension

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
from discord.ext import commands

from adapters.discord_render import (
    COG_NAME,
    MAX_CONTENT_CHARS,
    JobButton,
    cancelled_text,
    done_text,
    error_text,
    failed_text,
    handoff_text,
    info_text,
    jobs_text,
    listing_text,
    pack_results,
    progress_text,
    queued_text,
    released_text,
    result_view,
    started_text,
)
from adapters.discord_reply import Replier, ReplyTarget
from bot import followups
from bot.animation import CLIP_NAME
from bot.bootstrap import Core
from bot.config import LimitsConfig
from bot.delivery import Delivery, deliver_events
from bot.domain import (
    SAMPLERS,
    TEACH_KINDS,
    InputImages,
    JobKind,
    JobsCommand,
    Requester,
    TeachCommand,
    TrainingPicture,
)
from bot.errors import ConfigError, EaselError, InvalidImage, Refused
from bot.events import EventKind
from bot.policy import describe_quota
from bot.service import SubmitResult
from bot.styles import describe_styles, style_flag

PLATFORM = "discord"
log = logging.getLogger("easel.discord")

# Slash command options and the grammar flag each one becomes. `negative` comes last: --no takes
# every word up to the next flag.
OPTION_FLAGS: dict[str, str] = {
    "seed": "seed", "steps": "steps", "cfg": "cfg", "aspect": "ar", "count": "n", "sampler": "sampler",
    "model": "model", "strength": "strength", "style": "style", "zoom": "zoom", "left": "left", "right": "right",
    "up": "up", "down": "down", "frames": "frames", "fps": "fps", "pan": "pan", "rotate": "rotate",
    "negative": "no",
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
    "style": "a style from /styles (--style; more with --style in the prompt)",
}
# /outpaint's options: no --ar (its size is the picture's plus the border), and a prompt it may leave out.
_OUTPAINT_HELP = {
    **{name: text for name, text in _GENERATION_HELP.items() if name != "aspect"},
    "image": "the picture to paint around",
    "prompt": "what to paint; left out, the prompt of the Easel job that made the picture",
    "zoom": "grow the canvas 1.1 to 4 times each way, the picture in the middle (--zoom)",
    "left": "pixels to add on the left, a multiple of 8 (--left)",
    "right": "pixels to add on the right (--right)",
    "up": "pixels to add above (--up)",
    "down": "pixels to add below (--down)",
    "strength": "how freely to paint the new border, 0 to 1 (--strength)",
}
# /animate's options: the clip and the camera; a picture, if attached, is the first frame.
_ANIMATE_HELP = {
    **{name: text for name, text in _GENERATION_HELP.items() if name != "count"},
    "prompt": "what to draw; keyframes change it: 0: a forest | 12: a city",
    "frames": "frames in the clip (--frames)",
    "fps": "frames a second (--fps)",
    "zoom": "scale per frame, 0.8 to 1.25: above 1 moves in (--zoom)",
    "pan": "pixels per frame right,down, e.g. 2,0 (--pan)",
    "rotate": "degrees per frame, -15 to 15 (--rotate)",
    "image": "a picture to start from (optional)",
    "strength": "how much each frame redraws the one before, 0 to 1 (--strength)",
}


class EaselCog(commands.Cog, name=COG_NAME):
    """Easel's slash commands, result buttons and job deliveries, on any discord.py `commands.Bot`.

        await bot.add_cog(EaselCog(bot, core))  # best in setup_hook: returns once job events are followed

    Adding it puts the commands in `bot.tree` beside the bot's own (sync the tree as usual), registers
    the buttons (`bot.add_dynamic_items`) and starts the delivery loop; removing it, unloading
    adapters.discord_plugin or closing the bot stops the loop. Added before the bot logs in, it
    starts delivering once the bot is ready, and holds interactions until then.
    """

    def __init__(self, bot: commands.Bot, core: Core, *, clock: Callable[[], float] = time.time,
                 owns_core: bool = False) -> None:
        """`owns_core`: close `core` when the cog is removed (the extension opened it)."""
        self.bot = bot
        self.core = core
        self.config = core.settings.discord
        self.clock = clock
        self.owns_core = owns_core
        self.replier = Replier(bot, self.config.token_margin_s, clock)
        self.delivery: asyncio.Task[None] | None = None  # the delivery loop, while the cog is loaded
        self._last_edit: dict[str, float] = {}  # job id -> when its message was last edited
        self._stop = asyncio.Event()
        self._following = asyncio.Event()  # set once every new job event is sure to be delivered
        self._start_awaited = False  # whether cog_load waits for (and raises) a failed start

    # -- loading and unloading ------------------------------------------------------------------

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(JobButton)
        self._stop.clear()
        self._following.clear()
        # Logged in (setup_hook, or a running bot): wait here, so the bot takes no interaction before
        # every new job event is sure to be followed, and a start that fails fails add_cog.
        self._start_awaited = self.bot.user is not None
        self.delivery = asyncio.create_task(self._deliver(), name="easel-discord-delivery")
        if self._start_awaited:
            await self._until_following()
            if self.delivery.done():
                self.bot.remove_dynamic_items(JobButton)
                self.delivery.result()  # raises why it stopped

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(JobButton)
        self._stop.set()
        if self.delivery is not None:
            if not self._following.is_set():
                self.delivery.cancel()  # still waiting for the bot to be ready
            await asyncio.gather(self.delivery, return_exceptions=True)  # an error was logged in _deliver
        if self.owns_core:
            await self.core.close()

    async def _deliver(self) -> None:
        try:
            if self.bot.user is None:
                await self.bot.wait_until_ready()  # Discord's API needs the bot logged in
            await deliver_events(self.core.service, self.core.deliveries, PLATFORM, self.deliver, self._stop,
                                 ready=self._following, concurrency=self.core.settings.delivery.concurrency)
        except Exception:
            if self._following.is_set() or not self._start_awaited:  # nobody else will hear of it
                log.exception("Easel's Discord delivery loop stopped; undelivered results are sent after "
                              "the next start")
            raise

    async def _until_following(self) -> None:
        """Return once new job events are followed (or the delivery loop has stopped)."""
        if self._following.is_set() or self.delivery is None or self.delivery.done():
            return
        following = asyncio.ensure_future(self._following.wait())
        await asyncio.wait({following, self.delivery}, return_when=asyncio.FIRST_COMPLETED)
        following.cancel()

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        """Every Easel command waits until job events are followed (only ever waits when the cog was
        added before the bot logged in), so a job's first events are never missed."""
        await self._until_following()
        return True

    # -- the slash commands ---------------------------------------------------------------------

    @app_commands.command(name="imagine", description="Make images from a prompt")
    @app_commands.describe(**_GENERATION_HELP)
    async def imagine(self, interaction: discord.Interaction, prompt: str, negative: str | None = None,
                      seed: int | None = None, steps: int | None = None, cfg: float | None = None,
                      aspect: str | None = None, count: int | None = None, sampler: str | None = None,
                      model: str | None = None, style: str | None = None) -> None:
        options = {"negative": negative, "seed": seed, "steps": steps, "cfg": cfg, "aspect": aspect,
                   "count": count, "sampler": sampler, "model": model, "style": style}
        await self.generate(interaction, JobKind.IMAGINE, prompt, options)

    @app_commands.command(name="edit", description="Repaint an attached picture guided by a prompt")
    @app_commands.describe(image="the picture to start from", strength="how much to change, 0 to 1 (--strength)",
                           **_GENERATION_HELP)
    async def edit(self, interaction: discord.Interaction, image: discord.Attachment, prompt: str,
                   strength: float | None = None, negative: str | None = None, seed: int | None = None,
                   steps: int | None = None, cfg: float | None = None, aspect: str | None = None,
                   count: int | None = None, sampler: str | None = None, model: str | None = None,
                   style: str | None = None) -> None:
        options = {"strength": strength, "negative": negative, "seed": seed, "steps": steps, "cfg": cfg,
                   "aspect": aspect, "count": count, "sampler": sampler, "model": model, "style": style}
        await self.generate(interaction, JobKind.EDIT, prompt, options, image=image)

    @app_commands.command(name="inpaint", description="Repaint the white parts of a mask")
    @app_commands.describe(image="the picture", mask="white = repaint, black = keep (same shape as the picture)",
                           strength="how much to change, 0 to 1 (--strength)", **_GENERATION_HELP)
    async def inpaint(self, interaction: discord.Interaction, image: discord.Attachment, mask: discord.Attachment,
                      prompt: str, strength: float | None = None, negative: str | None = None,
                      seed: int | None = None, steps: int | None = None, cfg: float | None = None,
                      aspect: str | None = None, count: int | None = None, sampler: str | None = None,
                      model: str | None = None, style: str | None = None) -> None:
        options = {"strength": strength, "negative": negative, "seed": seed, "steps": steps, "cfg": cfg,
                   "aspect": aspect, "count": count, "sampler": sampler, "model": model, "style": style}
        await self.generate(interaction, JobKind.INPAINT, prompt, options, image=image, mask=mask)

    @app_commands.command(name="outpaint", description="Paint more around an attached picture: zoom out, or extend it")
    @app_commands.describe(**_OUTPAINT_HELP)
    async def outpaint(self, interaction: discord.Interaction, image: discord.Attachment, prompt: str = "",
                       zoom: float | None = None, left: int | None = None, right: int | None = None,
                       up: int | None = None, down: int | None = None, strength: float | None = None,
                       negative: str | None = None, seed: int | None = None, steps: int | None = None,
                       cfg: float | None = None, count: int | None = None, sampler: str | None = None,
                       model: str | None = None, style: str | None = None) -> None:
        options = {"zoom": zoom, "left": left, "right": right, "up": up, "down": down, "strength": strength,
                   "negative": negative, "seed": seed, "steps": steps, "cfg": cfg, "count": count, "sampler": sampler,
                   "model": model, "style": style}
        await self.generate(interaction, JobKind.OUTPAINT, prompt, options, image=image)

    @app_commands.command(name="animate", description="A short video: each frame moves and redraws the one before")
    @app_commands.describe(**_ANIMATE_HELP)
    async def animate(self, interaction: discord.Interaction, prompt: str, frames: int | None = None,
                      fps: int | None = None, zoom: float | None = None, pan: str | None = None,
                      rotate: float | None = None, image: discord.Attachment | None = None,
                      strength: float | None = None, negative: str | None = None, seed: int | None = None,
                      steps: int | None = None, cfg: float | None = None, aspect: str | None = None,
                      sampler: str | None = None, model: str | None = None, style: str | None = None) -> None:
        options = {"frames": frames, "fps": fps, "zoom": zoom, "pan": pan, "rotate": rotate, "strength": strength,
                   "negative": negative, "seed": seed, "steps": steps, "cfg": cfg, "aspect": aspect,
                   "sampler": sampler, "model": model, "style": style}
        await self.generate(interaction, JobKind.ANIMATE, prompt, options, image=image)

    @imagine.autocomplete("model")
    @edit.autocomplete("model")
    @inpaint.autocomplete("model")
    @outpaint.autocomplete("model")
    @animate.autocomplete("model")
    async def complete_model(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return _choices([model.name for model in self.core.catalog.list() if model.usable], current)

    @imagine.autocomplete("style")
    @edit.autocomplete("style")
    @inpaint.autocomplete("style")
    @outpaint.autocomplete("style")
    @animate.autocomplete("style")
    async def complete_style(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return _choices([style_flag(style.name) for style in self.core.parser.styles.styles()], current)

    @imagine.autocomplete("sampler")
    @edit.autocomplete("sampler")
    @inpaint.autocomplete("sampler")
    @outpaint.autocomplete("sampler")
    @animate.autocomplete("sampler")
    async def complete_sampler(self, interaction: discord.Interaction,
                               current: str) -> list[app_commands.Choice[str]]:
        return _choices(SAMPLERS, current)

    @app_commands.command(name="teach", description="Teach a new word from 3 to 10 of your pictures")
    @app_commands.describe(word="the new word: what calls it in a prompt, and its <lora:NAME>",
                           picture1="a picture to learn from", picture2="another", picture3="another",
                           steps="training steps (--steps)", rank="LoRA rank (--rank)",
                           trigger="the word that calls it, if not the name (--trigger)",
                           caption="what the pictures show, with the word in it (one caption for all)",
                           kind="lora (default) or embedding: a new word for what the model already draws (--kind)")
    @app_commands.choices(kind=[app_commands.Choice(name=kind, value=kind) for kind in TEACH_KINDS])
    async def teach(self, interaction: discord.Interaction, word: str, picture1: discord.Attachment,
                    picture2: discord.Attachment, picture3: discord.Attachment,
                    picture4: discord.Attachment | None = None, picture5: discord.Attachment | None = None,
                    picture6: discord.Attachment | None = None, picture7: discord.Attachment | None = None,
                    picture8: discord.Attachment | None = None, picture9: discord.Attachment | None = None,
                    picture10: discord.Attachment | None = None, steps: int | None = None, rank: int | None = None,
                    trigger: str | None = None, caption: str | None = None, kind: str = "lora") -> None:
        attachments = [picture for picture in (picture1, picture2, picture3, picture4, picture5, picture6,
                                               picture7, picture8, picture9, picture10) if picture is not None]
        command = TeachCommand(name=word, kind=kind, steps=steps, rank=rank, trigger=trigger, caption=caption or "")
        try:
            self.core.teach.check_command(command)
            for number, attachment in enumerate(attachments, 1):
                check_attachment(attachment, self.core.settings.limits, f"picture {number}")
        except EaselError as error:
            await interaction.response.send_message(error_text(error.message), ephemeral=True)
            return

        async def submit(requester: Requester) -> object:
            pictures = [TrainingPicture(await _download(attachment, f"picture {number}"), "", attachment.filename)
                        for number, attachment in enumerate(attachments, 1)]
            return await self.core.teach.submit(requester, command, pictures)

        await self._deferred_submit(interaction, submit)

    @app_commands.command(name="quota", description="How many images you have left today")
    async def quota(self, interaction: discord.Interaction) -> None:
        async def answer() -> str:
            return describe_quota(await self.core.service.quota(self.requester(interaction)))

        await self._deferred_answer(interaction, answer)

    @app_commands.command(name="job", description="A job's settings, seeds and status")
    @app_commands.describe(id="the job id, e.g. k7mq2x9a")
    async def job(self, interaction: discord.Interaction, id: str) -> None:
        await self._job_info(interaction, id)

    @app_commands.command(name="jobs", description="Your recent jobs, newest first")
    async def jobs(self, interaction: discord.Interaction) -> None:
        async def answer() -> str:
            return jobs_text(await self.core.service.list_jobs(JobsCommand().limit, self.requester(interaction)))

        await self._deferred_answer(interaction, answer)

    @app_commands.command(name="loras", description="The installed LoRAs and embeddings, and what each is for")
    async def loras(self, interaction: discord.Interaction) -> None:
        async def answer() -> str:
            return listing_text(self.core.parser.networks.listing())

        await self._deferred_answer(interaction, answer)

    @app_commands.command(name="styles", description="The styles --style NAME puts a prompt into")
    async def styles(self, interaction: discord.Interaction) -> None:
        await self._answer_in_code_blocks(interaction, describe_styles(self.core.parser.styles.styles()))

    @app_commands.command(name="cancel", description="Cancel a job; without an id, your newest unfinished one")
    @app_commands.describe(id="the job id (optional)")
    async def cancel(self, interaction: discord.Interaction, id: str | None = None) -> None:
        async def answer() -> str:
            job = await self.core.service.cancel(self.requester(interaction), id)
            return f"Job `{job.id}` cancelled."

        await self._deferred_answer(interaction, answer)

    @app_commands.command(name="help", description="Commands, flags, limits and examples")
    async def help_(self, interaction: discord.Interaction) -> None:
        """The grammar's /help, in as many private messages as Discord's 2000 characters need."""
        await self._answer_in_code_blocks(interaction, self.core.parser.help_text())

    @app_commands.command(name="models", description="The models: family, size, default settings, what each is for")
    async def models(self, interaction: discord.Interaction) -> None:
        """bot/catalog.py's /models answer (the checkpoints folder read again), privately."""
        await self._answer_in_code_blocks(interaction, self.core.catalog.describe())

    async def cog_app_command_error(self, interaction: discord.Interaction,  # type: ignore[override]
                                    error: app_commands.AppCommandError) -> None:
        # The commands' one error hook (the host bot's tree.on_error stays its own): a bug is logged, and
        # the user hears that something failed on our side.
        log.error("Discord command failed", exc_info=error)
        await _tell_failure(interaction)

    # -- what the commands do -------------------------------------------------------------------

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

    async def _job_info(self, interaction: discord.Interaction, job_id: str) -> None:
        async def answer() -> str:
            return info_text(self.core.deliveries.of_job(await self.core.service.get_job(job_id)))

        await self._deferred_answer(interaction, answer)

    async def button_pressed(self, interaction: discord.Interaction, action: str, job_id: str,
                             index: int | None) -> None:
        """Re-roll, Variations, Upscale, Zoom out and the pans make a new job for the presser; Info and Delete
        act on this one."""
        try:
            await self._until_following()
            await self._button(interaction, action, job_id, index)
        except Exception:
            # The buttons' error hook, as cog_app_command_error is the commands': log, and tell the user.
            log.exception("Discord button %s on job %s failed", action, job_id)
            await _tell_failure(interaction)

    async def _button(self, interaction: discord.Interaction, action: str, job_id: str, index: int | None) -> None:
        if action == "info":
            await self._job_info(interaction, job_id)
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
        elif action in followups.REFRAMES:
            await self._deferred_submit(
                interaction, lambda who: followups.reframe(self.core.service, who, job_id, index or 0, action))

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
                               submit: Callable[[Requester], Awaitable[object]]) -> None:
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

    async def _answer_in_code_blocks(self, interaction: discord.Interaction, text: str) -> None:
        """A long answer to the user alone, as code blocks of whole lines in as many messages as it needs."""
        parts = _code_blocks(text)

        async def answer() -> str:
            return parts[0]

        await self._deferred_answer(interaction, answer)
        for part in parts[1:]:
            await interaction.followup.send(part, ephemeral=True)

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
        # A permutation prompt's further jobs post results of their own rather than edit this message.
        others = {**target.as_dict(), "message_id": None} if target else None
        return Requester(platform=PLATFORM, user_id=str(user.id), display_name=user.display_name,
                         reply_to=target.as_dict() if target else {}, reply_to_others=others,
                         is_platform_moderator=moderator,
                         nsfw_allowed_here=self.config.nsfw == "nsfw_channels" and nsfw_channel)

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
            text = progress_text(job, delivery.step, delivery.total, delivery.loss, delivery.eta_s)
        self._last_edit[job.id] = now
        await self.replier.edit(target, text)

    async def _show_images(self, delivery: Delivery, target: ReplyTarget, intro: str = "") -> None:
        """The images that may be shown, with their seeds and buttons (flagged ones as spoilers), and
        why any others are missing: in the response message, else in the channel. A release after an
        appeal (`intro`) always goes to the channel as a new message."""
        job = delivery.job
        pngs = [(image, self.core.store.read_bytes(image.sha256)) for image in delivery.images]
        clip = None
        if job.params.motion is not None and delivery.images:  # an /animate clip goes where its poster may
            clip = self.core.store.read_job_file(job.id, CLIP_NAME)
        packed = pack_results(job, pngs, target.upload_limit, clip)
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


class EaselBot(commands.Bot):
    """The bot `easel serve` runs when Easel is the whole bot: EaselCog and nothing else."""

    def __init__(self) -> None:
        # Easel never joins voice: silence discord.py's start-up warnings about voice libraries.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        # No privileged intents: interactions carry the member, permissions and channel they need.
        super().__init__(command_prefix=commands.when_mentioned, intents=discord.Intents(guilds=True),
                         help_command=None)


class DiscordAdapter:
    """Easel as a Discord bot of its own: `EaselCog` on an `EaselBot`, logged in with discord.token."""

    platform = PLATFORM

    def __init__(self, core: Core, *, gateway: bool = True, clock: Callable[[], float] = time.time) -> None:
        """`gateway=False` logs in over HTTP only: tests feed interactions to the client's state."""
        self.core = core
        self.config = core.settings.discord
        self.gateway = gateway
        self.client = EaselBot()
        self.cog = EaselCog(self.client, core, clock=clock)
        self.ready = asyncio.Event()  # set once logged in and following job events

    async def run(self, stop: asyncio.Event) -> None:
        """Log in, listen (gateway), and deliver job events until `stop` is set."""
        async with self.client:
            await self._login()
            await self.client.add_cog(self.cog)  # returns once new job events are sure to be followed
            self.ready.set()
            assert self.cog.delivery is not None
            tasks = [asyncio.ensure_future(stop.wait()), self.cog.delivery]
            if self.gateway:
                tasks.append(asyncio.create_task(self.client.connect(), name="easel-discord-gateway"))
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # raise why the delivery loop or the gateway stopped
            finally:
                await self.client.remove_cog(COG_NAME)  # stops delivering; deliveries in flight finish
                await self.client.close()  # ends connect()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def sync_commands(self, guild_id: int | None = None) -> list[str]:
        """Register the slash commands: in one server at once with `guild_id`, else globally."""
        async with self.client:
            await self._login()
            for command in self.cog.get_app_commands():  # the commands alone: no delivery loop
                self.client.tree.add_command(command)
            guild = discord.Object(id=guild_id) if guild_id is not None else None
            if guild is not None:
                self.client.tree.copy_global_to(guild=guild)
            synced = await self.client.tree.sync(guild=guild)
        return [command.name for command in synced]

    async def _login(self) -> None:
        if self.config.token is None:
            raise ConfigError("discord.token is not set; set the DISCORD_TOKEN environment variable")
        try:
            await self.client.login(self.config.token.get_secret_value())
        except discord.LoginFailure:
            raise ConfigError("Discord refused the bot token (discord.token / DISCORD_TOKEN); copy it again "
                              "from the Bot page of your application in the Developer Portal") from None


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
