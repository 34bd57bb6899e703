"""`/teach NAME`: a user teaches the model a new word from their own pictures, as a LoRA (or, with
`--kind embedding`, a textual-inversion embedding) only they use.

    result = await teach.submit(requester, TeachCommand("zorb", steps=200), pictures)
    # ...the worker trains it a slice at a time (generation/teach.py); then, for its owner:
    /imagine a zorb circle on a blue background          # the trigger word calls the LoRA
    /imagine a circle on a blue background <lora:zorb>  # so does its name
    # an embedding is a word, no tag: its name or trigger word in the owner's prompt becomes the
    # private word the worker loaded its vectors under (own_loras below)

A training is one job of kind "teach" on the same durable, fair queue as every picture (bot/queue.py),
with a `trainings` row that says what it learns from. The worker runs `teach.slice_steps` steps of it
per claim, checkpoints its state (LoRA weights or embedding vectors, optimizer, step, random generators)
and puts the job back in the queue, behind the other users' jobs and its owner's own pictures; so it never holds up
generation for more than a slice, and a killed worker loses at most one slice.

Everything is checked here, before a step runs, with one-line errors: the name, the number, size and
total pixels of the pictures, the name, trigger word and captions against the prompt check, a name
the owner already uses, and the quota, which is reserved for every step (bot/policy.py: a training
step costs TRAINING_STEP_FACTOR denoising steps per picture of its batch). The pictures pass the image
check on the worker before the first step (the check needs the model's safety checker). A training
that fails or is cancelled keeps charging only the steps it ran.
"""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import Select, bindparam, select

from bot.catalog import ModelCatalog
from bot.config import Settings
from bot.database import Database, UnitOfWork
from bot.domain import TEACH_KINDS, GenerationParams, JobKind, JobStatus, Requester, TeachCommand, TrainingPicture
from bot.errors import InvalidCommand, InvalidImage, NotFound, Refused
from bot.events import EventBus, EventKind
from bot.extra_networks import (
    TRAINED_EMBEDDING_WORD,
    TRAINED_NAME,
    ExtraNetworks,
    replace_words,
    trained_embedding_word,
    trained_lora_name,
)
from bot.images import load_upload, to_png_bytes
from bot.models import Job, Training, User
from bot.policy import Policy, cost_milli
from bot.safety import PromptCheck
from bot.store import ImageStore, write_atomically
from bot.views import JobView, TrainingView, job_view_of, training_view

COMPARISON_SEED = 1234  # the closing comparison's seed, for both of its pictures


@dataclass(frozen=True)
class TeachResult:
    job: JobView
    position: int  # 1 = its first slice runs next
    cost: float  # units reserved for all its steps


@dataclass(frozen=True)
class TeachEstimate:
    """/quota /teach ...: what the training would cost, with nothing stored."""

    params: GenerationParams
    cost: float


