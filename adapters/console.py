"""The console adapter: `easel chat` and the one-shot `easel imagine/edit/inpaint/outpaint/animate` commands.

It does what every chat adapter does, with the terminal as the platform: turn what the user typed
(and the files they named, the console's attachments) into a command, hand it to the job service,
and render the job's events: queue position, a progress bar, and where each image was saved.
"""

from __future__ import annotations

import base64
import getpass
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from bot.animation import CLIP_NAME, GIF_NAME, frames_done
from bot.bootstrap import Core
from bot.delivery import Delivery, offers_gif
from bot.domain import (
    AppealCommand,
    CancelCommand,
    GenerateCommand,
    HelpCommand,
    InputImages,
    JobCommand,
    JobKind,
    JobsCommand,
    LorasCommand,
    ModCommand,
    ModelsCommand,
    QuotaCommand,
    Requester,
    StylesCommand,
    TeachCommand,
    TrainingPicture,
    lora_tags,
)
from bot.errors import EaselError, InvalidCommand, InvalidImage
from bot.events import EventKind
from bot.policy import describe_params, describe_quota, humanize
from bot.service import SubmitResult
from bot.styles import describe_styles
from bot.views import JobView
from bot.workers import WorkerView

PLATFORM = "console"

# How many file names each command takes before its prompt: the console's attachments. /teach takes
# a folder of pictures after its name instead (`read_training_folder`).
ATTACHMENTS = {"edit": 1, "inpaint": 2, "outpaint": 1}
USAGES = {"edit": "/edit <image> <prompt>", "inpaint": "/inpaint <image> <mask> <prompt>",
          "outpaint": "/outpaint <image> [prompt] --zoom X"}
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# /help's lines for them (bot/grammar.py's ATTACHMENT_FORMS are for platforms with attachments).
HELP_FORMS = {
    "edit": "/edit <image file> <prompt> [flags]  redraw the picture in that file guided by the prompt",
    "inpaint": "/inpaint <image file> <mask file> <prompt> [flags]  repaint the white parts of the mask",
    "outpaint": "/outpaint <image file> [prompt] --zoom X | --left/--right/--up/--down N  paint more around the "
                "picture",
    "animate": "/animate [<image file>] <prompt> [--frames N --fps N --zoom X --pan DX,DY --rotate DEG]  an MP4 "
               "whose frames each move and redraw the last, from the picture in that file if one is named",
    "edit example": "/edit street.png the same street in winter --strength 0.6",
}


def console_requester() -> Requester:
    """The person at the keyboard: they run this Easel, so their quota tier is `console.tier`."""
    user = getpass.getuser()
    return Requester(platform=PLATFORM, user_id=user, display_name=user, is_local_operator=True)


