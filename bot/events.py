"""Job events: an outbox table plus a wake-up for readers in the same process.

The worker stages an event in the same transaction as the state change it describes (`stage`), so an
event exists exactly when the change does. Readers (`watch`, `follow`) read the table in id order. A
reader in the same process as the writer is woken at once by `notify`, which the unit of work calls
itself when it commits staged events; one in another process (the worker on a GPU host, the bot
elsewhere) finds new rows on its next poll.

`notify` names the jobs that changed, and wakes only the watchers of those jobs (plus every platform
follower and the idle worker): with many users watching their own jobs, one job's progress costs one
read, not one read per watcher. For the same reason the job watchers share one poll for other processes'
events (`_poll_for_watchers`): each interval it asks which jobs have new events and wakes their watchers,
so sixteen people waiting cost one query per interval, not sixteen reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Integer, Row, Select, bindparam, func, select

from bot.clock import utcnow
from bot.database import Database, UnitOfWork
from bot.models import Job, JobEvent

log = logging.getLogger(__name__)

READ_LIMIT = 200  # events per read of a stream
# A job watcher never waits on the shared poll alone: should it stall, each watcher still reads this often.
WATCHER_FALLBACK_POLLS = 20


class EventKind(StrEnum):
    """What happened to a job. The value is what the job_events table and the HTTP API's SSE say."""

    QUEUED = "queued"  # accepted, or given back to the queue after its worker died
    STARTED = "started"  # a worker claimed it
    PROGRESS = "progress"  # step i of n, maybe with a live preview
    DONE = "done"  # every image stored (some may be withheld: bot/delivery.py decides what is shown)
    FAILED = "failed"  # gave up; the job's error says why
    CANCELLED = "cancelled"  # stopped by its owner
    RELEASED = "released"  # a moderator accepted an appeal: withheld images may now be shown

    @property
    def is_final(self) -> bool:
        """The job's last state change: after it the owner must have been told the outcome."""
        return self in (EventKind.DONE, EventKind.FAILED, EventKind.CANCELLED)


@dataclass(frozen=True)
class Event:
    """One thing that happened to a job, as the outbox stores it. Adapters never read these: they
    get a `bot.delivery.Delivery`, which says what may be shown where.

    kinds and payloads:
      queued    {"position": int, "requeued"?: true}
      started   {"batch_size": int}
      progress  {"step": int, "total": int, "preview"?: "data:image/jpeg;base64,..."}
      done      {}  (the images are the job's rows)
      failed    {"error": str}
      cancelled {}
      released  {"indexes": [int]}  (images a moderator released after an appeal)
    """

    id: int
    job_id: str
    platform: str
    kind: EventKind
    payload: dict[str, Any]
    created_at: datetime

    @property
    def is_final(self) -> bool:
        return self.kind.is_final


@functools.cache  # built once per shape: every follower and every job watcher asks for it, many times a second
def _events_after(*, by_platform: bool, by_job: bool) -> Select[Any]:
    """Events after :last_id, oldest first, at most :limit; of one :platform, of one :job_id. The table's
    rows, not ORM objects: they are read for Event values, never changed."""
    query = select(JobEvent.__table__).where(JobEvent.id > bindparam("last_id")).order_by(JobEvent.id) \
        .limit(bindparam("limit", type_=Integer))
    if by_platform:
        query = query.where(JobEvent.platform == bindparam("platform"))
    if by_job:
        query = query.where(JobEvent.job_id == bindparam("job_id"))
    return query


# Read with Database.read, no session: the shared poll asks every poll interval while people wait on jobs
# another process runs, and a session cost the event loop twice what the statement did.

@functools.cache
def _latest_event_id() -> Select[Any]:
    return select(func.max(JobEvent.id))


@functools.cache
def _newest_event_id_by_job() -> Select[Any]:
    """Each job with events after :after_id, and the id of its newest."""
    return select(JobEvent.job_id, func.max(JobEvent.id)).where(JobEvent.id > bindparam("after_id")) \
        .group_by(JobEvent.job_id)


def _to_event(row: JobEvent | Row[Any]) -> Event:
    return Event(row.id, row.job_id, row.platform, EventKind(row.kind), dict(row.payload or {}), row.created_at)


