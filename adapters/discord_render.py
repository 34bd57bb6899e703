"""What Easel shows on Discord: message texts, result files that fit the upload limit, and buttons.

Nothing here talks to Discord; adapters/discord.py sends what these functions build. The buttons
are `discord.ui.DynamicItem`s whose custom id holds the action and the job id
(`easel:vary:k7mq2x9a:0`), so a press is understood by any running bot, also after a restart.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import discord
from PIL import Image

from bot.delivery import Delivery, ShownImage
from bot.domain import JobKind, lora_tags
from bot.views import JobView

MAX_CONTENT_CHARS = 2000  # Discord's limit for a message's text
MAX_FILES_PER_MESSAGE = 10  # Discord's limit for attachments on one message
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024  # what a server without boosts accepts per message
JPEG_QUALITIES = (90, 75, 60, 45)  # tried in turn when PNGs do not fit the upload limit
PROGRESS_BAR_CELLS = 10


# -- texts ----------------------------------------------------------------------------------------


def queued_text(job: JobView, position: int) -> str:
    return _clip(f"**{_prompt(job)}**\nJob `{job.id}` queued, position {position}. "
                 f"Seeds {_seeds(job)}.")


def started_text(job: JobView) -> str:
    return _clip(f"**{_prompt(job)}**\nJob `{job.id}` started.")


def progress_text(job: JobView, step: int, total: int, loss: float | None = None, eta_s: float | None = None) -> str:
    """The job's progress; a /teach training's after each slice says its loss and the time left too."""
    total = max(total, 1)
    filled = round(PROGRESS_BAR_CELLS * step / total)
    bar = "▰" * filled + "▱" * (PROGRESS_BAR_CELLS - filled)
    if loss is not None:
        return _clip(f"**Teaching {job.params.prompt}**\nJob `{job.id}`: {bar} step {step}/{total} · loss {loss:.4f} · "
                     f"about {max(1, round((eta_s or 0) / 60))} min left")
    return _clip(f"**{_prompt(job)}**\nJob `{job.id}`: {bar} step {step}/{total}")


def done_text(delivery: Delivery, user_id: str, note: str = "", part: tuple[int, int] = (1, 1)) -> str:
    job, p = delivery.job, delivery.job.params
    seeds = ", ".join(f"{image.index + 1}: {image.seed}" for image in delivery.images) or "none shown"
    head = f"**{_prompt(job)}**" + (f" (-{p.negative})" if p.negative else "")
    lines = [f"{head} - <@{user_id}>",
             f"Job `{job.id}` · {p.width}x{p.height} · {p.steps} steps · {p.sampler} · cfg {p.cfg:g} · "
             f"model {p.model} · seeds {seeds}"]
    if part[1] > 1:
        lines.append(f"Part {part[0]} of {part[1]}.")
    if note:
        lines.append(note)
    return _clip("\n".join(lines))


def released_text(job: JobView) -> str:
    return _clip(f"**{_prompt(job)}**\nA moderator reviewed your appeal and released the withheld image(s) "
                 f"of job `{job.id}`.")


def failed_text(job: JobView, error: str | None) -> str:
    return _clip(f"**{_prompt(job)}**\nJob `{job.id}` failed: {error or 'unknown error'}")


def cancelled_text(job: JobView) -> str:
    return _clip(f"**{_prompt(job)}**\nJob `{job.id}` was cancelled.")


def handoff_text(job: JobView) -> str:
    return _clip(f"**{_prompt(job)}**\nJob `{job.id}` is still waiting or running; Discord only lets me "
                 "edit this message for 15 minutes, so the result will be posted in this channel.")


def listing_text(listing: str) -> str:
    """A listing (/loras) within Discord's 2000 characters."""
    return _clip(listing)


def error_text(message: str) -> str:
    return _clip(f"⚠️ {message}")


