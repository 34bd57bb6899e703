"""Repositories: the lookups every service shares, on a unit of work's session (`uow.users`, `uow.jobs`).

A service asks `await uow.users.get_or_create(platform, user_id, now=now)` or `await uow.jobs.get(job_id)`
instead of writing the query again; what a lookup means (ids are typed case-insensitively, a new user
made by two requests at once is one row) is decided here, once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, Integer, Row, Select, bindparam, case, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from bot.domain import JobStatus
from bot.errors import NotFound
from bot.models import IdempotencyKey, Image, Job, User

UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


class UserRepository:
    """Users by (platform, platform user id): who someone is on Discord, Telegram, the HTTP API..."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_by_platform(self, platform: str, user_id: str) -> User | None:
        return await self.session.scalar(_by_platform(), {"platform": platform, "user_id": user_id})

    async def get_or_create(self, platform: str, user_id: str, *, now: datetime, display_name: str = "") -> User:
        """The user, made (flushed, so it has an id) if new; a new non-empty `display_name` renames it."""
        display_name = display_name[:128]
        user = await self.get_by_platform(platform, user_id)
        if user is None:
            try:
                async with self.session.begin_nested():  # a savepoint: a lost race below undoes only this
                    user = User(platform=platform, platform_user_id=user_id, display_name=display_name,
                                role="user", created_at=now)
                    self.session.add(user)
            except IntegrityError:
                # A concurrent first request of the same new user made the row (PostgreSQL; SQLite's
                # BEGIN IMMEDIATE never lets two writers race here).
                user = await self.get_by_platform(platform, user_id)
                if user is None:
                    raise
        elif display_name and user.display_name != display_name:
            user.display_name = display_name
        return user


@dataclass(frozen=True)
class QueueLoad:
    """The queue as one user's next submission meets it."""

    waiting: int  # jobs waiting, all users
    mine: int  # the user's jobs waiting or running
    position: int  # where a job the user submits now would stand (1 = next)


class JobRepository:
    """Jobs by id, by owner, and the queue's shape as a submission sees it."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, **columns: Any) -> Row[Any]:
        """Store a new job (`columns`: its values, by column name) and return its row as stored, seq
        included. A Core INSERT ... RETURNING at once, not an ORM object flushed: safety flags and events
        of the same unit of work refer to the row, and every submission pays for this."""
        return (await self.session.execute(_insert_job(), columns)).one()

    async def find(self, job_id: str) -> Job | None:
        """The job with this id as a user typed it (spaces and case do not matter), or None."""
        return await self.session.scalar(select(Job).where(Job.id == job_id.strip().lower()))

    async def get(self, job_id: str) -> Job:
        """`find`, or NotFound telling the user what an id looks like."""
        job = await self.find(job_id)
        if job is None:
            raise NotFound(f"No job with id {job_id!r}; ids look like k7mq2x9a (see /jobs or your results)")
        return job

    async def newest(self, limit: int, *, owner: tuple[str, str] | None = None) -> list[Job]:
        """The newest jobs first; only those of `owner` ("platform", "user id") when given."""
        query = select(Job).order_by(Job.seq.desc()).limit(limit)
        if owner is not None:
            query = query.join(Job.user).where(User.platform == owner[0], User.platform_user_id == owner[1])
        return list((await self.session.scalars(query)).unique().all())

    async def newest_unfinished(self, platform: str, user_id: str) -> Job | None:
        """The user's newest job still queued or running."""
        return await self.session.scalar(
            select(Job).join(Job.user).where(User.platform == platform, User.platform_user_id == user_id,
                                             Job.status.in_(UNFINISHED)).order_by(Job.seq.desc()).limit(1))

    async def for_idempotency_key(self, platform: str, user_id: str, key: str) -> Job | None:
        """The job this user's earlier submission with the idempotency key `key` queued."""
        query = (select(Job).join(IdempotencyKey, IdempotencyKey.job_id == Job.id)
                 .join(User, User.id == IdempotencyKey.user_id)
                 .where(User.platform == platform, User.platform_user_id == user_id, IdempotencyKey.key == key))
        return (await self.session.scalars(query)).unique().first()

    async def that_made(self, image_sha256: str) -> Job | None:
        """The first job whose result has exactly these bytes (an Easel picture sent back), or None."""
        return (await self.session.scalars(select(Job).join(Job.images).where(Image.sha256 == image_sha256)
                                           .order_by(Job.seq).limit(1))).unique().first()

    async def undelivered(self, platform: str) -> list[Job]:
        """Finished jobs of a platform whose result its adapter never confirmed, oldest first."""
        final = [s.value for s in JobStatus if s.is_final]
        return list((await self.session.scalars(
            select(Job).where(Job.platform == platform, Job.status.in_(final),
                              Job.delivered_at.is_(None)).order_by(Job.seq))).unique().all())

    async def queue_position(self, job: Job | Row[Any]) -> int:
        """Where a queued job stands under round-robin scheduling (1 = next).

        If the job is its owner's k-th waiting job (k = 0 for the oldest), every other user with waiting
        jobs gets up to k + 1 turns before it: an upper bound, exact when all were queued at once.
        """
        ahead_own = await self.session.scalar(select(func.count()).select_from(Job).where(
            Job.user_id == job.user_id, Job.status == JobStatus.QUEUED.value, Job.seq < job.seq))
        row = (await self.session.execute(_position_query(), {"user_id": job.user_id, "ahead_own": ahead_own})).one()
        return 1 + ahead_own + int(row.others_ahead)

    async def queue_load(self, user_id: int | None) -> QueueLoad:
        """The queue's load and the position a new job of `user_id` (None: a newcomer) would take, in one
        read: every submission pays for this, so it is one statement, not four."""
        row = (await self.session.execute(_queue_load_query(), {"user_id": user_id})).one()
        return QueueLoad(waiting=int(row.waiting), mine=int(row.own_unfinished),
                         position=1 + int(row.own_waiting) + int(row.others_ahead))