class TeachService:
    """Built once by `bot.bootstrap.open_core`, beside the job service it shares its parts with."""

    def __init__(self, settings: Settings, db: Database, store: ImageStore, bus: EventBus, *, policy: Policy,
                 prompt_check: PromptCheck, clock: Callable[[], datetime], catalog: ModelCatalog,
                 networks: ExtraNetworks) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.bus = bus
        self.policy = policy
        self.prompt_check = prompt_check
        self.clock = clock
        self.catalog = catalog
        self.networks = networks

    # -- submitting ------------------------------------------------------------------------------

    def params_of(self, command: TeachCommand, pictures: int = 0) -> GenerationParams:
        """The training as the queue and the quota see it: its steps, its batch (`n`), the model's size."""
        self.check_command(command)
        model = self.catalog.default if command.model is None else self.catalog.get(command.model)
        if model is None:
            raise InvalidCommand(f"unknown model {command.model!r}; /models lists them")
        teach = self.settings.teach
        return GenerationParams(kind=JobKind.TEACH, prompt=command.name, width=model.width, height=model.height,
                                steps=command.steps or teach.default_steps, cfg=0.0, n=teach.batch,
                                sampler="adamw", model=model.name, seed=0)

    def check_command(self, command: TeachCommand) -> None:
        """The command's own values, whichever platform it came from (the grammar checks them too)."""
        teach = self.settings.teach
        if not TRAINED_NAME.fullmatch(command.name):
            raise InvalidCommand(f"a trained word's name is 1 to 32 letters, digits, - or _, starting with a letter "
                                 f"or digit (got {command.name[:40]!r}); e.g. /teach mascot")
        if command.kind not in TEACH_KINDS:
            raise InvalidCommand(f"--kind {command.kind[:20]!r} cannot be trained here; use --kind lora or "
                                 "--kind embedding")
        if command.steps is not None and not teach.min_steps <= command.steps <= teach.max_steps:
            raise InvalidCommand(f"--steps must be {teach.min_steps} to {teach.max_steps} (teach.max_steps); "
                                 f"got {command.steps}")
        if command.rank is not None and not teach.min_rank <= command.rank <= teach.max_rank:
            raise InvalidCommand(f"--rank must be {teach.min_rank} to {teach.max_rank} (teach.max_rank); "
                                 f"got {command.rank}")
        if command.trigger is not None and not re.fullmatch(r"[^\s<>:]{1,32}", command.trigger):
            raise InvalidCommand(f"--trigger is one word of at most 32 characters, without < > or : "
                                 f"(got {command.trigger[:40]!r})")
        if len(command.caption) > self.settings.limits.max_prompt_chars:
            raise InvalidCommand(f"the caption is {len(command.caption)} characters; the limit is "
                                 f"{self.settings.limits.max_prompt_chars}")

    def _check_pictures(self, pictures: Sequence[TrainingPicture]) -> list[bytes]:
        """Count, size and total pixels; each decoded once. Returns each as PNG bytes."""
        teach, limits = self.settings.teach, self.settings.limits
        if not teach.min_pictures <= len(pictures) <= teach.max_pictures:
            raise InvalidImage(f"/teach needs {teach.min_pictures} to {teach.max_pictures} pictures "
                               f"(teach.max_pictures); got {len(pictures)}")
        total, pngs = 0, []
        for number, picture in enumerate(pictures, 1):
            label = f"picture {number}" + (f" ({picture.filename[:40]})" if picture.filename else "")
            image = load_upload(picture.data, limits, label)
            if max(image.size) > teach.max_picture_side:
                raise InvalidImage(f"{label} is {image.width}x{image.height}; each side may be at most "
                                   f"{teach.max_picture_side} pixels (teach.max_picture_side); scale it down")
            total += image.width * image.height
            if total > teach.max_total_pixels:
                raise InvalidImage(f"the pictures come to more than {teach.max_total_pixels} pixels together "
                                   f"(teach.max_total_pixels) at {label}; send fewer or smaller pictures")
            if len(picture.caption) > limits.max_prompt_chars:
                raise InvalidCommand(f"the caption of {label} is {len(picture.caption)} characters; the limit is "
                                     f"{limits.max_prompt_chars}")
            pngs.append(to_png_bytes(image.convert("RGB")))
        return pngs

    @staticmethod
    def captions(command: TeachCommand, pictures: Sequence[TrainingPicture]) -> list[str]:
        """Each picture's caption: its own, else the shared one, else the trigger word; a caption without
        the trigger word gets it in front, so the word is what the pictures have in common."""
        result = []
        for picture in pictures:
            caption = " ".join((picture.caption or command.caption or command.trigger_word).split())
            if command.trigger_word.lower() not in caption.lower().split():
                caption = f"{command.trigger_word} {caption}"
            result.append(caption)
        return result

    async def submit(self, requester: Requester, command: TeachCommand,
                     pictures: Sequence[TrainingPicture]) -> TeachResult:
        """Check everything, then queue the training. Raises an EaselError the user can read."""
        # 1. Check inputs: the command, the pictures, then the words against the prompt check
        params = self.params_of(command)
        pngs = self._check_pictures(pictures)
        captions = self.captions(command, pictures)
        for text in dict.fromkeys([command.name, command.trigger_word, *captions]):
            decision = self.prompt_check.check(text).decide(requester.nsfw_allowed_here)
            if not decision.allowed:
                raise Refused(decision.message.replace("Your prompt", "A caption or the name"))
        now = self.clock()
        async with self.db.unit_of_work() as uow:
            # 2. Who asks, and may they
            user = await uow.users.get_or_create(requester.platform, requester.user_id, now=now,
                                                 display_name=requester.display_name)
            self.policy.check_not_banned(user, now)
            await self._check_name_is_free(uow, user, command.name)
            load = await uow.jobs.queue_load(user.id)
            await self.policy.check_queue_room(uow, params, now, mine=load.mine, waiting=load.waiting)
            cost = await self.policy.reserve(uow, user, requester, params, now)
            # 3. Store the pictures and queue the training's job
            shas = [self.store.save_input(png).sha256 for png in pngs]
            from bot.service import new_job_id  # here: bot.service imports this module (own_loras)

            job = await uow.jobs.add(
                id=new_job_id(), user_id=user.id, kind=JobKind.TEACH.value, status=JobStatus.QUEUED.value,
                prompt=command.name, negative="", width=params.width, height=params.height, steps=params.steps,
                # n: the two pictures it ends with (the same prompt and seed without and with the word)
                cfg=params.cfg, n=2, sampler=params.sampler, model=params.model, seed=COMPARISON_SEED,
                platform=requester.platform, reply_to=dict(requester.reply_to), attempts=0, progress_step=0,
                progress_total=params.steps, created_at=now, cost_milli=cost, nsfw_allowed=requester.nsfw_allowed_here)
            described = [{"sha": sha, "caption": caption} for sha, caption in zip(shas, captions, strict=True)]
            uow.session.add(Training(job_id=job.id, user_id=user.id, name=command.name, kind=command.kind,
                                     trigger=command.trigger_word, pictures=described, losses=[], created_at=now,
                                     rank=command.rank or self.settings.teach.default_rank))
            self.bus.stage(uow, job, EventKind.QUEUED, {"position": load.position, "training": command.name})
            await uow.commit()
            return TeachResult(job_view_of(job, user.platform_user_id, user.display_name), load.position, cost / 1000)

    async def _check_name_is_free(self, uow: UnitOfWork, user: User, name: str) -> None:
        """Names are unique per owner among trainings that did not fail or get cancelled (those are
        forgotten when the name is used again)."""
        rows = (await uow.session.scalars(select(Training).where(Training.user_id == user.id))).all()
        for row in rows:
            if row.name.lower() != name.lower():
                continue
            if JobStatus(row.job.status) in (JobStatus.FAILED, JobStatus.CANCELLED):
                await uow.session.delete(row)
                continue
            raise InvalidCommand(f"you already have a trained word called {row.name!r}; pick another name (or a "
                                 f"moderator deletes it: /mod trained delete {row.name})")
        kept = sum(1 for row in rows if JobStatus(row.job.status) not in (JobStatus.FAILED, JobStatus.CANCELLED))
        if kept >= self.settings.teach.max_trained_per_user:
            raise InvalidCommand(f"you have {kept} trained words, the most one user keeps (teach.max_trained_per_user)")

    async def estimate(self, requester: Requester, command: TeachCommand) -> TeachEstimate:
        """The dry run behind `/quota /teach NAME --steps N`: its cost; the quota check's errors too."""
        params = self.params_of(command)
        now = self.clock()
        async with self.db.unit_of_work(write=False) as uow:
            user = await uow.users.get_by_platform(requester.platform, requester.user_id)
            await self.policy.check_quota(uow, user, requester, params, now)
        return TeachEstimate(params, cost_milli(params) / 1000)

    # -- moderation: /mod trained, /mod share -----------------------------------------------------

    async def trained(self) -> list[TrainingView]:
        async with self.db.unit_of_work(write=False) as uow:
            rows = (await uow.session.scalars(select(Training).order_by(Training.id))).all()
            return [training_view(row) for row in rows]

    async def _find(self, uow: UnitOfWork, name: str, owner_id: int | None) -> Training:
        query = select(Training).where(Training.name == name)
        if owner_id is not None:
            query = query.where(Training.user_id == owner_id)
        rows = [row for row in (await uow.session.scalars(query)).all()
                if JobStatus(row.job.status) not in (JobStatus.FAILED, JobStatus.CANCELLED)]
        if not rows:
            raise NotFound(f"no trained word called {name[:40]!r}" + (" of that user" if owner_id else "")
                           + "; /mod trained lists them")
        if len(rows) > 1:
            owners = ", ".join(f"{row.user.platform}:{row.user.platform_user_id}" for row in rows)
            raise InvalidCommand(f"{len(rows)} users trained {name!r} ({owners}); name one: /mod share {name} USER")
        return rows[0]

    async def share(self, name: str, owner_id: int | None) -> str:
        """Copy a finished trained LoRA into lora_dir under its name: everyone can use it, /loras lists it."""
        async with self.db.unit_of_work() as uow:
            row = await self._find(uow, name, owner_id)
            if row.job.status != JobStatus.SUCCEEDED.value:
                raise InvalidCommand(f"{name!r} is still training ({row.job.progress_step}/{row.job.steps} steps); "
                                     "share it once it is done")
            installed = self.networks.embeddings() if row.kind == "embedding" else self.networks.loras()
            if name in installed:
                raise InvalidCommand(f"a {row.kind} called {name!r} is already installed for everyone; it cannot be "
                                     "shared under that name")
            target = self.networks.trained_path(row.kind, row.user_id, row.name).parents[2] / f"{row.name}.safetensors"
            if row.kind == "lora":
                # From the store, whichever worker trained it; the store's copy reaches the fleet's workers,
                # this host's lora_dir copy makes /loras list it here.
                data = await asyncio.to_thread(self.store.read_lora, trained_lora_name(row.user_id, row.name))
                await asyncio.to_thread(self.store.put_lora, row.name, data)
                await asyncio.to_thread(write_atomically, target, data)
            else:  # an embedding stays in the folders of the host that trained it (README: Running a fleet)
                shutil.copyfile(self.networks.trained_path(row.kind, row.user_id, row.name), target)
            row.shared_at = self.clock()
            await uow.commit()
        usage = f"the word {name}" if row.kind == "embedding" else f"<lora:{name}>"
        return f"Shared {name!r}: everyone can use {usage} now (/loras lists it)."

    async def delete(self, name: str, owner_id: int | None) -> str:
        """Forget a trained word: its file, its shared copy, and its record (its job stays in the history)."""
        async with self.db.unit_of_work() as uow:
            row = await self._find(uow, name, owner_id)
            if not JobStatus(row.job.status).is_final:
                raise InvalidCommand(f"{name!r} is still training; its owner cancels it with /cancel {row.job_id}")
            path = self.networks.trained_path(row.kind, row.user_id, row.name)
            path.unlink(missing_ok=True)
            if row.shared_at is not None:
                (path.parents[2] / f"{row.name}.safetensors").unlink(missing_ok=True)
            if row.kind == "lora":  # and the store's copies
                for lora in [trained_lora_name(row.user_id, row.name)] + ([row.name] if row.shared_at else []):
                    await asyncio.to_thread(self.store.delete_lora, lora)
            await uow.session.delete(row)
            await uow.commit()
        return f"Deleted the trained word {name!r}."


