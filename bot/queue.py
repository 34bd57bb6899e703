"""The worker's side of the queue: claim a fair batch, report progress, finish, recover.

Scheduling is round-robin by user, not FIFO: the next job is the oldest waiting job of the user who
was served longest ago, so one user's backlog of fifty jobs never delays another user's first one.
A batch is then filled with waiting jobs that can share the same diffusers call (equal
`GenerationParams.batch_key()`), other users' first jobs before anyone's second.

Every claim records the worker ("host:pid") and a heartbeat, which the worker renews while its batch
makes progress. A job left `running` by a worker that died (on this host), or whose heartbeat is older
than `queue.lease_s` (any host), goes back to the queue when another worker looks
(`requeue_abandoned`), and fails with a clear reason once it has been attempted `queue.max_attempts`
times.
"""

from __future__ import annotations

import base64
import functools
import os
import socket
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, Row, Select, Update, bindparam, case, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import aliased, lazyload

from bot.clock import Clock
from bot.config import Settings
from bot.database import Database, UnitOfWork
from bot.domain import JobKind, JobStatus
from bot.events import EventBus, EventKind
from bot.models import Image, Job, JobEvent, Training, User, WorkerRow
from bot.policy import Policy
from bot.safety import WITHHOLD, ImageVerdict, flagged_category, image_action
from bot.service import finish_job
from bot.store import ImageStore, StoredImage
from bot.views import JobView, TrainingView, job_view_of, training_view
from bot.workers import WorkerStatus


def this_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def is_local_process_dead(worker_id: str) -> bool:
    """True when `worker_id` names a process on this host that no longer runs."""
    host, _, pid = worker_id.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's worker: only its heartbeat can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class RecoveryReport:
    requeued: list[str]
    failed: list[str]


@dataclass(frozen=True)
class EndedJob:
    id: str
    kind: JobKind
    status: JobStatus


@dataclass(frozen=True)
class Head:
    """A user's oldest waiting job, as a claim sees it."""

    model: str
    passed_over: int  # claims that served a less fair job first, for model affinity
    waited_s: float = 0.0  # since it was submitted


def choose_head(heads: Sequence[Head], loaded_models: Collection[str], max_passes: int) -> int:
    """Which of the heads, fairest first, a worker holding `loaded_models` serves (model affinity).

    The fairest, unless its model is not loaded and a later head's is: then that one, since loading a
    model costs seconds to minutes. A head passed over `max_passes` times already is never passed again,
    nor is any head behind it; the heads in front of the one chosen are passed over once more. A worker
    with no model loaded, or `max_passes` 0, serves the fairest.

    >>> heads = [Head("sdxl", passed_over=0), Head("sd15", passed_over=0)]
    >>> choose_head(heads, {"sd15"}, max_passes=4), choose_head(heads, {"sd15"}, max_passes=0)
    (1, 0)
    >>> choose_head([Head("sdxl", passed_over=4), Head("sd15", passed_over=0)], {"sd15"}, max_passes=4)
    0
    """
    if max_passes and loaded_models:
        for index, head in enumerate(heads):
            if head.model in loaded_models:
                return index
            if head.passed_over >= max_passes:
                break
    return 0


def leave_to_idle_worker(head: Head, loaded_models: Collection[str], idle_elsewhere: Collection[str],
                         max_wait_s: float) -> bool:
    """Whether a worker should leave `head` (the job choose_head picked) for another worker: true when it
    would have to load the job's model, an idle worker elsewhere has it loaded (`idle_elsewhere`, from
    the worker registry), and the job was submitted less than `max_wait_s` ago. That worker takes it at
    its next poll; one the registry wrongly thinks idle delays the job by `max_wait_s` at most.

    >>> leave_to_idle_worker(Head("sdxl", 0, waited_s=0.3), {"sd15"}, {"sdxl"}, max_wait_s=2)
    True
    >>> leave_to_idle_worker(Head("sdxl", 0, waited_s=2.5), {"sd15"}, {"sdxl"}, max_wait_s=2)
    False
    """
    return head.model not in loaded_models and head.model in idle_elsewhere and head.waited_s < max_wait_s


