"""The job service: what every adapter calls. Submit, cancel, look up, quota.

Submitting is: validate (grammar already did the text; here the images), check the user may queue,
reserve quota, store the job and its `queued` event in one transaction, answer with the position.
A job is durable from that commit on: the `jobs` table is the queue (see bot/queue.py for the
worker's side).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.config import Settings
from bot.database import Database, UnitOfWork
from bot.domain import GenerateCommand, GenerationParams, InputImages, JobKind, JobStatus, Requester
from bot.errors import InvalidCommand, InvalidImage, NotFound, QueueFull, QuotaExceeded, Refused
from bot.events import EventBus
from bot.grammar import fit_size
from bot.images import load_upload, prepare_inputs, to_png_bytes
from bot.models import Job, QuotaUsage, User
from bot.store import ImageStore
from bot.views import JobView, QuotaStatus, job_view

UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
MAX_SEED = 2**32 - 1
# Short ids users can type: no 0/O or 1/l look-alikes.
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def new_job_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SubmitResult:
    job: JobView
    position: int  # 1 = next to run


class JobService:
    def __init__(self, settings: Settings, db: Database, store: ImageStore, bus: EventBus) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.bus = bus

    # -- submitting ------------------------------------------------------------------------------

    async def submit(self, requester: Requester, command: GenerateCommand,
                     inputs: InputImages | None = None) -> SubmitResult:
        """Validate the attachments, then queue the job. Raises an EaselError the user can read."""
        inputs = inputs or InputImages()
        params, image_sha, mask_sha = self._prepare(command, inputs)
        now = utcnow()
        async with self.db.unit_of_work() as uow:
            user = await self._user_for(uow.session, requester, now)
            self._check_allowed(user, now)
            await self._check_queue_room(uow.session, user)
            await self._reserve_quota(uow.session, user, params.n, now)
            job = Job(
                id=new_job_id(), user=user, kind=params.kind.value, status=JobStatus.QUEUED.value,
                prompt=params.prompt, negative=params.negative, width=params.width, height=params.height,
                steps=params.steps, cfg=params.cfg, n=params.n, sampler=params.sampler, model=params.model,
                seed=params.seed, strength=params.strength, init_image_sha=image_sha,
                mask_image_sha=mask_sha, platform=requester.platform, reply_to=dict(requester.reply_to),
                attempts=0, progress_step=0, progress_total=0, created_at=now, images=[],
            )
            uow.session.add(job)
            await uow.session.flush()
            position = await queue_position(uow.session, job)
            self.bus.stage(uow, job, "queued", {"position": position})
            await uow.commit()
            view = job_view(job, self.store.path_of)
        self.bus.notify()
        return SubmitResult(view, position)

    def _prepare(self, command: GenerateCommand,
                 inputs: InputImages) -> tuple[GenerationParams, str | None, str | None]:
        """Check the attachments fit the command; store them at the job's size; pick the seed."""
        params = command.params
        if params.seed is None:
            params = replace(params, seed=secrets.randbelow(MAX_SEED + 1))
        if params.kind is JobKind.IMAGINE:
            if inputs.image is not None:
                raise InvalidCommand("/imagine takes no image; use /edit to start from a picture")
            return params, None, None
        if inputs.image is None:
            raise InvalidImage(f"/{params.kind.value} needs an image: attach one")
        if params.kind is JobKind.INPAINT and inputs.mask is None:
            raise InvalidImage("/inpaint needs a mask too: white pixels are repainted, black ones kept")
        if params.kind is JobKind.EDIT and inputs.mask is not None:
            raise InvalidCommand("/edit takes one image; use /inpaint to repaint only part of it")
        limits = self.settings.limits
        image = load_upload(inputs.image, limits, "image")
        mask = load_upload(inputs.mask, limits, "mask") if inputs.mask is not None else None
        if command.size_from_input:
            width, height = fit_size(image.width, image.height, params.width * params.height, limits)
            params = replace(params, width=width, height=height)
        image, mask = prepare_inputs(image, mask, params.width, params.height)
        image_sha = self.store.save_input(to_png_bytes(image)).sha256
        mask_sha = self.store.save_input(to_png_bytes(mask)).sha256 if mask is not None else None
        return params, image_sha, mask_sha

    async def _user_for(self, session: AsyncSession, requester: Requester, now: datetime) -> User:
        user = await session.scalar(select(User).where(User.platform == requester.platform,
                                                       User.platform_user_id == requester.user_id))
        if user is None:
            user = User(platform=requester.platform, platform_user_id=requester.user_id,
                        display_name=requester.display_name[:128], role="user", created_at=now)
            session.add(user)
            await session.flush()
        elif requester.display_name and user.display_name != requester.display_name[:128]:
            user.display_name = requester.display_name[:128]
        return user

    @staticmethod
    def _check_allowed(user: User, now: datetime) -> None:
        if user.banned_until is not None and user.banned_until > now:
            reason = f" Reason: {user.ban_reason}." if user.ban_reason else ""
            raise Refused(f"You are banned until {user.banned_until:%Y-%m-%d %H:%M} UTC.{reason}")

    async def _check_queue_room(self, session: AsyncSession, user: User) -> None:
        cap = self.settings.queue.max_queued_per_user
        waiting = await session.scalar(
            select(func.count()).select_from(Job).where(Job.user_id == user.id, Job.status.in_(UNFINISHED))
        )
        if waiting >= cap:
            raise QueueFull(f"You already have {waiting} jobs waiting or running (the limit is {cap}); "
                            "wait for one to finish or /cancel one")

    async def _reserve_quota(self, session: AsyncSession, user: User, images: int, now: datetime) -> None:
        limit = self.settings.queue.daily_images_per_user
        usage = await session.get(QuotaUsage, (user.id, now.date()))
        used = usage.images if usage else 0
        if used + images > limit:
            resets = _next_midnight(now)
            raise QuotaExceeded(
                f"Daily limit reached: {used} of {limit} images used today, this job needs {images}. "
                f"It resets at {resets:%H:%M} UTC (in {_humanize(resets - now)})."
            )
        if usage is None:
            session.add(QuotaUsage(user_id=user.id, day=now.date(), images=images))
        else:
            usage.images = used + images

    # -- looking up ------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobView:
        async with self.db.unit_of_work(write=False) as uow:
            return job_view(await _job_or_not_found(uow.session, job_id), self.store.path_of)

    async def position(self, job_id: str) -> int | None:
        """1 = next to run; None once the job has started or finished."""
        async with self.db.unit_of_work(write=False) as uow:
            job = await _job_or_not_found(uow.session, job_id)
            return await queue_position(uow.session, job) if job.status == JobStatus.QUEUED else None

    async def list_jobs(self, limit: int = 20, requester: Requester | None = None) -> list[JobView]:
        """Newest first; only the requester's own jobs when one is given."""
        query = select(Job).order_by(Job.seq.desc()).limit(limit)
        if requester is not None:
            query = query.join(Job.user).where(User.platform == requester.platform,
                                               User.platform_user_id == requester.user_id)
        async with self.db.unit_of_work(write=False) as uow:
            jobs = (await uow.session.scalars(query)).unique().all()
            return [job_view(job, self.store.path_of) for job in jobs]

    async def quota(self, requester: Requester) -> QuotaStatus:
        now = utcnow()
        async with self.db.unit_of_work(write=False) as uow:
            usage = await uow.session.scalar(
                select(QuotaUsage.images).join(User, User.id == QuotaUsage.user_id).where(
                    User.platform == requester.platform, User.platform_user_id == requester.user_id,
                    QuotaUsage.day == now.date()))
        return QuotaStatus(used=usage or 0, limit=self.settings.queue.daily_images_per_user,
                           resets_at=_next_midnight(now))

    # -- cancelling and delivery -----------------------------------------------------------------

    async def cancel(self, requester: Requester, job_id: str | None = None) -> JobView:
        """Cancel a queued or running job of the requester's (the newest unfinished one if no id)."""
        async with self.db.unit_of_work() as uow:
            if job_id is None:
                job = await uow.session.scalar(
                    select(Job).join(Job.user).where(
                        User.platform == requester.platform, User.platform_user_id == requester.user_id,
                        Job.status.in_(UNFINISHED)).order_by(Job.seq.desc()).limit(1))
                if job is None:
                    raise NotFound("You have no queued or running job to cancel")
            else:
                job = await _job_or_not_found(uow.session, job_id)
            is_owner = (job.user.platform, job.user.platform_user_id) == (requester.platform,
                                                                          requester.user_id)
            if not is_owner:
                raise Refused(f"Job {job.id} is not yours; only its owner can cancel it")
            if JobStatus(job.status).is_final:
                raise InvalidCommand(f"Job {job.id} already {job.status}; there is nothing to cancel")
            await finish_job(uow, self.bus, job, JobStatus.CANCELLED)
            await uow.commit()
            view = job_view(job, self.store.path_of)
        self.bus.notify()
        return view

    async def mark_delivered(self, job_id: str) -> None:
        """The owning adapter has shown the final result to the user."""
        async with self.db.unit_of_work() as uow:
            job = await _job_or_not_found(uow.session, job_id)
            job.delivered_at = utcnow()
            await uow.commit()

    async def undelivered(self, platform: str) -> list[JobView]:
        """Finished jobs of a platform whose result the adapter never confirmed (e.g. it was down)."""
        final = [s.value for s in JobStatus if s.is_final]
        async with self.db.unit_of_work(write=False) as uow:
            jobs = (await uow.session.scalars(
                select(Job).where(Job.platform == platform, Job.status.in_(final),
                                  Job.delivered_at.is_(None)).order_by(Job.seq))).unique().all()
            return [job_view(job, self.store.path_of) for job in jobs]


