"""The job service: what every adapter calls. Submit, cancel, look up, quota.

Submitting is: fetch linked reference images, validate (grammar already did the text; here the images),
check the prompt (bot/safety.py), check the user may queue and reserve the job's cost units
(bot/policy.py), store the job, its safety flags and its `queued` event in one transaction, answer
with the position.
A job is durable from that commit on: the `jobs` table is the queue (see bot/queue.py for the
worker's side).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select

from bot.catalog import ModelCatalog
from bot.config import Settings
from bot.database import Database, UnitOfWork
from bot.domain import GenerateCommand, GenerationParams, InputImages, JobKind, JobStatus, Requester, loras_text
from bot.errors import IdempotencyConflict, InvalidCommand, InvalidImage, NotFound, QueueFull, QuotaExceeded, Refused
from bot.events import EventBus, EventKind
from bot.extra_networks import ExtraNetworks
from bot.fetch import ImageFetcher
from bot.grammar import fit_size
from bot.images import load_upload, prepare_inputs, to_png_bytes
from bot.models import IdempotencyKey, Image, Job, User
from bot.outpaint import outpaint_canvas, outpaint_layout
from bot.policy import Policy, cost_milli, used_part_milli
from bot.repositories import QueueLoad
from bot.safety import WITHHOLD, Decision, PromptCheck, flagged_category
from bot.store import ImageStore
from bot.teach import own_loras
from bot.views import JobView, QuotaStatus, job_view, job_view_of

MAX_SEED = 2**32 - 1
# Short ids users can type: no 0/O or 1/l look-alikes.
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def new_job_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


@dataclass(frozen=True)
class SubmitResult:
    job: JobView
    position: int  # 1 = next to run; 0 = no longer waiting (a replayed submission whose job has started)
    replayed: bool = False  # True: the Idempotency-Key matched an earlier submission; nothing new was queued
    # A permutation prompt's further jobs, one per combination after the first (`job`), in order.
    others: tuple[SubmitResult, ...] = ()

    @property
    def every(self) -> tuple[SubmitResult, ...]:
        """This submission's jobs: one, or one per combination of a permutation prompt."""
        return (self, *self.others)


@dataclass(frozen=True)
class Estimate:
    """What a submission would do, from `JobService.estimate` (a dry run): nothing is stored."""

    params: GenerationParams  # as the job would run (size fitted to the input); seed None = random
    images: int  # what it counts against the plain images-per-day cap
    quota: QuotaStatus  # before this job; quota.cost is this job's cost in units
    position: int  # where it would stand in the queue now (1 = next)
    cost: float = 0.0  # what it costs in quota units (bot/policy.py)