# The columns of GenerationParams.batch_key(): jobs equal in all of them share one diffusers call.
BATCH_KEY_COLUMNS = (Job.kind, Job.model, Job.width, Job.height, Job.steps, Job.sampler, Job.cfg, Job.strength,
                     Job.loras, Job.motion)


def _batch_key(row: Any) -> tuple[Any, ...]:
    """The batch key of a row that ends with BATCH_KEY_COLUMNS."""
    return tuple(row[-len(BATCH_KEY_COLUMNS):])


@dataclass(frozen=True)
class BatchChoice:
    chosen: list[int]  # the seqs of the batch
    passed: list[int] = field(default_factory=list)  # fairer heads passed over for model affinity
    spare: list[int] = field(default_factory=list)  # the other heads, fairest first: taken if `chosen` is gone


@dataclass(frozen=True)
class Finished:
    """A generated job's stored images, (seed, image) each, and the output check's verdict on each
    (None = not flagged; empty: none was flagged)."""
    job_id: str
    images: Sequence[tuple[int, StoredImage]]
    verdicts: Sequence[ImageVerdict | None] = ()


def _fill_from(free: Sequence[Row[Any]], order: list[int], max_images: int) -> list[Row[Any]]:
    """The fairest of the `free` jobs (rows that end with BATCH_KEY_COLUMNS, by their place in `order`),
    and those of its batch key after it, up to `max_images` images."""
    ranked = sorted(free, key=lambda job: order.index(job.seq))
    if not ranked:
        return []
    key = _batch_key(ranked[0])
    batch, images = [ranked[0]], ranked[0].n
    for job in ranked[1:]:
        if _batch_key(job) == key and images + job.n <= max_images:
            batch.append(job)
            images += job.n
    return batch


# Statements every batch runs, each built once (functools.cache) and run with its values bound: putting
# one together costs the event loop more than running it.

@functools.cache
def _job_without_images() -> Select[tuple[Job]]:
    """The job :job_id, its images not read (a running job has none yet)."""
    return select(Job).where(Job.id == bindparam("job_id")).options(lazyload(Job.images))


@functools.cache
def _jobs_without_images() -> Select[tuple[Job]]:
    """The jobs of the list :job_ids, their images not read."""
    return select(Job).where(Job.id.in_(bindparam("job_ids", expanding=True))).options(lazyload(Job.images))


@functools.cache
def _queued_jobs_to_lock() -> Select[Any]:
    """Of the jobs of the list :seqs still queued, oldest first, locked (rows another worker locked are
    skipped): the owners' platform user ids and names for the views, and the columns a claim chooses by,
    BATCH_KEY_COLUMNS last (_batch_key)."""
    return (select(Job.seq, Job.n, Job.user_id, User.platform_user_id.label("owner_id"),
                   User.display_name.label("owner_name"), *BATCH_KEY_COLUMNS)
            .join(User, User.id == Job.user_id)
            .where(Job.seq.in_(bindparam("seqs", expanding=True)), Job.status == JobStatus.QUEUED.value)
            .order_by(Job.seq).with_for_update(skip_locked=True, of=Job.__table__))


@functools.cache
def _mark_running() -> Update:
    """Start the jobs of the list :seqs for worker :worker_id at :now, in a batch of :images images, and
    return their rows as they are then. A training goes on from the steps its earlier slices ran."""
    return (update(Job.__table__).where(Job.seq.in_(bindparam("seqs", expanding=True)))
            .values(status=JobStatus.RUNNING.value, attempts=Job.attempts + 1, worker=bindparam("worker_id"),
                    started_at=bindparam("now"), heartbeat_at=bindparam("now"),
                    progress_step=case((Job.kind == JobKind.TEACH.value, Job.progress_step), else_=0),
                    progress_total=Job.steps, batch_size=bindparam("images"))
            .returning(*Job.__table__.columns))


