"""Delivering job events to the adapter that owns the job, including after a restart.

Every chat adapter runs one `deliver_events` loop for its platform. It first hands over final
results that were never confirmed delivered (the adapter was down when the job finished), then
follows new events as they are written. The handler returns True once a final result is in front of
the user; only then is the job marked delivered, so a crash between the two means a repeat, never a
loss.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bot.events import Event
from bot.safety import done_payload
from bot.service import JobService
from bot.views import JobView

log = logging.getLogger("easel.delivery")

EventHandler = Callable[[Event, JobView], Awaitable[bool]]


def final_event_of(job: JobView) -> Event:
    """The final event of a finished job, rebuilt from its row (for redelivery after a restart)."""
    kind = {"succeeded": "done", "failed": "failed", "cancelled": "cancelled"}[job.status.value]
    payload: dict = {}
    if kind == "done":
        payload = done_payload(job.id, job.images)  # withheld images stay out, as in the live event
    elif kind == "failed":
        payload = {"error": job.error}
    return Event(id=0, job_id=job.id, platform=job.platform, kind=kind, payload=payload,
                 created_at=job.finished_at or job.created_at)


async def deliver_events(service: JobService, platform: str, handler: EventHandler,
                         stop: asyncio.Event | None = None, ready: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or forever): redeliver what was missed, then follow new events.

    `ready` is set once every later event is sure to be followed: an adapter takes commands only
    then, so the events of a job submitted at start-up are not missed.
    """
    bus = service.bus
    after_id = await bus.latest_id()  # taken first: anything later is followed, anything earlier redelivered
    if ready is not None:
        ready.set()
    delivered: set[str] = set()
    for job in await service.undelivered(platform):
        await _handle(service, handler, final_event_of(job), job, delivered)
    events = bus.follow(platform, after_id=after_id)
    while stop is None or not stop.is_set():
        next_event = asyncio.ensure_future(anext(events))
        waiters = {next_event} if stop is None else {next_event, asyncio.ensure_future(stop.wait())}
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        # Let a cancelled read unwind first: closing the generator while it still runs raises.
        await asyncio.gather(*pending, return_exceptions=True)
        if next_event not in done:
            break
        event = next_event.result()
        if event.is_final and event.job_id in delivered:
            continue
        await _handle(service, handler, event, await service.get_job(event.job_id), delivered)
    await events.aclose()


async def _handle(service: JobService, handler: EventHandler, event: Event, job: JobView,
                  delivered: set[str]) -> None:
    try:
        shown = await handler(event, job)
    except Exception:
        # One error hook for every adapter: log and keep serving. A final result that failed to
        # show stays undelivered and is tried again on the next start.
        log.exception("%s adapter failed to handle %s event of job %s", job.platform, event.kind, job.id)
        return
    if event.is_final and shown:
        delivered.add(job.id)
        await service.mark_delivered(job.id)