def read_attachment(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise InvalidImage(f"the {what} file {path!r} does not exist") from None
    except IsADirectoryError:
        raise InvalidImage(f"the {what} path {path!r} is a folder, not an image file") from None
    except OSError as e:
        raise InvalidImage(f"cannot read the {what} file {path!r}: {e.strerror}") from None


def split_attachments(text: str) -> tuple[str, list[str]]:
    """'/edit photo.png make it winter' -> ('/edit make it winter', ['photo.png']). /animate's first
    frame is a file when its first word is one with a picture's suffix, else drawn from the prompt."""
    words = text.strip().split(maxsplit=3)
    command = words[0].lstrip("/").split("@")[0].lower() if words else ""
    count = ATTACHMENTS.get(command, 0)
    if command == "animate" and len(words) > 1 and words[1].lower().endswith(PICTURE_SUFFIXES):
        count = 1
    if count == 0 or (len(words) > 1 and words[1].startswith("{")):  # {https://...} links, not files
        return text, []
    if len(words) < count + 1:
        raise InvalidCommand(f"usage: {USAGES[command]}")
    paths = words[1:count + 1]
    rest = text.strip().split(maxsplit=count + 1)[count + 1:] if len(words) > count + 1 else []
    return " ".join([words[0], *rest]), paths


def read_training_folder(folder: Path) -> list[TrainingPicture]:
    """The pictures in `folder` (by name), each with the caption in the .txt file of the same name beside
    it, if there is one: `cat1.png` and `cat1.txt`. Size and count limits are the job service's."""
    if not folder.is_dir():
        raise InvalidImage(f"{folder} is not a folder; /teach takes a folder of pictures (and .txt captions)")
    pictures = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in PICTURE_SUFFIXES or not path.is_file():
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else ""
        pictures.append(TrainingPicture(read_attachment(str(path), "picture"), caption, path.name))
    if not pictures:
        raise InvalidImage(f"{folder} holds no pictures ({', '.join(PICTURE_SUFFIXES)}); put the pictures to "
                           "teach from there")
    return pictures


def split_teach_folder(text: str) -> tuple[str, Path | None]:
    """'/teach mascot pics/ --steps 200' -> ('/teach mascot --steps 200', Path('pics/'))."""
    words = text.split()
    if len(words) < 3 or words[0].lstrip("/").lower() != "teach" or words[2].startswith("--"):
        return text, None
    return " ".join([words[0], words[1], *words[3:]]), Path(words[2]).expanduser()


class ConsoleChat:
    """One console user's conversation. `handle` answers one line; output goes to `out`."""

    def __init__(self, core: Core, out: TextIO, requester: Requester | None = None,
                 output_dir: Path | None = None, progress: bool = True) -> None:
        self.core = core
        self.out = out
        self.requester = requester or console_requester()
        self.output_dir = output_dir
        self.progress = progress

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def handle(self, line: str) -> JobView | None:
        """Answer one line; returns the finished job for generation commands. Errors are shown, not raised."""
        try:
            return await self._handle(line)
        except EaselError as error:
            self.say(f"error: {error.message}")
            return None

    async def _handle(self, line: str) -> JobView | None:
        text, folder = split_teach_folder(line)
        text, paths = split_attachments(text)
        command = self.core.parser.parse(text)
        if isinstance(command, TeachCommand):
            if folder is None:
                raise InvalidCommand("usage: /teach NAME FOLDER [--steps N] [--rank R] [--trigger WORD] [caption], "
                                     "e.g. /teach mascot pics/ (captions: a .txt beside each picture)")
            return await self.teach(command, read_training_folder(folder))
        if isinstance(command, GenerateCommand):
            inputs = InputImages(
                image=read_attachment(paths[0], "image") if paths else None,
                mask=read_attachment(paths[1], "mask") if len(paths) > 1 else None,
            )
            return await self.generate(command, inputs)
        if isinstance(command, QuotaCommand) and command.teach is not None:
            estimate = await self.core.teach.estimate(self.requester, command.teach)
            self.say(describe_quota(replace(await self.core.service.quota(self.requester), cost=estimate.cost,
                                            cost_of=describe_params(estimate.params))))
        elif isinstance(command, QuotaCommand):
            self.say(describe_quota(await self.core.service.quota(self.requester, command.command)))
        elif isinstance(command, AppealCommand | ModCommand):
            self.say(await self.core.moderation.handle(self.requester, command))
        elif isinstance(command, JobCommand):
            self.say(describe_job(self.core.deliveries.of_job(await self.core.service.get_job(command.job_id))))
        elif isinstance(command, JobsCommand):
            self.say(describe_jobs(await self.core.service.list_jobs(command.limit, self.requester)))
        elif isinstance(command, CancelCommand):
            job = await self.core.service.cancel(self.requester, command.job_id)
            self.say(f"Job {job.id} cancelled.")
        elif isinstance(command, HelpCommand):
            self.say(self.core.parser.help_text(HELP_FORMS))
        elif isinstance(command, StylesCommand):
            self.say(describe_styles(self.core.parser.styles.styles()))
        elif isinstance(command, ModelsCommand):
            self.say(self.core.catalog.describe())
        elif isinstance(command, LorasCommand):
            self.say(self.core.parser.networks.listing())
        return None

    async def teach(self, command: TeachCommand, pictures: list[TrainingPicture]) -> JobView:
        """Queue a training and follow it to its end: progress after each slice, then the comparison."""
        result = await self.core.teach.submit(self.requester, command, pictures)
        self.say(f"Training {command.name!r} queued as job {result.job.id} (position {result.position}): "
                 f"{len(pictures)} pictures, {result.job.params.steps} steps, {result.cost:g} units. Afterwards "
                 f"{command.trigger_word!r} in your prompts (or <lora:{command.name}>) calls it.")
        job = await self.follow(result.job)
        if job.status.value == "succeeded":
            self.say(f"Taught {command.name!r}. Image 1: without it; image 2: with it (same prompt and seed).")
        return job

    async def generate(self, command: GenerateCommand, inputs: InputImages) -> JobView:
        """Submit, then follow the job to its end: the finished job. A permutation prompt's jobs are
        followed one after another; the first is returned."""
        jobs = [await self.follow(each.job) for each in (await self.submit(command, inputs)).every]
        return jobs[0]

    async def submit(self, command: GenerateCommand, inputs: InputImages) -> SubmitResult:
        result = await self.core.service.submit(self.requester, command, inputs)
        for each in result.every:  # a permutation prompt's jobs say which prompt each one draws
            prompt = f": {each.job.params.prompt}" if result.others else ""
            self.say(f"Job {each.job.id} queued (position {each.position}){prompt}; seeds {_seeds(each.job)}")
        return result

    async def follow(self, job: JobView) -> JobView:
        """Show the job's progress until it ends, then its result; the finished job."""
        bar: tqdm | None = None
        try:
            async for event in self.core.bus.watch(job.id):
                progress = self.core.deliveries.of_event(event, job) if event.kind is EventKind.PROGRESS else None
                if progress is not None and progress.loss is not None:
                    self._training_progress(job, progress)
                elif progress is not None and self.progress:
                    if bar is None:
                        bar = tqdm(total=progress.total, desc=f"job {job.id}", unit="step", file=self.out,
                                   leave=False)
                    bar.update(progress.step - bar.n)
                    if job.params.motion is not None:  # an animation: which frame it is at
                        bar.set_description(f"job {job.id} frame {frames_done(job.params, progress.step)}/"
                                            f"{job.params.motion.frames}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        job = await self.core.service.get_job(job.id)
        self.show_result(self.core.deliveries.of_job(job))
        await self.core.service.mark_delivered(job.id)
        return job

    def _training_progress(self, job: JobView, progress: Delivery) -> None:
        """A slice of a training ended: step, loss, time left, and where a sample picture was saved."""
        line = (f"job {job.id}: step {progress.step}/{progress.total}, loss {progress.loss:.4f}, "
                f"about {humanize(timedelta(seconds=progress.eta_s or 0))} left")
        if progress.sample is not None:
            folder = self.output_dir or self.core.settings.storage.data_dir / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{job.id}-sample-step{progress.step}.png"
            path.write_bytes(base64.b64decode(progress.sample.split(",", 1)[1]))
            line += f"; sample: {path}"
        self.say(line)

    def show_result(self, delivery: Delivery) -> None:
        """Where each image that may be shown was saved, and why any other was not."""
        job = delivery.job
        if delivery.kind is EventKind.FAILED:
            self.say(f"Job {job.id} failed: {delivery.error or 'unknown error'}")
        elif delivery.kind is EventKind.CANCELLED:
            self.say(f"Job {job.id} was cancelled.")
        for image in delivery.images:
            path = self._deliver(job, image.index, image.sha256, image.path)
            flagged = "  (flagged by the image check: open with care)" if image.spoiler else ""
            self.say(f"  image {image.index + 1}/{job.params.n}  seed {image.seed}  {path}{flagged}")
            if job.params.kind is JobKind.ANIMATE and job.params.motion is not None:
                # The clip is shown where its poster (last frame) may be: it holds the check of every frame.
                video = self._deliver_clip(job, CLIP_NAME, f"{job.id}-seed{image.seed}.mp4")
                self.say(f"  video  {video}  ({job.params.motion.frames} frames at {job.params.motion.fps} fps; "
                         f"each frame in {self.core.store.job_file_location(job.id)}){flagged}")
                if offers_gif("console") and GIF_NAME in self.core.store.job_file_names(job.id):
                    self.say(f"  gif    {self._deliver_clip(job, GIF_NAME, f'{job.id}-seed{image.seed}.gif')}{flagged}")
        for notice in delivery.withheld:
            self.say("  " + notice.message)

    def _deliver(self, job: JobView, index: int, sha256: str, location: str) -> str:
        """Where the user finds the image: its copy in output_dir, or where the store keeps it."""
        if self.output_dir is None:
            return location
        self.output_dir.mkdir(parents=True, exist_ok=True)
        target = self.output_dir / f"{job.id}-{index + 1}-seed{job.params.image_seeds()[index]}.png"
        target.write_bytes(self.core.store.read_bytes(sha256))  # from a folder or a bucket alike
        return str(target)

    def _deliver_clip(self, job: JobView, stored: str, name: str) -> str:
        """Where the user finds an animation's clip (the job's file `stored`, its MP4 or GIF): its copy
        `name` in output_dir, or where the store keeps it."""
        if self.output_dir is None:
            return self.core.store.job_file_location(job.id, stored)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        target = self.output_dir / name
        target.write_bytes(self.core.store.read_job_file(job.id, stored))  # from a folder or a bucket alike
        return str(target)


def _seeds(job: JobView) -> str:
    return ", ".join(str(seed) for seed in job.seeds)


def describe_jobs(jobs: list[JobView]) -> str:
    """/jobs: a line per job, newest first."""
    if not jobs:
        return "You have no jobs yet; try /imagine a red circle on a blue background"
    lines = [f"Your {len(jobs)} most recent job(s), newest first (/job <id> shows one):"]
    lines += [f"  {job.id}  {job.status.value:<9}  {job.params.kind.value:<7}  {job.created_at:%Y-%m-%d %H:%M}  "
              f"{_clipped(job.params.prompt, 60)}" for job in jobs]
    return "\n".join(lines)


def describe_workers(workers: list[WorkerView], now: datetime, lease_s: float) -> str:
    """`easel workers`: a line per registered worker, on every host sharing the database."""
    if not workers:
        return "no workers are running; start one with: easel worker"
    lines = [f"{len(workers)} worker(s):",
             f"  {'worker':<24} {'status':<9} {'device':<34} {'memory MB':>13}  {'images':>6}  {'batch':<18} "
             f"{'heartbeat':<10} models; loras"]
    for worker in workers:
        device = _clipped(f"{worker.device} {worker.device_name}".strip(), 34)
        memory = f"{worker.memory_used_mb}/{worker.memory_total_mb}"
        batch = _clipped(",".join(worker.batch), 18) or "-"
        silent = worker.silent_s(now)
        beat = f"{silent:.0f} s ago" + (" (silent: host down?)" if silent > lease_s else "")
        models = ", ".join(worker.models) or "-"
        loras = ", ".join(worker.loras) or "-"
        lines.append(f"  {_clipped(worker.id, 24):<24} {worker.status:<9} {device:<34} {memory:>13}  "
                     f"{worker.images_done:>6}  {batch:<18} {beat:<10} {models}; {loras}")
    return "\n".join(lines)


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_job(delivery: Delivery) -> str:
    """Every detail of a job, for `/job ID` and `easel job ID`: the images that may be shown, with their
    files, and a notice for each withheld one."""
    job, p = delivery.job, delivery.job.params
    lines = [
        f"Job {job.id}: {job.status.value}",
        f"  kind      {p.kind.value}",
        f"  owner     {job.display_name or job.user_id} ({job.platform})",
        f"  prompt    {p.prompt}",
    ]
    if p.negative:
        lines.append(f"  negative  {p.negative}")
    if p.loras:
        lines.append(f"  loras     {lora_tags(p.loras)}")
    lines += [
        f"  model     {p.model}   sampler {p.sampler}   steps {p.steps}   cfg {p.cfg:g}",
        f"  size      {p.width}x{p.height}   images {p.n}   seeds {_seeds(job)}",
    ]
    if p.kind is not JobKind.IMAGINE:
        lines.append(f"  strength  {p.strength:g}" + (f"   input {job.init_image_sha}" if job.init_image_sha else "")
                     + (f"   mask {job.mask_image_sha}" if job.mask_image_sha else ""))
    if p.motion is not None:
        m = p.motion
        lines.append(f"  motion    {m.frames} frames at {m.fps} fps   zoom {m.zoom:g}   "
                     f"pan {m.pan[0]:g},{m.pan[1]:g}   rotate {m.rotate:g}")
    lines.append("   ".join([f"  created   {job.created_at:%Y-%m-%d %H:%M:%S} UTC", *job.timings()]))
    lines.append(f"  attempts  {job.attempts}")
    if job.status.value == "running":
        lines.append(f"  progress  step {job.progress_step}/{job.progress_total}")
    if job.error:
        lines.append(f"  error     {job.error}")
    for image in delivery.images:
        flagged = "   flagged by the image check (spoiler)" if image.spoiler else ""
        lines.append(f"  image {image.index + 1}   seed {image.seed}   {image.path}{flagged}")
    lines += [f"  image {notice.index + 1}   {notice.message}" for notice in delivery.withheld]
    return "\n".join(lines)