class EventBus:
    def __init__(self, db: Database, poll_interval_s: float = 0.25, *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._db = db
        self.clock = clock  # the events' created_at
        self.poll_interval_s = poll_interval_s  # how often a reader looks for other processes' events
        self._changed = asyncio.Event()  # set (and replaced) on every notify
        # Each waiting job watcher's wake-up, by job id, with the last event id that watcher has read.
        self._job_wake_ups: dict[str, dict[asyncio.Event, int]] = {}
        self._job_watchers = 0  # job streams open in this process: the shared poll runs while there are any
        self._poll: asyncio.Task[None] | None = None  # the shared poll; it ends when the last job watcher leaves
        self._poll_started: asyncio.Future[None] | None = None  # done once that poll has its start id
        self._notified_since_poll: set[str] = set()  # jobs whose watchers commits here woke since its last look
        self.submissions_under_way = 0  # JobService.submit calls running in this process
        self._submission_ended = asyncio.Event()  # set (and replaced) as each of them ends

    def stage(self, uow: UnitOfWork, job: Job | Row[Any], kind: EventKind,
              payload: dict[str, Any] | None = None) -> None:
        """Add an event of `job` (an ORM object or a row of its table) to the unit of work; it is published
        when (and only if) that commits: the commit then notifies this process's readers of the job."""
        uow.insert_at_commit(JobEvent.__table__, {"job_id": job.id, "platform": job.platform, "kind": str(kind),
                                                   "payload": payload or {}, "created_at": self.clock()})
        uow.after_commit(self.notify, job.id)

    def notify(self, job_ids: Iterable[str]) -> None:
        """Wake readers in this process of `job_ids` (and every platform follower). A unit of work calls
        this when it commits events `stage`d on it; a second call for the same change is harmless."""
        self._changed.set()
        self._changed = asyncio.Event()
        job_ids = list(job_ids)
        self._notified_since_poll.update(job_ids)
        self._wake_watchers(job_ids)

    def _wake_watchers(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            for wake_up in self._job_wake_ups.get(job_id, ()):
                wake_up.set()

    async def read_after(self, last_id: int, *, platform: str | None = None, job_id: str | None = None,
                         limit: int = READ_LIMIT) -> list[Event]:
        query = _events_after(by_platform=platform is not None, by_job=job_id is not None)
        values = {"last_id": last_id, "limit": limit, "platform": platform, "job_id": job_id}
        return [_to_event(row) for row in await self._db.read(query, values)]

    async def latest_of(self, job_id: str, kind: EventKind) -> Event | None:
        """A job's newest event of one kind (e.g. its last progress, with the newest preview), or None."""
        query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == str(kind)) \
            .order_by(JobEvent.id.desc()).limit(1)
        async with self._db.unit_of_work(write=False) as uow:
            row = await uow.session.scalar(query)
            return _to_event(row) if row is not None else None

    async def latest_id(self) -> int:
        [(latest,)] = await self._db.read(_latest_event_id(), {})
        return latest or 0

    async def watch(self, job_id: str) -> AsyncIterator[Event]:
        """Every event of one job from its first, ending after the final one (done, failed, cancelled)."""
        async for event in self._stream(0, job_id=job_id):
            yield event
            if event.is_final:
                return

    async def follow(self, platform: str, after_id: int | None = None) -> AsyncIterator[Event]:
        """Every new event of one platform, forever (an adapter's event loop)."""
        last_id = await self.latest_id() if after_id is None else after_id
        async for event in self._stream(last_id, platform=platform):
            yield event

    async def _stream(self, last_id: int, *, platform: str | None = None,
                      job_id: str | None = None) -> AsyncIterator[Event]:
        """Events after `last_id` of one platform or one job, in order, waiting for new ones when
        caught up. A platform follower polls for other processes' events itself; a job watcher is woken
        by the poll all job watchers share."""
        if job_id is not None:
            await self._join_shared_poll()
        # A job watcher reads by itself only as a fallback (the shared poll wakes it); a follower polls itself.
        wait_s = self.poll_interval_s * (WATCHER_FALLBACK_POLLS if job_id is not None else 1)
        try:
            while True:
                # Take the wake-up before reading, so a notify between the read and the wait still wakes us.
                wake_up = self._wake_up_for(job_id, last_id)
                try:
                    events = await self.read_after(last_id, platform=platform, job_id=job_id, limit=READ_LIMIT)
                    for event in events:
                        last_id = event.id
                        yield event
                    if job_id is not None:  # the shared poll wakes it only for events after these
                        self._job_wake_ups[job_id][wake_up] = last_id
                    if len(events) < READ_LIMIT:  # caught up: wait (at once done if notified since the read)
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(wait_s):  # not wait_for: see wait_for_change
                                await wake_up.wait()
                finally:
                    self._forget_wake_up(job_id, wake_up)
        finally:
            if job_id is not None:
                self._job_watchers -= 1

    async def _join_shared_poll(self) -> None:
        """Count a job watcher in, starting the shared poll if none runs, and return once the poll knows
        where it starts: the watcher reads after that, so an event the poll does not report is one the
        watcher has read."""
        self._job_watchers += 1
        loop = asyncio.get_running_loop()
        if self._poll is None or self._poll.done() or self._poll.get_loop() is not loop:
            self._poll_started = loop.create_future()
            self._poll = asyncio.create_task(self._poll_for_watchers(self._poll_started), name="easel-events-poll")
        try:
            await asyncio.shield(self._poll_started)
        except BaseException:
            self._job_watchers -= 1
            raise

    async def _poll_for_watchers(self, started: asyncio.Future[None]) -> None:
        """While any job watcher is open: every poll interval, wake the watchers of the jobs that have new
        events. Those of this process were woken at commit already; this finds other processes' (a worker
        on another host). A failed look is logged and wakes every watcher, which then reads for itself."""
        try:
            after = await self.latest_id()
        except Exception as error:
            started.set_exception(error)
            return
        started.set_result(None)
        while self._job_watchers > 0:
            await asyncio.sleep(self.poll_interval_s)
            notified, self._notified_since_poll = self._notified_since_poll, set()
            if self._job_wake_ups.keys() <= notified:
                # Every watcher was woken by this process's commits since the last look and read all its job's
                # events then, other processes' too. What came after those reads the next look finds: another
                # process's event may reach a watcher one interval later, and with a worker here and one user
                # waiting, this skips most looks.
                continue
            try:
                newest = await self._newest_event_per_job(after)
            except Exception:
                log.warning("could not look for new job events; every watcher reads for itself", exc_info=True)
                self._wake_watchers(self._job_wake_ups)
                continue
            if newest:
                after = max(newest.values())
            for job_id, newest_id in newest.items():  # not the watchers that read them already
                for wake_up, read_up_to in self._job_wake_ups.get(job_id, {}).items():
                    if newest_id > read_up_to:
                        wake_up.set()

    async def _newest_event_per_job(self, after_id: int) -> dict[str, int]:
        rows = await self._db.read(_newest_event_id_by_job(), {"after_id": after_id})
        return {job_id: newest for job_id, newest in rows}

    def _wake_up_for(self, job_id: str | None, read_up_to: int) -> asyncio.Event:
        if job_id is None:
            return self._changed
        wake_up = asyncio.Event()
        self._job_wake_ups.setdefault(job_id, {})[wake_up] = read_up_to
        return wake_up

    def _forget_wake_up(self, job_id: str | None, wake_up: asyncio.Event) -> None:
        waiting = self._job_wake_ups.get(job_id) if job_id is not None else None
        if waiting is not None:
            waiting.pop(wake_up, None)
            if not waiting:
                del self._job_wake_ups[job_id]

    @contextlib.asynccontextmanager
    async def submission_under_way(self) -> AsyncIterator[None]:
        """Count a job submission under way in this process: a worker about to claim a batch waits for
        those (usually milliseconds from the queue) rather than start one a moment too early."""
        self.submissions_under_way += 1
        try:
            yield
        finally:
            self.submissions_under_way -= 1
            # Its own wake-up, not notify(): that would make every platform follower read again for nothing.
            self._submission_ended.set()
            self._submission_ended = asyncio.Event()

    def submission_marker(self) -> asyncio.Event:
        """Like change_marker, for submissions ending (queued or refused): `wait_for_a_submission(since=
        marker)` returns at once if one ended after the marker was taken."""
        return self._submission_ended

    async def wait_for_a_submission(self, timeout_s: float, since: asyncio.Event | None = None) -> None:
        """Return when a submission in this process ends (or the first since `since`), or after `timeout_s`."""
        await _wait_until_set(since or self._submission_ended, timeout_s)

    def change_marker(self) -> asyncio.Event:
        """A marker of "now": `wait_for_change(since=marker)` returns at once if anything was
        notified after the marker was taken, so a change between a read and the wait is never missed."""
        return self._changed

    async def wait_for_change(self, timeout_s: float, since: asyncio.Event | None = None) -> None:
        """Return on the next `notify` in this process (or the first since `since`), or after
        `timeout_s` (changes made by other processes are found by polling)."""
        await _wait_until_set(since or self._changed, timeout_s)


async def _wait_until_set(event: asyncio.Event, timeout_s: float) -> None:
    """Return when `event` is set, or after `timeout_s`."""
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation that arrives as the
    # event is set, and the cancelled caller (a stopping worker's loop) would carry on for ever.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