class JobService:
    """Built once by `bot.bootstrap.open_core`, with the policy, prompt check, fetcher and clock it shares."""

    def __init__(self, settings: Settings, db: Database, store: ImageStore, bus: EventBus, *, policy: Policy,
                 prompt_check: PromptCheck, fetcher: ImageFetcher, clock: Callable[[], datetime],
                 catalog: ModelCatalog | None = None) -> None:
        self.settings = settings
        self.catalog = catalog or ModelCatalog.from_settings(settings)  # the models and their defaults
        self.catalog_networks = ExtraNetworks.from_settings(settings)  # installed LoRAs, beside trained ones
        self.db = db
        self.store = store
        self.bus = bus
        self.policy = policy
        self.prompt_check = prompt_check
        self.fetcher = fetcher
        self.clock = clock

    # -- submitting ------------------------------------------------------------------------------

    async def submit(self, requester: Requester, command: GenerateCommand,
                     inputs: InputImages | None = None, *, idempotency_key: str | None = None,
                     fingerprint: str = "") -> SubmitResult:
        """Validate the attachments, then queue the job (a permutation prompt: one job per combination,
        all or none). Raises an EaselError the user can read.

        With an `idempotency_key`, a repeat of the same request (same `fingerprint`, e.g. a hash of
        it) by the same user returns the job the first one queued instead of queuing another.

        While it runs it counts as under way: a worker of this process about to claim waits for it.
        """
        async with self.bus.submission_under_way():
            return await self._submit(requester, command, inputs, idempotency_key, fingerprint)

    async def _submit(self, requester: Requester, command: GenerateCommand, inputs: InputImages | None,
                      idempotency_key: str | None, fingerprint: str) -> SubmitResult:
        inputs = await self._fetch_references(command, inputs or InputImages())
        command = await self._prompt_of_picture(command, inputs)
        # On a thread when a picture came: decoding the upload and storing it (a PUT, with an object store)
        # must not hold up every other request this process serves. Without one there is nothing to wait on.
        if inputs.image is not None:
            first, image_sha, mask_sha = await asyncio.to_thread(self._prepare, command, inputs)
        else:
            first, image_sha, mask_sha = self._prepare(command, inputs)
        jobs = _each_job(command, first)
        # Only the prompt: a negative prompt names what to keep *out* of the picture.
        decisions = [self.prompt_check.check(params.prompt).decide(requester.nsfw_allowed_here) for params in jobs]
        now = self.clock()
        async with self.db.unit_of_work() as uow:
            user = await uow.users.get_or_create(requester.platform, requester.user_id, now=now,
                                                 display_name=requester.display_name)
            if idempotency_key is not None:
                earlier = await self._replay(uow, user, idempotency_key, fingerprint)
                if earlier is not None:
                    await uow.commit()  # keep the user row get_or_create may have made or renamed
                    return earlier
            self.policy.check_not_banned(user, now)
            # The user's own trained words (/teach): by name and by trigger word.
            jobs = [await own_loras(uow, user, params, self.catalog_networks, self.settings.limits.max_loras)
                    for params in jobs]
            for params, decision in zip(jobs, decisions, strict=True):
                if not decision.allowed:  # one refused combination refuses the whole command
                    raise Refused(await self._refuse_prompt(uow, user, params, decision, now))
            load = await uow.jobs.queue_load(user.id)
            queued = []
            try:
                if len(jobs) > 1:  # the whole set's cost first, so a refusal is about the command
                    await self.policy.check_quota(uow, user, requester, replace(first, n=first.n * len(jobs)), now)
                for i, (params, decision) in enumerate(zip(jobs, decisions, strict=True)):
                    at = replace(load, mine=load.mine + i, waiting=load.waiting + i)
                    reply_to = requester.reply_to_others if i else None
                    job, position = await self._queue(uow, user, requester, params, decision, (image_sha, mask_sha),
                                                      at, now, reply_to, job_is_first=not i)
                    queued.append(SubmitResult(job_view_of(job, user.platform_user_id, user.display_name), position))
            except (QuotaExceeded, QueueFull) as error:
                if len(jobs) > 1:
                    error.message = f"This prompt makes {len(jobs)} jobs (one per {{...}} option). {error.message}"
                    error.args = (error.message,)
                raise
            if idempotency_key is not None:
                uow.session.add(IdempotencyKey(user_id=user.id, key=idempotency_key, fingerprint=fingerprint,
                                               job_id=queued[0].job.id, created_at=now))
            await uow.commit()
        return replace(queued[0], others=tuple(queued[1:]))

    async def _queue(self, uow: UnitOfWork, user: User, requester: Requester, params: GenerationParams,
                     decision: Decision, inputs: tuple[str | None, str | None], load: QueueLoad, now: datetime,
                     reply_to: dict[str, Any] | None = None, job_is_first: bool = True) -> tuple[Row[Any], int]:
        """Check the queue room and quota for one job, then add it, its prompt flags and its `queued` event.
        Returns the job and its queue position."""
        await self.policy.check_queue_room(uow, params, now, mine=load.mine, waiting=load.waiting)
        cost = await self.policy.reserve(uow, user, requester, params, now)
        image_sha, mask_sha = inputs
        # The job row first: flags and the event refer to it.
        job = await uow.jobs.add(
            id=new_job_id(), user_id=user.id, kind=params.kind.value, status=JobStatus.QUEUED.value,
            prompt=params.prompt, negative=params.negative, width=params.width, height=params.height,
            steps=params.steps, cfg=params.cfg, n=params.n, sampler=params.sampler, model=params.model,
            seed=params.seed, strength=params.strength, loras=loras_text(params.loras),
            motion=params.motion.to_text() if params.motion else None, init_image_sha=image_sha,
            mask_image_sha=mask_sha, platform=requester.platform,
            reply_to=dict(requester.reply_to if reply_to is None else reply_to),
            attempts=0, progress_step=0, progress_total=0, created_at=now, cost_milli=cost,
            nsfw_allowed=requester.nsfw_allowed_here,
        )
        for match, action in decision.records:  # allowed, but recorded: flag and allow_nsfw
            await self.policy.record(uow, user, subject="prompt", category=match.category,
                                     reason_code=match.reason_code, source="prompt_check", action=action,
                                     now=now, job_id=job.id, detail=_flag_detail(match.term, params.prompt))
        # A further job of one command stands behind its siblings (and, round-robin, other users' turns).
        position = load.position if job_is_first else await uow.jobs.queue_position(job)
        self.bus.stage(uow, job, EventKind.QUEUED, {"position": position})
        return job, position

    async def estimate(self, requester: Requester, command: GenerateCommand,
                       inputs: InputImages | None = None) -> Estimate:
        """A dry run of `submit`: the same checks and errors, plus the cost, with nothing stored. A
        permutation prompt is priced as all its jobs together; `params` are its first job's."""
        params, _, _ = self._prepare(command, inputs or InputImages(), save=False)
        params = replace(params, seed=command.params.seed)
        jobs = len(command.every_params())
        whole = replace(params, n=params.n * jobs)  # the jobs differ only in their prompts
        now = self.clock()
        async with self.db.unit_of_work(write=False) as uow:
            user = await uow.users.get_by_platform(requester.platform, requester.user_id)
            if user is not None:
                self.policy.check_not_banned(user, now)
            for prompt in dict.fromkeys(each.prompt for each in command.every_params()):
                decision = self.prompt_check.check(prompt).decide(requester.nsfw_allowed_here)
                if not decision.allowed:  # a dry run records nothing and gives no strike
                    raise Refused(decision.message)
            load = await uow.jobs.queue_load(user.id if user else None)
            await self.policy.check_queue_room(uow, params, now, mine=load.mine + jobs - 1, waiting=load.waiting)
            await self.policy.check_quota(uow, user, requester, whole, now)
            quota = await self.policy.status(uow, user, requester, now, whole)
        cost = cost_milli(params) * jobs  # what the jobs will be charged, each rounded up on its own
        return Estimate(params=params, images=whole.n, quota=replace(quota, cost=cost / 1000), position=load.position,
                        cost=cost / 1000)

    async def _replay(self, uow: UnitOfWork, user: User, key: str, fingerprint: str) -> SubmitResult | None:
        earlier = await uow.session.get(IdempotencyKey, (user.id, key))
        if earlier is None:
            return None
        if earlier.fingerprint != fingerprint:
            raise IdempotencyConflict(f"Idempotency-Key {key[:64]!r} was already used for a different request "
                                      f"(job {earlier.job_id}); use a new key for a new request")
        job = await uow.jobs.get(earlier.job_id)
        position = await uow.jobs.queue_position(job) if job.status == JobStatus.QUEUED else 0
        return SubmitResult(job_view(job, self.store.location_of), position, replayed=True)

    async def _refuse_prompt(self, uow: UnitOfWork, user: User, params: GenerationParams, decision: Decision,
                             now: datetime) -> str:
        """Record a refused prompt (and its strike, maybe a ban), commit that, and return the message."""
        flags = [await self.policy.record(uow, user, subject="prompt", category=match.category,
                                          reason_code=match.reason_code, source="prompt_check", action=action,
                                          now=now, detail=_flag_detail(match.term, params.prompt))
                 for match, action in decision.records]
        message = decision.message
        if decision.is_strike_candidate:
            if "block" in self.settings.moderation.strike_actions:
                message += await self.policy.strike(uow, user, now)
            message += f" If this is a mistake: /appeal f{flags[0].id} <why>"
        await uow.commit()
        return message

    async def _fetch_references(self, command: GenerateCommand, inputs: InputImages) -> InputImages:
        """`{https://...}` links stand in for attachments: the image, then (for /inpaint) the mask."""
        if not command.reference_urls:
            return inputs
        if inputs.image is not None:
            raise InvalidCommand("give the picture as an attachment or as a {https://...} link, not both")
        fetched = [await self.fetcher.fetch(url) for url in command.reference_urls]
        return InputImages(image=fetched[0], mask=fetched[1] if len(fetched) > 1 else inputs.mask)

    async def _prompt_of_picture(self, command: GenerateCommand, inputs: InputImages) -> GenerateCommand:
        """/outpaint without a prompt: the prompt and LoRAs of the Easel job that made the picture, found by
        its bytes (a result file sent back as it was saved), and its negative prompt where none was given."""
        params = command.params
        if params.kind is not JobKind.OUTPAINT or params.prompt or inputs.image is None:
            return command
        job = await self.job_that_made(hashlib.sha256(inputs.image).hexdigest())
        if job is None:
            raise InvalidCommand("/outpaint needs a prompt for this picture (it is not an Easel result as "
                                 "saved, whose prompt it would reuse), e.g. /outpaint a beach at sunset --zoom 2")
        original = job.params
        model = self.catalog.get(params.model)
        default_negative = model.negative if model is not None else ""
        negative = original.negative if params.negative in ("", default_negative) else params.negative
        return replace(command, params=replace(params, prompt=original.prompt, negative=negative,
                                               loras=original.loras))

    def _prepare(self, command: GenerateCommand, inputs: InputImages,
                 save: bool = True) -> tuple[GenerationParams, str | None, str | None]:
        """Check the attachments fit the command; store them at the job's size (unless not `save`);
        pick the seed."""
        params = command.params
        if params.seed is None:
            params = replace(params, seed=secrets.randbelow(MAX_SEED + 1))
        if params.kind is JobKind.IMAGINE:
            if inputs.image is not None:
                raise InvalidCommand("/imagine takes no image; use /edit to start from a picture")
            return params, None, None
        if params.kind is JobKind.ANIMATE and inputs.image is None:
            return params, None, None  # the first frame comes from the prompt
        if inputs.image is None:
            raise InvalidImage(f"/{params.kind.value} needs an image: attach one")
        if params.kind is JobKind.INPAINT and inputs.mask is None:
            raise InvalidImage("/inpaint needs a mask too: white pixels are repainted, black ones kept")
        if params.kind in (JobKind.EDIT, JobKind.ANIMATE, JobKind.UPSCALE) and inputs.mask is not None:
            raise InvalidCommand(f"/{params.kind.value} takes one image; use /inpaint to repaint only part of it")
        if params.kind is JobKind.OUTPAINT and (command.outpaint is None) == (inputs.mask is None):
            # A new /outpaint makes its own mask; a re-roll brings the canvas and mask its job stored.
            raise InvalidCommand("/outpaint takes one picture and --zoom or --left/--right/--up/--down; use "
                                 "/inpaint to repaint a part you marked with a mask")
        limits = self.settings.limits
        image = load_upload(inputs.image, limits, "image")
        mask = load_upload(inputs.mask, limits, "mask") if inputs.mask is not None else None
        if command.outpaint is not None:
            layout = outpaint_layout(image.width, image.height, command.outpaint, limits)
            picture, _ = prepare_inputs(image, None, *layout.picture)
            image, mask = outpaint_canvas(picture, layout)
            params = replace(params, width=layout.canvas[0], height=layout.canvas[1])
        elif command.size_from_input:
            width, height = fit_size(image.width, image.height, params.width * params.height, limits)
            params = replace(params, width=width, height=height)
        if params.kind is JobKind.UPSCALE:  # the upscale model enlarges the picture as it is
            image, mask = prepare_inputs(image, mask, image.width, image.height)
        else:
            image, mask = prepare_inputs(image, mask, params.width, params.height)
        if not save:
            return params, None, None
        image_sha = self.store.save_input(to_png_bytes(image)).sha256
        mask_sha = self.store.save_input(to_png_bytes(mask)).sha256 if mask is not None else None
        return params, image_sha, mask_sha

    # -- looking up ------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobView:
        async with self.db.unit_of_work(write=False) as uow:
            return job_view(await uow.jobs.get(job_id), self.store.location_of)

    async def wait_until_final(self, job_id: str, timeout_s: float) -> JobView:
        """The job once it is done, failed or cancelled, or as it is after `timeout_s` (check
        `status.is_final`): for callers that answer with the result in one response (the OpenAI and
        AUTOMATIC1111 routes), where the job keeps running and is found later by its id."""
        async def final_event() -> None:
            async for _event in self.bus.watch(job_id):
                pass  # watch ends after the final event

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):  # not wait_for: see EventBus.wait_for_change
                await final_event()
        return await self.get_job(job_id)

    async def job_that_made(self, sha256: str) -> JobView | None:
        """The first job with a result image of these bytes, or None."""
        async with self.db.unit_of_work(write=False) as uow:
            job = await uow.jobs.that_made(sha256)
            return job_view(job, self.store.location_of) if job is not None else None

    async def image_withheld(self, sha256: str) -> bool:
        """Whether any job's image with these bytes is withheld by the image check (not yet released)."""
        async with self.db.unit_of_work(write=False) as uow:
            flags = (await uow.session.scalars(select(Image.safety_flags).where(Image.sha256 == sha256))).all()
        return any(flagged_category(image_flags or (), WITHHOLD) is not None for image_flags in flags)

    async def position(self, job_id: str) -> int | None:
        """1 = next to run; None once the job has started or finished."""
        async with self.db.unit_of_work(write=False) as uow:
            job = await uow.jobs.get(job_id)
            return await uow.jobs.queue_position(job) if job.status == JobStatus.QUEUED else None

    async def list_jobs(self, limit: int = 20, requester: Requester | None = None) -> list[JobView]:
        """Newest first; only the requester's own jobs when one is given."""
        owner = (requester.platform, requester.user_id) if requester is not None else None
        async with self.db.unit_of_work(write=False) as uow:
            return [job_view(job, self.store.location_of) for job in await uow.jobs.newest(limit, owner=owner)]

    async def quota(self, requester: Requester, command: GenerateCommand | None = None) -> QuotaStatus:
        """Units used and left today, the per-minute window, and what `command` (or a default /imagine)
        costs. `bot.policy.describe_quota` turns it into the /quota answer."""
        now = self.clock()
        params = command.params if command is not None else self._default_params()
        jobs = len(command.every_params()) if command is not None else 1
        async with self.db.unit_of_work(write=False) as uow:
            user = await uow.users.get_by_platform(requester.platform, requester.user_id)
            # A permutation prompt costs all its jobs, which differ only in their prompts.
            status = await self.policy.status(uow, user, requester, now, replace(params, n=params.n * jobs))
        return replace(status, cost=cost_milli(params) * jobs / 1000)

    def _default_params(self) -> GenerationParams:
        """A plain /imagine with the configured defaults, to price when /quota names no command."""
        model = self.catalog.default
        return GenerationParams(kind=JobKind.IMAGINE, prompt="", width=model.width, height=model.height,
                                steps=model.steps, cfg=model.cfg, n=self.settings.limits.default_n,
                                sampler=model.sampler, model=model.name)

    # -- cancelling and delivery -----------------------------------------------------------------

    async def cancel(self, requester: Requester, job_id: str | None = None) -> JobView:
        """Cancel a queued or running job of the requester's (the newest unfinished one if no id)."""
        async with self.db.unit_of_work() as uow:
            if job_id is None:
                job = await uow.jobs.newest_unfinished(requester.platform, requester.user_id)
                if job is None:
                    raise NotFound("You have no queued or running job to cancel")
            else:
                job = await uow.jobs.get(job_id)
            is_owner = (job.user.platform, job.user.platform_user_id) == (requester.platform,
                                                                          requester.user_id)
            if not is_owner:
                raise Refused(f"Job {job.id} is not yours; only its owner can cancel it")
            if JobStatus(job.status).is_final:
                raise InvalidCommand(f"Job {job.id} already {job.status}; there is nothing to cancel")
            await finish_job(uow, self.bus, job, JobStatus.CANCELLED, now=self.clock())
            await uow.commit()
            return job_view(job, self.store.location_of)

    async def mark_delivered(self, job_id: str) -> None:
        """The owning adapter has shown the final result to the user."""
        async with self.db.unit_of_work() as uow:
            job = await uow.jobs.get(job_id)
            job.delivered_at = self.clock()
            await uow.commit()

    async def undelivered(self, platform: str) -> list[JobView]:
        """Finished jobs of a platform whose result the adapter never confirmed (e.g. it was down)."""
        async with self.db.unit_of_work(write=False) as uow:
            return [job_view(job, self.store.location_of) for job in await uow.jobs.undelivered(platform)]


