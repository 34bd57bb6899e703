"""What the Telegram adapter writes: status lines, captions, job descriptions and inline buttons.

Plain functions of core values, so each text is easy to read and to test. Everything is plain
text (no parse mode), so a prompt full of `*`, `_` or `<` can never break a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bot.delivery import Delivery, ShownImage
from bot.domain import JobKind, JobStatus, lora_tags
from bot.events import EventKind
from bot.followups import REFRAMES
from bot.views import JobView

# Telegram's limits: a message's text, a photo's caption, a button's callback data (bytes).
MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_CALLBACK_DATA = 64

TELEGRAM_HELP = """On Telegram:
  /edit, /inpaint and /outpaint go in the caption of a picture (a photo, or a file to keep it
  lossless), or in a reply to a message that holds the picture.
  The /inpaint mask (white = repaint) can be the second picture of the same album, the message
  you reply to, or the picture's own transparency (send a PNG as a file; transparent = repaint).
  Buttons under a result: Re-roll (new seed), Variations, Upscale, Info; under a single picture also
  Zoom out 1.5x and 2x and a pan each way (/outpaint of it)."""

# Callback data is "<action>:<job id>[:<image index>]": only ids, never parameters, well under 64 bytes.
ACTIONS = {"r": "reroll", "v": "variation", "u": "upscale", "i": "info",
           # Zoom out and pan (bot/followups.py's REFRAMES)
           "z15": "zoom15", "z2": "zoom2", "pl": "left", "pu": "up", "pr": "right", "pd": "down"}
REFRAME_BUTTONS = {"zoom15": "🔭 Zoom out 1.5x", "zoom2": "🔭 Zoom out 2x", "left": "⬅️", "up": "⬆️",
                   "right": "➡️", "down": "⬇️"}


@dataclass(frozen=True)
class ButtonPress:
    action: str  # a value of ACTIONS
    job_id: str
    index: int = 0  # which image, for variation, upscale, zoom out and pan

    @property
    def described(self) -> str:
        """The action in words, as the status message names it: "reroll", "zoom out 2x", "pan left"."""
        return REFRAMES.get(self.action, self.action).lower()


def callback_data(action: str, job_id: str, index: int | None = None) -> str:
    short = next(key for key, name in ACTIONS.items() if name == action)
    data = f"{short}:{job_id}" if index is None else f"{short}:{job_id}:{index}"
    if len(data.encode()) > MAX_CALLBACK_DATA:
        raise ValueError(f"callback data {data!r} is over Telegram's {MAX_CALLBACK_DATA} bytes")
    return data


def parse_callback(data: str | None) -> ButtonPress | None:
    """The button a callback came from, or None for data this adapter never wrote."""
    parts = (data or "").split(":")
    if len(parts) not in (2, 3) or parts[0] not in ACTIONS or not parts[1]:
        return None
    if len(parts) == 3 and not parts[2].isdigit():
        return None
    return ButtonPress(ACTIONS[parts[0]], parts[1], int(parts[2]) if len(parts) == 3 else 0)


def result_buttons(job: JobView, images: Sequence[ShownImage]) -> InlineKeyboardMarkup:
    """Re-roll and Info for the job; Variations and Upscale for each image shown (numbered in an album); and
    under a single image, Zoom out 1.5x and 2x and a pan each way. A withheld image is never among
    `images`, so it gets no follow-up buttons."""
    reroll = InlineKeyboardButton("🎲 Re-roll", callback_data=callback_data("reroll", job.id))
    info = InlineKeyboardButton("ℹ️ Info", callback_data=callback_data("info", job.id))
    if len(images) == 1:
        index = images[0].index
        def reframe(action: str) -> InlineKeyboardButton:
            return InlineKeyboardButton(REFRAME_BUTTONS[action], callback_data=callback_data(action, job.id, index))

        return InlineKeyboardMarkup([
            [reroll, InlineKeyboardButton("🔀 Variations", callback_data=callback_data("variation", job.id, index))],
            [InlineKeyboardButton("⬆️ Upscale", callback_data=callback_data("upscale", job.id, index)), info],
            [reframe("zoom15"), reframe("zoom2")],
            [reframe("left"), reframe("up"), reframe("right"), reframe("down")],
        ])
    return InlineKeyboardMarkup([
        [reroll, info],
        [InlineKeyboardButton(f"🔀 V{image.index + 1}", callback_data=callback_data("variation", job.id, image.index))
         for image in images],
        [InlineKeyboardButton(f"⬆️ U{image.index + 1}", callback_data=callback_data("upscale", job.id, image.index))
         for image in images],
    ])


# -- the status message ------------------------------------------------------------------------------


def queued_text(job_id: str, position: int) -> str:
    return f"⏳ Queued (position {position}) · job {job_id}\nSend /cancel {job_id} to stop it."


def status_text(delivery: Delivery) -> str | None:
    """The status line for a delivery that is not final; None for kinds that change nothing."""
    job = delivery.job
    if delivery.kind is EventKind.QUEUED:
        return queued_text(job.id, delivery.position or 1)
    if delivery.kind is EventKind.STARTED:
        return f"🎨 Generating · job {job.id}"
    if delivery.kind is EventKind.PROGRESS:
        step, total = delivery.step, max(1, delivery.total)
        if delivery.loss is not None:  # a /teach training, after a slice
            return (f"🧠 Training {progress_bar(step, total)} {step}/{total} · loss {delivery.loss:.4f} · "
                    f"about {max(1, round((delivery.eta_s or 0) / 60))} min left · job {job.id}")
        return f"🎨 Generating {progress_bar(step, total)} {step}/{total} · job {job.id}"
    return None


def status_rank(delivery: Delivery) -> tuple[int, int]:
    """Orders status lines, so a late-arriving older state never replaces a newer one."""
    if delivery.kind is EventKind.QUEUED:
        return (0, 0)
    if delivery.kind is EventKind.PROGRESS:
        return (1, delivery.step)
    return (1, 0)


def final_text(delivery: Delivery) -> str:
    """The status line once the job is over: how many images follow, and why any were withheld."""
    job = delivery.job
    if delivery.kind is EventKind.DONE:
        count = len(delivery.images)
        done = f"✅ Done · job {job.id} · {count} image{'s' if count != 1 else ''} below"
        return _clip(f"{done}\n{delivery.notice}" if delivery.notice else done, MAX_TEXT)
    if delivery.kind is EventKind.FAILED:
        return _clip(f"❌ Job {job.id} failed: {delivery.error or 'unknown error'}", MAX_TEXT)
    return f"🚫 Job {job.id} was cancelled."


def released_text(job: JobView) -> str:
    return f"✅ A moderator reviewed your appeal and released the withheld image(s) of job {job.id}."


def progress_bar(step: int, total: int, width: int = 10) -> str:
    filled = round(width * min(step, total) / total)
    return "▰" * filled + "▱" * (width - filled)


# -- results -----------------------------------------------------------------------------------------


def photo_caption(job: JobView, image: ShownImage, *, first: bool) -> str:
    """The first (or only) picture carries the prompt and settings; every one carries its seed."""
    if not first:
        return f"seed {image.seed} · job {job.id}"
    p = job.params
    settings = f"seed {image.seed} · {image.width}x{image.height} · {p.steps} steps · {p.sampler} · job {job.id}"
    return _clip(p.prompt, MAX_CAPTION - len(settings) - 1) + "\n" + settings


def album_summary(job: JobView, images: Sequence[ShownImage]) -> str:
    seeds = ", ".join(str(image.seed) for image in images)
    return f"Job {job.id}: {len(images)} images, seeds {seeds}. V = variations of, U = upscale of image N."


def png_filename(job: JobView, image: ShownImage) -> str:
    return f"{job.id}-{image.index + 1}-seed{image.seed}.png"


# -- answers to commands -----------------------------------------------------------------------------


def describe_job(delivery: Delivery) -> str:
    """/job and the Info button: settings, seeds, status, timings and withheld notices (no server paths)."""
    job, p = delivery.job, delivery.job.params
    lines = [f"Job {job.id}: {job.status.value}", f"{p.kind.value}: {_clip(p.prompt, 1500)}"]
    if p.negative:
        lines.append(f"negative: {_clip(p.negative, 800)}")
    if p.loras:
        lines.append(f"loras: {lora_tags(p.loras)}")
    lines.append(f"model {p.model} · {p.sampler} · {p.steps} steps · cfg {p.cfg:g} · {p.width}x{p.height}")
    seeds = ", ".join(str(seed) for seed in job.seeds)
    lines.append(f"{p.n} image{'s' if p.n != 1 else ''} · seed{'s' if p.n != 1 else ''} {seeds}")
    if p.kind is not JobKind.IMAGINE and p.strength is not None:
        lines.append(f"strength {p.strength:g}")
    if job.status is JobStatus.RUNNING and job.progress_total:
        lines.append(f"step {job.progress_step}/{job.progress_total}")
    if timings := job.timings():
        lines.append(" · ".join(timings))
    if delivery.notice:
        lines.append(delivery.notice)
    if job.error:
        lines.append(f"error: {job.error}")
    return _clip("\n".join(lines), MAX_TEXT)


def jobs_text(jobs: Sequence[JobView]) -> str:
    """/jobs: a line per job, newest first (plain text, like every Telegram answer)."""
    if not jobs:
        return "You have no jobs yet; try /imagine a red circle on a blue background"
    lines = [f"Your {len(jobs)} most recent job(s), newest first (/job ID shows one):"]
    lines += [f"{job.id} · {job.status.value} · {job.params.kind.value} · {_clip(job.params.prompt, 80)}"
              for job in jobs]
    return _clip("\n".join(lines), MAX_TEXT)


def error_text(message: str) -> str:
    return _clip(f"⚠️ {message}", MAX_TEXT)


def split_text(text: str, limit: int) -> list[str]:
    """`text` in parts of at most `limit` characters, split after whole lines (a line longer than
    `limit` alone is cut)."""
    parts, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > limit:
            parts.append(current.rstrip("\n"))
            current = ""
        current += line[:limit]
    return [*parts, current.rstrip("\n")] if current or not parts else parts


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"