# -- shared with the queue ---------------------------------------------------------------------------


async def _job_or_not_found(session: AsyncSession, job_id: str) -> Job:
    job = await session.scalar(select(Job).where(Job.id == job_id.strip().lower()))
    if job is None:
        raise NotFound(f"No job with id {job_id!r}; ids look like k7mq2x9a (see /jobs or your results)")
    return job


async def queue_position(session: AsyncSession, job: Job) -> int:
    """Where a queued job stands under round-robin scheduling (1 = next).

    If the job is its owner's k-th waiting job (k = 0 for the oldest), every other user with waiting
    jobs gets up to k + 1 turns before it: an upper bound, exact when all were queued at once.
    """
    ahead_own = await session.scalar(select(func.count()).select_from(Job).where(
        Job.user_id == job.user_id, Job.status == JobStatus.QUEUED.value, Job.seq < job.seq))
    per_user = (select(func.count().label("waiting")).select_from(Job)
                .where(Job.status == JobStatus.QUEUED.value, Job.user_id != job.user_id)
                .group_by(Job.user_id).subquery())
    turns = case((per_user.c.waiting < ahead_own + 1, per_user.c.waiting), else_=ahead_own + 1)
    ahead_others = await session.scalar(select(func.coalesce(func.sum(turns), 0)))
    return 1 + ahead_own + int(ahead_others or 0)


async def finish_job(uow: UnitOfWork, bus: EventBus, job: Job, status: JobStatus,
                     error: str | None = None, payload: dict[str, Any] | None = None) -> None:
    """Move a job to a final state: refund its quota unless it succeeded, and stage the event."""
    job.status = status.value
    job.finished_at = utcnow()
    job.error = error
    if status is not JobStatus.SUCCEEDED:
        usage = await uow.session.get(QuotaUsage, (job.user_id, job.created_at.date()))
        if usage is not None:
            usage.images = max(0, usage.images - job.n)
    kind = {JobStatus.SUCCEEDED: "done", JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled"}[status]
    bus.stage(uow, job, kind, payload or ({"error": error} if error else {}))


def _next_midnight(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), time(0), tzinfo=UTC)


def _humanize(delta: timedelta) -> str:
    minutes = max(1, int(delta.total_seconds() // 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"