def info_text(delivery: Delivery) -> str:
    """Everything needed to make an image again: the Info button and /job."""
    job, p = delivery.job, delivery.job.params
    lines = [f"**Job `{job.id}`**: {job.status.value} ({p.kind.value}, by {job.display_name or job.user_id})",
             f"Prompt: {p.prompt}"]
    if p.negative:
        lines.append(f"Negative: {p.negative}")
    if p.loras:
        lines.append(f"LoRAs: {lora_tags(p.loras)}")
    lines.append(f"Model {p.model} · sampler {p.sampler} · steps {p.steps} · cfg {p.cfg:g} · "
                 f"size {p.width}x{p.height} · images {p.n}")
    if p.kind is not JobKind.IMAGINE:
        lines.append(f"Strength {p.strength:g}")
    lines.append("Seeds: " + ", ".join(f"image {index + 1}: {seed}" for index, seed in enumerate(job.seeds)))
    if delivery.notice:
        lines.append(delivery.notice)
    if job.error:
        lines.append(f"Error: {job.error}")
    tags = f" {lora_tags(p.loras)}" if p.loras else ""
    lines.append(f"Again: `/imagine {p.prompt}{tags} --seed {p.seed} --steps {p.steps} --cfg {p.cfg:g} "
                 f"--size {p.width}x{p.height} --sampler {p.sampler} --model {p.model}"
                 + (f" --no {p.negative}" if p.negative else "") + "`")
    return _clip("\n".join(lines))


def jobs_text(jobs: Sequence[JobView]) -> str:
    """/jobs: a line per job, newest first."""
    if not jobs:
        return "You have no jobs yet; try `/imagine a red circle on a blue background`"
    lines = [f"**Your {len(jobs)} most recent job(s)**, newest first (`/job id` shows one):"]
    lines += [f"`{job.id}` · {job.status.value} · {job.params.kind.value} · {_prompt(job, 80)}" for job in jobs]
    return _clip("\n".join(lines))


def _prompt(job: JobView, limit: int = 300) -> str:
    prompt = job.params.prompt.replace("*", "\\*")
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"


def _seeds(job: JobView) -> str:
    return ", ".join(str(seed) for seed in job.seeds)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CONTENT_CHARS else text[: MAX_CONTENT_CHARS - 1] + "…"


# -- result files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultFile:
    name: str
    data: bytes
    spoiler: bool = False  # sent as SPOILER_<name>: Discord blurs it until clicked


@dataclass(frozen=True)
class Packed:
    """The result files, split into messages that each fit the upload limit."""

    messages: list[list[ResultFile]]
    note: str = ""  # what the user should know: JPEG instead of PNG, images left out


def pack_results(job: JobView, pngs: list[tuple[ShownImage, bytes]], upload_limit: int,
                 clip: bytes | None = None) -> Packed:
    """PNGs in one message when they fit; else JPEGs; else fewer images per message. An /animate
    `clip` (its MP4, which Discord plays inline) comes first, beside its poster, when it fits.

    `upload_limit` is the bytes one message may carry in that channel (Discord tells it with every
    interaction). A PNG keeps the generation parameters; a JPEG does not, which the note says.
    """
    files = [ResultFile(_file_name(job, image, "png"), data, image.spoiler) for image, data in pngs]
    if clip is not None and pngs:
        poster = pngs[0][0]
        video = ResultFile(_file_name(job, poster, "mp4"), clip, poster.spoiler)
        if _fits([video, *files], upload_limit):
            return Packed([[video, *files]])
    if _fits(files, upload_limit):
        return Packed([files], "The clip did not fit this server's upload limit; the last frame is below."
                      if clip is not None else "")
    jpegs: list[ResultFile] = []
    left_out: list[int] = []
    for image, data in pngs:
        jpeg = _as_jpeg(data, upload_limit)
        if jpeg is None:
            left_out.append(image.index + 1)
        else:
            jpegs.append(ResultFile(_file_name(job, image, "jpg"), jpeg, image.spoiler))
    note = "Sent as JPEG to fit this server's upload limit (the PNGs with their parameters are kept by " \
           f"the bot; ask for them with /job {job.id})."
    if left_out:
        note += f" Image(s) {', '.join(map(str, left_out))} did not fit even as JPEG."
    return Packed(_groups(jpegs, upload_limit), note)


def _fits(files: list[ResultFile], limit: int) -> bool:
    return len(files) <= MAX_FILES_PER_MESSAGE and sum(len(f.data) for f in files) <= limit


def _groups(files: list[ResultFile], limit: int) -> list[list[ResultFile]]:
    """Greedy, in order: each message takes files while they fit."""
    groups: list[list[ResultFile]] = [[]]
    for file in files:
        if groups[-1] and not _fits([*groups[-1], file], limit):
            groups.append([])
        groups[-1].append(file)
    return groups


