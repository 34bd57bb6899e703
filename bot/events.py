"""Job events: an outbox table plus a wake-up for readers in the same process.

The worker stages an event in the same transaction as the state change it describes (`stage`), so an
event exists exactly when the change does. Readers (`watch`, `follow`) read the table in id order. A
reader in the same process as the writer is woken at once by `notify`; one in another process (the
worker on a GPU host, the bot elsewhere) finds new rows on its next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from bot.database import Database, UnitOfWork
from bot.models import Job, JobEvent

FINAL_EVENT_KINDS = frozenset({"done", "failed", "cancelled"})


@dataclass(frozen=True)
class Event:
    """One thing that happened to a job, as adapters receive it.

    kinds and payloads:
      queued    {"position": int}
      started   {"batch_size": int}
      progress  {"step": int, "total": int}
      done      {"images": [{"index", "seed", "sha256", "path", "width", "height", "spoiler"?}],
                 "withheld"?: [{"index", "seed", "category", "message"}], "notice"?: str}
                (see bot.safety.done_payload: show `notice`; send `spoiler` images behind a spoiler)
      failed    {"error": str}
      cancelled {}
    """

    id: int
    job_id: str
    platform: str
    kind: str
    payload: dict[str, Any]
    created_at: datetime

    @property
    def is_final(self) -> bool:
        return self.kind in FINAL_EVENT_KINDS


def _to_event(row: JobEvent) -> Event:
    return Event(row.id, row.job_id, row.platform, row.kind, dict(row.payload or {}), row.created_at)


class EventBus:
    def __init__(self, db: Database, poll_interval_s: float = 0.25) -> None:
        self._db = db
        self._poll_interval_s = poll_interval_s
        self._changed = asyncio.Event()

    @staticmethod
    def stage(uow: UnitOfWork, job: Job, kind: str, payload: dict[str, Any] | None = None) -> None:
        """Add an event to the unit of work; it is published when (and only if) that commits."""
        uow.session.add(JobEvent(job_id=job.id, platform=job.platform, kind=kind, payload=payload or {},
                                 created_at=datetime.now(UTC)))

    def notify(self) -> None:
        """Wake readers in this process; call after committing staged events."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def read_after(self, last_id: int, *, platform: str | None = None, job_id: str | None = None,
                         limit: int = 200) -> list[Event]:
        query = select(JobEvent).where(JobEvent.id > last_id).order_by(JobEvent.id).limit(limit)
        if platform is not None:
            query = query.where(JobEvent.platform == platform)
        if job_id is not None:
            query = query.where(JobEvent.job_id == job_id)
        async with self._db.unit_of_work(write=False) as uow:
            return [_to_event(row) for row in (await uow.session.scalars(query)).all()]

    async def latest_id(self) -> int:
        async with self._db.unit_of_work(write=False) as uow:
            return (await uow.session.scalar(select(func.max(JobEvent.id)))) or 0

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

    async def _stream(self, last_id: int, **where: str) -> AsyncIterator[Event]:
        """Events after `last_id` matching `where`, in order, waiting for new ones when caught up."""
        while True:
            # Capture the wake-up Event before reading, so a notify between the read and the wait
            # still wakes us.
            changed = self._changed
            events = await self.read_after(last_id, **where)
            for event in events:
                last_id = event.id
                yield event
            if not events:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=self._poll_interval_s)

    def change_marker(self) -> asyncio.Event:
        """A marker of "now": `wait_for_change(since=marker)` returns at once if anything was
        notified after the marker was taken, so a change between a read and the wait is never missed."""
        return self._changed

    async def wait_for_change(self, timeout_s: float, since: asyncio.Event | None = None) -> None:
        """Return on the next `notify` in this process (or the first since `since`), or after
        `timeout_s` (changes made by other processes are found by polling)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for((since or self._changed).wait(), timeout=timeout_s)