# The statements below are each built once (functools.cache) and run with their values bound: putting
# one together costs more of the event loop's time than running it, and every submission runs these.

@functools.cache
def _insert_job() -> Insert:
    """A new job's row, returned whole as stored."""
    return insert(Job.__table__).returning(*Job.__table__.columns)


@functools.cache
def _by_platform() -> Select[tuple[User]]:
    """The user :user_id of :platform."""
    return select(User).where(User.platform == bindparam("platform"), User.platform_user_id == bindparam("user_id"))


@functools.cache
def _queue_load_query() -> Select[Any]:
    """_load_query for a new job of :user_id (None: a newcomer), with that user's waiting and unfinished jobs."""
    own_waiting = select(func.count()).select_from(Job).where(
        Job.user_id == bindparam("user_id"), Job.status == JobStatus.QUEUED.value).scalar_subquery()
    own_unfinished = select(func.count()).select_from(Job).where(
        Job.user_id == bindparam("user_id"), Job.status.in_(UNFINISHED)).scalar_subquery()
    # A new job is its owner's newest: all of the owner's waiting jobs are ahead of it.
    return _load_query(ahead_own=own_waiting).add_columns(own_waiting.label("own_waiting"),
                                                          own_unfinished.label("own_unfinished"))


@functools.cache
def _position_query() -> Select[Any]:
    """_load_query for a job of :user_id that has :ahead_own of its owner's jobs ahead of it."""
    return _load_query(ahead_own=bindparam("ahead_own", type_=Integer))


def _load_query(ahead_own: Any) -> Select[Any]:
    """All waiting jobs, and the turns other users take before a job of :user_id that has `ahead_own`
    of its owner's jobs ahead of it (each other user: up to ahead_own + 1)."""
    per_user = (select(Job.user_id, func.count().label("waiting")).select_from(Job)
                .where(Job.status == JobStatus.QUEUED.value).group_by(Job.user_id).subquery())
    turns = case((per_user.c.waiting < ahead_own + 1, per_user.c.waiting), else_=ahead_own + 1)
    others = per_user.c.user_id.is_distinct_from(bindparam("user_id"))  # a newcomer (None): every user is other
    return select(func.coalesce(func.sum(per_user.c.waiting), 0).label("waiting"),
                  func.coalesce(func.sum(turns).filter(others), 0).label("others_ahead"))