# -- shared with the queue ---------------------------------------------------------------------------


async def finish_job(uow: UnitOfWork, bus: EventBus, job: Job, status: JobStatus,
                     error: str | None = None, payload: dict[str, Any] | None = None, *,
                     now: datetime | None = None) -> None:
    """End a job that did not succeed (`status` FAILED or CANCELLED) and stage the event (at `now`, else
    the bus's clock's time). A job succeeds only with its images, in JobQueue.complete_batch.

    The status is also the quota's bookkeeping (bot/policy.py): SUCCEEDED commits the job's charge,
    FAILED and CANCELLED refund it (a charge counts only while queued, running or succeeded), except
    the steps a training ran (its progress_step), which stay charged.
    """
    if job.kind == JobKind.TEACH.value:
        job.cost_milli = used_part_milli(job.cost_milli, job.progress_step, job.steps)  # refund the rest
    job.status = status.value
    job.finished_at = now or bus.clock()
    job.error = error
    kind = {JobStatus.FAILED: EventKind.FAILED, JobStatus.CANCELLED: EventKind.CANCELLED}[status]
    bus.stage(uow, job, kind, payload or ({"error": error} if error else {}))


def _each_job(command: GenerateCommand, first: GenerationParams) -> list[GenerationParams]:
    """The params of each job a command makes, from the first job's as `_prepare` made them (seed
    picked, size fitted). A permutation prompt's jobs differ only in their prompts and seeds: random
    seeds, or with --seed S the seeds S, S + n, S + 2n..., so every image of the set has a seed of its
    own and the set can be made again."""
    if not command.permutations:
        return [first]
    given = command.params.seed is not None
    seeds = [first.seed + i * first.n if given or i == 0 else secrets.randbelow(MAX_SEED + 1)
             for i in range(len(command.every_params()))]
    return [replace(params, seed=seed, width=first.width, height=first.height, strength=first.strength)
            for params, seed in zip(command.every_params(), seeds, strict=True)]


def _flag_detail(term: str, prompt: str) -> str:
    return f"matched {term!r} in: {prompt}"