@functools.cache  # built once, run with its values bound: every submission reads it
def _finished_trainings() -> Select[tuple[str, str, str]]:
    """The kind, name and trigger word of each training of :user_id that finished (their words are theirs
    to use). Columns, not Training objects: every submission reads this, almost always to find nothing,
    and reading whole objects took the event loop about twice as long as these three columns."""
    return select(Training.kind, Training.name, Training.trigger).join(Job, Job.id == Training.job_id).where(
        Training.user_id == bindparam("user_id"), Job.status == JobStatus.SUCCEEDED.value)


async def own_loras(uow: UnitOfWork, user: User, params: GenerationParams, networks: ExtraNetworks,
                    max_loras: int) -> GenerationParams:
    """A job's trained words for its owner. LoRAs: a trained name the owner has is theirs
    (`trained/u<id>/NAME`), one they have not is refused unless installed for everyone, and a trigger
    word of theirs in the prompt adds its LoRA at weight 1. Embeddings: their name or trigger word, in
    the prompt or negative, becomes the word the worker loaded that file under (`trained-u<id>-name`),
    a word nobody may type themselves."""
    for text in (params.prompt, params.negative):
        typed = TRAINED_EMBEDDING_WORD.search(text)
        if typed:
            raise InvalidCommand(f"{typed.group()[:40]!r} is a word Easel keeps for itself; write your trained "
                                 "word's name instead")
    rows = (await uow.session.execute(_finished_trainings(), {"user_id": user.id})).all()
    loras = [row for row in rows if row.kind == "lora"]
    embeddings = [row for row in rows if row.kind == "embedding"]
    mine = {row.name.lower(): row for row in loras}
    chosen: dict[str, float] = {}
    for name, weight in params.loras:
        if name.lower() in mine:
            chosen[trained_lora_name(user.id, mine[name.lower()].name)] = weight
        elif name in networks.loras():
            chosen[name] = weight
        else:
            raise InvalidCommand(f"unknown LoRA {name[:40]!r}; /loras lists them (a word someone else taught "
                                 "is theirs until a moderator shares it; a trained embedding is a word, no tag)")
    words = {word.strip(",.;:!?()[]{}").lower() for word in params.prompt.split()}
    for row in loras:
        qualified = trained_lora_name(user.id, row.name)
        if row.trigger.lower() in words and qualified not in chosen:
            chosen[qualified] = 1.0
    if len(chosen) > max_loras:
        raise InvalidCommand(f"a job may use at most {max_loras} LoRAs (got {len(chosen)}, trigger words "
                             "included; limits.max_loras)")
    prompt, negative = params.prompt, params.negative
    for row in embeddings:
        private = trained_embedding_word(user.id, row.name)
        prompt, negative = (replace_words(text, (row.name, row.trigger), private) for text in (prompt, negative))
    return replace(params, loras=tuple(sorted(chosen.items())), prompt=prompt, negative=negative)


def describe_trained(trainings: Sequence[TrainingView]) -> str:
    """The /mod trained answer."""
    if not trainings:
        return "Nobody has trained a word yet."
    lines = ["Trained words (delete one with /mod trained delete NAME [USER]; share: /mod share NAME [USER]):"]
    for each in trainings:
        state = "shared" if each.shared else each.status.value
        if each.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            state = f"training, {each.step}/{each.steps} steps"
        kind = "an embedding" if each.kind == "embedding" else f"rank {each.rank}"
        lines.append(f"  {each.name}  by {each.owner}, trigger {each.trigger!r}, {kind}, "
                     f"{len(each.pictures)} pictures: {state}")
    return "\n".join(lines)