@functools.cache
def _mark_served() -> Update:
    """The users of the list :user_ids were served at :now (round-robin goes by this)."""
    return update(User.__table__).where(User.id.in_(bindparam("user_ids", expanding=True))) \
        .values(last_served_at=bindparam("now"))


@functools.cache
def _count_passes() -> Update:
    """One more pass over each job of the list :seqs still queued (model affinity, choose_head)."""
    return update(Job.__table__).where(Job.seq.in_(bindparam("seqs", expanding=True)),
                                       Job.status == JobStatus.QUEUED.value) \
        .values(passed_over=Job.passed_over + 1)


@functools.cache
def _mark_succeeded(*, by_worker: bool) -> Update:
    """Move the jobs of the list :job_ids still running (`by_worker`: and still :worker_id's) to SUCCEEDED
    at :now, every step done, and return what completing them needs of each."""
    running = [Job.id.in_(bindparam("job_ids", expanding=True)), Job.status == JobStatus.RUNNING.value]
    if by_worker:
        running.append(Job.worker == bindparam("worker_id"))
    return (update(Job.__table__).where(*running)
            .values(status=JobStatus.SUCCEEDED.value, progress_step=Job.progress_total, finished_at=bindparam("now"),
                    error=None)
            .returning(Job.id, Job.platform, Job.user_id, Job.nsfw_allowed, Job.prompt))


@functools.cache
def _running_jobs() -> Select[Any]:
    """Every running job's seq, worker and last heartbeat."""
    return select(Job.seq, Job.worker, Job.heartbeat_at).where(Job.status == JobStatus.RUNNING.value)


@functools.cache
def _idle_workers_models() -> Select[tuple[list[str]]]:
    """The models of the idle workers other than :other_than with a heartbeat since :alive_since."""
    return select(WorkerRow.models).where(WorkerRow.status == WorkerStatus.IDLE.value,
                                          WorkerRow.id != bindparam("other_than"),
                                          WorkerRow.heartbeat_at >= bindparam("alive_since"))