def _as_jpeg(png: bytes, limit: int) -> bytes | None:
    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
    for quality in JPEG_QUALITIES:
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= limit:
            return buffer.getvalue()
    return None


def _file_name(job: JobView, image: ShownImage, extension: str) -> str:
    return f"{job.id}-{image.index + 1}-seed{image.seed}.{extension}"


# -- buttons --------------------------------------------------------------------------------------


COG_NAME = "Easel"  # the name of adapters/discord.py's EaselCog, by which a button press finds it


class ButtonHandler(Protocol):
    """What answers a button press: the bot's cog named COG_NAME (adapters/discord.py's EaselCog)."""

    async def button_pressed(self, interaction: discord.Interaction, action: str, job_id: str,
                             index: int | None) -> None: ...


_LABELS = {"reroll": "Re-roll", "info": "Info", "delete": "Delete", "vary": "Variations", "upscale": "Upscale",
           "zoom15": "Zoom out 1.5x", "zoom2": "Zoom out 2x", "left": "Left", "up": "Up", "right": "Right",
           "down": "Down"}
_EMOJI = {"reroll": "🎲", "info": "ℹ️", "delete": "🗑️", "vary": "🔀", "upscale": "🔍", "zoom15": "🔭", "zoom2": "🔭",
          "left": "⬅️", "up": "⬆️", "right": "➡️", "down": "⬇️"}


class JobButton(discord.ui.DynamicItem[discord.ui.Button],
                template=r"easel:(?P<action>reroll|vary|upscale|info|delete|zoom15|zoom2|left|up|right|down)"
                         r":(?P<job_id>[a-z0-9]{1,16})"
                         r"(?::(?P<index>\d{1,2}))?"):
    """One button under a result; everything it needs is in its custom id."""

    def __init__(self, action: str, job_id: str, index: int | None = None, *, label: str | None = None,
                 row: int | None = None) -> None:
        custom_id = f"easel:{action}:{job_id}" + ("" if index is None else f":{index}")
        style = discord.ButtonStyle.danger if action == "delete" else discord.ButtonStyle.secondary
        super().__init__(discord.ui.Button(label=label or _LABELS[action], style=style, custom_id=custom_id,
                                           emoji=_EMOJI[action]), row=row)
        self.action = action
        self.job_id = job_id
        self.index = index

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: Any, /) -> JobButton:
        index = int(match["index"]) if match["index"] is not None else None
        return cls(match["action"], match["job_id"], index, label=getattr(item, "label", None))

    async def callback(self, interaction: discord.Interaction) -> None:
        # Through the bot's cog, so a press works the same in Easel's own bot and in a host bot.
        get_cog = getattr(interaction.client, "get_cog", None)
        handler: ButtonHandler | None = get_cog(COG_NAME) if get_cog is not None else None
        if handler is not None:  # None only between unloading the cog and discord.py dropping the buttons
            await handler.button_pressed(interaction, self.action, self.job_id, self.index)


def result_view(delivery: Delivery) -> discord.ui.View:
    """Re-roll, Info, Delete; then Variations and Upscale for each image shown (V1 U1 ... when several);
    under a single image, Zoom out 1.5x and 2x, and a pan each way (bot/followups.py's REFRAMES: five
    rows of five buttons leave no room for them per image of a set). A withheld image gets no follow-up
    buttons."""
    job = delivery.job
    view = discord.ui.View(timeout=None)
    for action in ("reroll", "info", "delete"):
        view.add_item(JobButton(action, job.id, row=0))
    images = delivery.images[:5]  # a row holds five buttons
    for row, action in ((1, "vary"), (2, "upscale")):
        for image in images:
            label = _LABELS[action] if len(images) == 1 else f"{action[0].upper()}{image.index + 1}"
            view.add_item(JobButton(action, job.id, image.index, label=label, row=row))
    if len(delivery.images) == 1:
        for row, actions in ((3, ("zoom15", "zoom2")), (4, ("left", "up", "right", "down"))):
            for action in actions:
                view.add_item(JobButton(action, job.id, delivery.images[0].index, row=row))
    return view