class JobQueue:
    # How long progress events stay readable (a reader that fell further behind skips them).
    PROGRESS_KEPT = timedelta(hours=1)

    def __init__(self, settings: Settings, db: Database, store: ImageStore, bus: EventBus, policy: Policy,
                 clock: Clock) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.bus = bus  # staged events are announced by the unit of work's commit
        self.policy = policy
        self.clock = clock

    @property
    def LEASE(self) -> timedelta:  # upper case: it was a constant before it was configurable
        """How long a running job may go without a heartbeat before another worker takes it back."""
        return timedelta(seconds=self.settings.queue.lease_s)

    async def claim_batch(self, worker_id: str, max_images: int, loaded_models: Collection[str] = (),
                          *, may_leave: bool = False, train: bool = False) -> list[JobView]:
        """Mark up to `max_images` images' worth of compatible jobs running and return them.

        A worker holding `loaded_models` prefers their jobs within queue.affinity_max_passes
        (choose_head); with `may_leave` (a worker that polls again soon, not a burst), it leaves a job it
        would have to load a model for to an idle worker that has it (leave_to_idle_worker), and gets
        nothing this time. A slice of a training (kind teach) is claimed alone, and only by a worker
        that `train`s."""
        while True:
            # Choose on a read connection: an idle worker's empty claims never take the write lock that
            # submissions need. _start takes the chosen jobs only if they are still queued.
            async with self.db.reading() as connection:
                choice = await self._choose_batch(connection, max_images, loaded_models,
                                                  leave_for_others_than=worker_id if may_leave else None, train=train)
            if not choice.chosen:
                return []
            views = await self._start(worker_id, choice, max_images)
            if views:  # else other workers took all of them and the spare heads meanwhile: choose again
                return views

    async def _start(self, worker_id: str, choice: BatchChoice, max_images: int) -> list[JobView]:
        """Mark the chosen jobs running, leaving out any another worker took after they were chosen; count
        a pass on each fairer job passed over for them (model affinity).

        In SQLAlchemy Core, with no ORM objects: a claim waits for this while the device stands idle,
        and loading the jobs as objects and flushing their changes cost the event loop twice as much."""
        now = self.clock()
        async with self.db.unit_of_work(first=True) as uow:  # the device waits for it; submissions can wait
            connection = await uow.session.connection()
            batch, passed = await self._lock_queued(connection, choice.chosen), choice.passed
            if not batch and choice.spare:
                # Workers that claim at once read the same fair heads, and all but one find theirs taken.
                # Rather than choosing again (the costly query), take the fairest spare heads still free.
                free = await self._lock_queued(connection, choice.spare, fairest=max_images)
                batch = _fill_from(free, choice.spare, max_images)
                passed = []  # those passes were for the jobs another worker took
            if not batch:
                return []
            images = sum(job.n for job in batch)
            started = sorted((await connection.execute(_mark_running(), {
                "seqs": [job.seq for job in batch], "worker_id": worker_id, "now": now, "images": images})).all(),
                key=lambda job: job.seq)
            await connection.execute(_mark_served(), {"user_ids": sorted({job.user_id for job in batch}), "now": now})
            if passed:
                await connection.execute(_count_passes(), {"seqs": passed})
            for job in started:
                self.bus.stage(uow, job, EventKind.STARTED, {"batch_size": images})
            await uow.commit()
        owners = {job.seq: (job.owner_id, job.owner_name) for job in batch}
        return [job_view_of(job, *owners[job.seq]) for job in started]  # no images: a queued job has none yet

    @staticmethod
    async def _lock_queued(connection: AsyncConnection, seqs: list[int], fairest: int | None = None) -> list[Row[Any]]:
        """The jobs of `seqs` still queued, locked; those another worker has locked are left out. With
        `fairest`, only that many, the first in the order of `seqs`: the others stay free for the other
        workers claiming at the same moment."""
        if fairest is None:
            query = _queued_jobs_to_lock()
        else:  # rarely: only when workers claim at the same moment
            query = _queued_jobs_to_lock().order_by(None).order_by(
                case({seq: place for place, seq in enumerate(seqs)}, value=Job.seq)).limit(fairest)
        return list((await connection.execute(query, {"seqs": seqs})).all())

    async def _choose_batch(self, connection: AsyncConnection, max_images: int, loaded_models: Collection[str] = (),
                            leave_for_others_than: str | None = None, train: bool = False) -> BatchChoice:
        """The seqs of the next batch: the fairest head job (or, with affinity, a head for a model the
        worker has loaded: choose_head), then compatible jobs to fill it; and the seqs of the fairer
        heads passed over. Nothing when the head is better left to an idle worker other than
        `leave_for_others_than` (when given) that has its model loaded. A training slice (`train`
        only) is a batch alone.

        Only a few columns of the candidates are read; the chosen rows are loaded by the caller. One
        query usually settles it: the fair heads come with each user's count of waiting jobs, so when
        they are all there and each user waits for one job, there is nothing else to look for.
        """
        limit = 16 * max_images  # enough spare heads for workers that claim at the same moment (_start)
        heads = (await connection.execute(self._fair_heads(train), {"limit": limit})).all()
        if not heads:
            return BatchChoice([])
        now = self.clock()
        candidates = [Head(row.model, row.passed_over, (now - row.created_at).total_seconds()) for row in heads]
        index = choose_head(candidates, loaded_models, self.settings.queue.affinity_max_passes)
        max_wait_s = self.settings.queue.affinity_max_wait_s
        if leave_for_others_than is not None and max_wait_s and candidates[index].model not in loaded_models \
                and candidates[index].waited_s < max_wait_s:
            idle_elsewhere = await self._models_on_idle_workers(connection, leave_for_others_than)
            if leave_to_idle_worker(candidates[index], loaded_models, idle_elsewhere, max_wait_s):
                return BatchChoice([])
        head, key = heads[index], _batch_key(heads[index])
        passed = [row.seq for row in heads[:index]]
        # Spare heads for _start's fallback: never a training slice, which must run alone.
        spare = [row.seq for row in heads if row.seq != head.seq and row.kind != JobKind.TEACH.value]
        if head.kind == JobKind.TEACH.value:
            return BatchChoice([head.seq], passed)  # one training slice at a time: no diffusers call to share
        chosen, images = [head.seq], head.n
        every_waiting_job_seen = len(heads) < limit and all(row.waiting == 1 for row in heads)
        # Fill: other users' first jobs in fair order, then anyone's in submission order.
        fair = [row for row in heads if row.seq != head.seq and _batch_key(row) == key]
        queries = []
        if not every_waiting_job_seen:
            same_key = [column == value if value is not None else column.is_(None)
                        for column, value in zip(BATCH_KEY_COLUMNS, key, strict=True)]
            queries = [select(Job.seq, Job.n).where(Job.status == JobStatus.QUEUED.value, *same_key)
                       .order_by(Job.seq).limit(bindparam("limit", type_=Integer))]
            if len(heads) == limit:  # more users wait than were read: ask for their heads of this key
                fair, queries = [], [self._fair_heads(train).where(*same_key), *queries]
        for query in (None, *queries):
            rows = fair if query is None else (await connection.execute(query, {"limit": limit})).all()
            for seq, n, *_ in rows:
                if images >= max_images:
                    return BatchChoice(chosen, passed, [seq for seq in spare if seq not in chosen])
                if seq not in chosen and images + n <= max_images:
                    chosen.append(seq)
                    images += n
        return BatchChoice(chosen, passed, [seq for seq in spare if seq not in chosen])

    async def _models_on_idle_workers(self, connection: AsyncConnection, other_than: str) -> set[str]:
        """The models loaded on workers the registry shows idle and alive (a heartbeat within the lease)."""
        rows = await connection.scalars(_idle_workers_models(),
                                     {"other_than": other_than, "alive_since": self.clock() - self.LEASE})
        return {model for models in rows for model in models}

    @staticmethod
    @functools.cache  # built once: putting this statement together took 1.5 ms, and every claim asks for it
    def _fair_heads(train: bool = False) -> Select[Any]:
        """Each user's oldest waiting job (seq, n, the user's waiting jobs, its passes, when it was
        submitted, batch key), the least recently served user first. A user's generation jobs go before
        their own waiting training slice (which was queued before them), and trainings not at all unless
        `train`. At most :limit of them. (A statement is never changed in place: `.where()` makes a new one.)"""
        other = aliased(Job)
        generation_waits = select(other.seq).where(
            other.user_id == Job.user_id, other.status == JobStatus.QUEUED.value,
            other.kind != JobKind.TEACH.value).exists()
        eligible = (or_(Job.kind != JobKind.TEACH.value, ~generation_waits) if train
                    else Job.kind != JobKind.TEACH.value)
        heads = (select(Job.user_id, func.min(Job.seq).label("seq"), func.count().label("waiting"))
                 .where(Job.status == JobStatus.QUEUED.value, eligible).group_by(Job.user_id).subquery())
        return (select(Job.seq, Job.n, heads.c.waiting, Job.passed_over, Job.created_at, *BATCH_KEY_COLUMNS)
                .join(heads, Job.seq == heads.c.seq)
                .join(User, User.id == Job.user_id)
                .order_by(User.last_served_at.is_not(None), User.last_served_at, Job.seq)
                .limit(bindparam("limit", type_=Integer)))

    async def report_progress(self, job_ids: Sequence[str], step: int, total: int,
                              previews: Sequence[bytes] | None = None, worker_id: str | None = None) -> set[str]:
        """Record step i/n for running jobs (also the heartbeat), with a JPEG preview per job when
        given. Returns the ids no longer running (cancelled by their owner) or, with `worker_id`, no
        longer this worker's (taken back after its lease ran out), so the worker can stop spending
        time on them."""
        now = self.clock()
        preview_of = dict(zip(job_ids, previews, strict=True)) if previews else {}
        async with self.db.unit_of_work() as uow:
            jobs = (await uow.session.scalars(_jobs_without_images(), {"job_ids": list(job_ids)})).unique().all()
            gone = set()
            for job in jobs:
                if job.status != JobStatus.RUNNING.value or worker_id not in (None, job.worker):
                    gone.add(job.id)
                    continue
                job.progress_step, job.progress_total, job.heartbeat_at = step, total, now
                payload: dict[str, Any] = {"step": step, "total": total}
                if job.id in preview_of:
                    payload["preview"] = "data:image/jpeg;base64," + base64.b64encode(preview_of[job.id]).decode()
                self.bus.stage(uow, job, EventKind.PROGRESS, payload)
            await uow.commit()
        return gone

    async def heartbeat(self, worker_id: str, job_ids: Sequence[str]) -> set[str]:
        """Renew the lease of `worker_id` on its running jobs among `job_ids`. Returns the ids that are
        no longer running or no longer its own."""
        async with self.db.unit_of_work() as uow:
            kept = set(await uow.session.scalars(select(Job.id).where(
                Job.id.in_(job_ids), Job.status == JobStatus.RUNNING.value, Job.worker == worker_id)))
            if kept:
                await uow.session.execute(update(Job).where(Job.id.in_(kept)).values(heartbeat_at=self.clock()))
            await uow.commit()
        return set(job_ids) - kept

    async def complete(self, job_id: str, images: Sequence[tuple[int, StoredImage]],
                       verdicts: Sequence[ImageVerdict | None] = (), worker_id: str | None = None) -> bool:
        """Store the image rows and mark the job done. False if it was cancelled meanwhile or, with
        `worker_id`, taken back by another worker after this one lost its lease.

        `verdicts` are the output check's, one per image (None = not flagged). A flagged image is
        spoilered where the job's place allows NSFW, else withheld; each is recorded on the image and
        as a safety flag row (a withheld one may be a strike, see moderation.strike_actions).
        """
        return job_id in await self.complete_batch([Finished(job_id, images, verdicts)], worker_id=worker_id)

    async def complete_batch(self, finished: Sequence[Finished], worker_id: str | None = None) -> set[str]:
        """`complete` for the jobs of one batch, in one unit of work: the ids of those completed (the
        others were cancelled or taken back meanwhile).

        In SQLAlchemy Core, like the claim (`_start`): one UPDATE moves every job still running (and still
        this worker's) to SUCCEEDED and says which those are, and one INSERT writes all their image rows.
        Only a flagged image's safety flag and strike go through the ORM (bot/policy.py), rarely."""
        now = self.clock()
        async with self.db.unit_of_work() as uow:
            connection = await uow.session.connection()
            succeeded = {job.id: job for job in await connection.execute(
                _mark_succeeded(by_worker=worker_id is not None),
                {"job_ids": [each.job_id for each in finished], "worker_id": worker_id, "now": now})}
            image_rows = []
            for each in finished:  # in the batch's order: its jobs' done events are read in this order
                if (job := succeeded.get(each.job_id)) is not None:
                    image_rows += await self._image_rows(uow, job, each, now)
                    # What may be shown of the images is decided at delivery (bot/delivery.py), from these rows.
                    self.bus.stage(uow, job, EventKind.DONE)
            if image_rows:
                await connection.execute(insert(Image.__table__), image_rows)
            await uow.commit()
        return set(succeeded)

    async def _image_rows(self, uow: UnitOfWork, job: Row[Any], finished: Finished,
                          now: datetime) -> list[dict[str, Any]]:
        """A succeeded job's image rows, to insert; its safety flags (and strike) are recorded here."""
        verdicts = list(finished.verdicts) or [None] * len(finished.images)
        rows, owner = [], None
        for index, ((seed, stored), verdict) in enumerate(zip(finished.images, verdicts, strict=True)):
            action = image_action(job.nsfw_allowed) if verdict is not None else None
            rows.append({"job_id": job.id, "index": index, "seed": seed, "sha256": stored.sha256,
                         "width": stored.width, "height": stored.height, "size_bytes": stored.size_bytes,
                         "safety_flags": [f"{verdict.category}:{action}"] if verdict else [], "created_at": now})
            if verdict is not None:
                owner = owner or await uow.session.get(User, job.user_id)
                await self.policy.record(uow, owner, subject=f"image:{stored.sha256}",
                                         category=verdict.category, reason_code=verdict.reason_code,
                                         source="image_check", action=action, now=now, job_id=job.id,
                                         detail=f"image {index + 1} of job {job.id}: {job.prompt}")
        if owner is not None and WITHHOLD in self.settings.moderation.strike_actions \
                and any(flagged_category(row["safety_flags"], WITHHOLD) is not None for row in rows):
            await self.policy.strike(uow, owner, now)
        return rows

    # -- trainings (bot/teach.py): one queue entry, claimed once per slice of steps ------------------

    async def training(self, job_id: str) -> TrainingView:
        async with self.db.unit_of_work(write=False) as uow:
            row = await uow.session.scalar(select(Training).where(Training.job_id == job_id))
            if row is None:
                raise LookupError(f"job {job_id} is not a training")
            return training_view(row)

    async def requeue_slice(self, job_id: str, worker_id: str, step: int, loss: float, eta_s: float,
                            sample: bytes | None = None) -> bool:
        """A slice of a training ran to `step` and its state is checkpointed: put the training back in
        the queue behind the other users' jobs (its owner was just served), with a progress event
        (step, loss, seconds left, maybe a sample picture). False if it was cancelled or taken back."""
        now = self.clock()
        async with self.db.unit_of_work() as uow:
            job = await uow.session.scalar(_job_without_images(), {"job_id": job_id})
            if job is None or job.status != JobStatus.RUNNING.value or job.worker != worker_id:
                return False
            training = await uow.session.scalar(select(Training).where(Training.job_id == job_id))
            training.losses = [*training.losses, round(loss, 5)]
            job.status, job.worker, job.heartbeat_at = JobStatus.QUEUED.value, None, now
            job.progress_step = step
            job.attempts = 0  # a slice that ran to its end is no failed attempt
            job.user.last_served_at = now
            payload: dict[str, Any] = {"step": step, "total": job.steps, "loss": round(loss, 5),
                                       "eta_s": round(eta_s, 1), "training": training.name}
            if sample is not None:
                payload["sample"] = "data:image/png;base64," + base64.b64encode(sample).decode()
            self.bus.stage(uow, job, EventKind.PROGRESS, payload)
            await uow.commit()
        return True

    async def ended_since(self, since: datetime, kinds: Sequence[JobKind]) -> list[EndedJob]:
        """The jobs of `kinds` that succeeded, failed or were cancelled at `since` or later."""
        async with self.db.unit_of_work(write=False) as uow:
            rows = (await uow.session.execute(select(Job.id, Job.kind, Job.status).where(
                Job.kind.in_([kind.value for kind in kinds]), Job.finished_at >= since).order_by(Job.id))).all()
        return [EndedJob(job_id, JobKind(kind), JobStatus(status)) for job_id, kind, status in rows]

    async def record_training_loss(self, job_id: str, loss: float) -> None:
        """The last slice's mean loss, before the training completes."""
        async with self.db.unit_of_work() as uow:
            training = await uow.session.scalar(select(Training).where(Training.job_id == job_id))
            if training is not None:
                training.losses = [*training.losses, round(loss, 5)]
            await uow.commit()

    async def fail(self, job_id: str, error: str, worker_id: str | None = None) -> None:
        """Mark a running job failed with `error`, the message its owner reads. With `worker_id`, only
        while it is still that worker's: a job taken back meanwhile belongs to its new worker."""
        async with self.db.unit_of_work() as uow:
            job = await uow.session.scalar(select(Job).where(Job.id == job_id))
            if job is None or job.status != JobStatus.RUNNING.value or worker_id not in (None, job.worker):
                return
            await finish_job(uow, self.bus, job, JobStatus.FAILED, error=error)
            await uow.commit()

    async def requeue_abandoned(
        self, is_dead: Callable[[str], bool] = is_local_process_dead, now: datetime | None = None,
        by: str | None = None,
    ) -> RecoveryReport:
        """Give jobs of dead workers, and jobs whose lease ran out, back to the queue, or fail those
        tried too often. The jobs of worker `by` (the caller) are left alone: it is running them, or
        it is stuck and cannot run them again anyway; another worker or its watchdog acts then."""
        now = now or self.clock()
        report = RecoveryReport([], [])
        max_attempts = self.settings.queue.max_attempts

        def abandoned(worker: str | None, heartbeat_at: datetime | None) -> bool:
            if by is not None and worker == by:
                return False
            stale = heartbeat_at is None or now - heartbeat_at > self.LEASE
            return stale or bool(worker and is_dead(worker))

        # Every worker asks this every lease_s/4: look with a read first (no session, no transaction), so
        # that the usual answer (nothing abandoned) never takes the write lock submissions need.
        running = await self.db.read(_running_jobs(), {})
        candidates = [seq for seq, worker, heartbeat_at in running if abandoned(worker, heartbeat_at)]
        if not candidates:
            return report
        async with self.db.unit_of_work() as uow:
            running = (await uow.session.scalars(select(Job).where(
                Job.seq.in_(candidates), Job.status == JobStatus.RUNNING.value))).unique().all()
            for job in running:
                if not abandoned(job.worker, job.heartbeat_at):  # its worker renewed it meanwhile
                    continue
                if job.attempts >= max_attempts:
                    await finish_job(uow, self.bus, job, JobStatus.FAILED, error=(
                        f"The worker stopped {job.attempts} times while running this job, so it was not "
                        f"retried again. Try fewer images (--n) or a smaller --size."))
                    report.failed.append(job.id)
                else:  # a training keeps its step: its checkpoint holds the slices it ran
                    job.status, job.worker = JobStatus.QUEUED.value, None
                    job.progress_step = job.progress_step if job.kind == JobKind.TEACH.value else 0
                    self.bus.stage(uow, job, EventKind.QUEUED, {"position": 1, "requeued": True})
                    report.requeued.append(job.id)
            await uow.commit()
        return report

    async def prune_progress_events(self, now: datetime | None = None) -> int:
        """Delete progress events older than PROGRESS_KEPT: they only matter while a job runs, and
        there are several per job. The other events (a job's story) are kept. Returns how many."""
        cutoff = (now or self.clock()) - self.PROGRESS_KEPT
        async with self.db.unit_of_work() as uow:
            deleted = await uow.session.execute(
                delete(JobEvent).where(JobEvent.kind == "progress", JobEvent.created_at < cutoff))
            await uow.commit()
        return deleted.rowcount or 0

    async def waiting(self) -> tuple[int, datetime | None]:
        """Images waiting in the queue, and when the oldest waiting job was submitted."""
        [(images, oldest)] = await self.db.read(select(func.coalesce(func.sum(Job.n), 0), func.min(Job.created_at))
                                                .where(Job.status == JobStatus.QUEUED.value), {})
        return int(images), oldest  # MIN keeps the column's type: an aware datetime
