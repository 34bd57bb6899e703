"""What each surface may show of a job, decided once, here; and handing it to the adapter that owns the job.

Every surface that shows a job (Discord, Telegram, the web chat, the HTTP API and its webhooks and
SSE, MCP answers, the console, `easel imagine -o`) renders a `Delivery` and nothing else. The
decision of what may be shown is made by `Deliveries`, from the job's rows:

- an image the output check withheld (flag `CATEGORY:withhold`) is never among `images`; it becomes
  a `WithheldNotice` (what, why, how to appeal) until a moderator accepts an appeal and releases it;
- an image flagged where NSFW is allowed (`CATEGORY:spoiler`) is shown with `spoiler=True`: behind
  the platform's spoiler, or not at all where the platform has none for that kind of message;
- a live preview (`generation.previews`) is passed on only where the final image could never be
  withheld: where the image check is off, or where NSFW is allowed (then behind a spoiler). Where
  the check is on and NSFW is not allowed, progress comes without a preview: the check runs on the
  final image only, and a preview must never show more than the final image may.

Each platform runs one `deliver_events` loop. It first hands over final results that were never
confirmed delivered (the adapter was down when the job finished), then follows new events. The
handler returns True once a final result is in front of the user; only then is the job marked
delivered, so a crash between the two means a repeat, never a loss. Events of different jobs are
delivered concurrently (at most `delivery.concurrency` at once per platform), each job's in order:
a rate-limited or slow message for one user never holds up another user's progress or result.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from bot.config import Settings
from bot.domain import JobStatus
from bot.events import Event, EventKind
from bot.safety import SPOILER, WITHHOLD, flagged_category
from bot.service import JobService
from bot.views import JobView

log = logging.getLogger("easel.delivery")

SHUTDOWN_GRACE_S = 10.0  # how long deliveries in flight may finish when an adapter stops

# Where an /animate clip also goes out as a GIF (bot/animation.py's GIF_NAME), because a GIF previews better
# there than the MP4: the console and `easel animate -o` (a file opened in an image viewer, or dropped into a
# document or another chat, loops as a GIF where an MP4 needs a video player) and the HTTP API (its job's
# `gif` link, for clients that show Markdown images and play no video, as Open WebUI and LibreChat do).
# Discord, Telegram (sendAnimation) and the web chat (<video>) play the MP4 inline, at a fraction of the
# GIF's bytes: the MP4 alone there. Either goes only where the clip's poster may (the Delivery's images).
GIF_SURFACES = frozenset({"console", "http"})


def offers_gif(surface: str) -> bool:
    """Whether an /animate clip is offered as a GIF, beside its MP4, on `surface` (see GIF_SURFACES)."""
    return surface in GIF_SURFACES


@dataclass(frozen=True)
class ShownImage:
    """An image that may be shown where the job was asked for."""

    index: int  # 0-based position in the job
    seed: int
    sha256: str
    path: str  # where the PNG lives: a file path or an s3:// URL (adapters read it through the store)
    width: int
    height: int
    spoiler: bool = False  # flagged, in a place that allows NSFW: show it only behind a spoiler


@dataclass(frozen=True)
class WithheldNotice:
    """An image that must not be shown, and the words that say so."""

    index: int
    seed: int
    category: str  # what the image check flagged it as, e.g. "nsfw"
    message: str  # what happened, why, and how to appeal


@dataclass(frozen=True)
class Delivery:
    """One thing to show a user about their job. Adapters render it and decide nothing.

    `job` gives the words to write (prompt, settings, seeds, id); `images` are the only pictures that
    may be sent, `withheld` says why others are missing. Only buttons for `images` may be offered.
    """

    kind: EventKind
    job: JobView
    images: tuple[ShownImage, ...] = ()
    withheld: tuple[WithheldNotice, ...] = ()
    position: int | None = None  # QUEUED: 1 = next to run
    # STARTED: images in the diffusers call the job joined, from the event itself: a job read before its
    # claim (a stream opened while it was queued) has no batch size yet.
    batch_size: int | None = None
    step: int = 0  # PROGRESS: step of total
    total: int = 0
    preview: str | None = None  # PROGRESS: a data: URL of a rough picture so far, when allowed here
    preview_spoiler: bool = False  # show the preview only behind a spoiler (blurred)
    error: str | None = None  # FAILED: what went wrong, in words the user can act on
    # PROGRESS of a /teach training, after each slice: the slice's mean loss, the seconds still to go,
    # and now and then a sample picture (a data: URL) made with the LoRA so far; it passed the image check.
    loss: float | None = None
    eta_s: float | None = None
    sample: str | None = None

    @property
    def is_final(self) -> bool:
        return self.kind.is_final

    @property
    def notice(self) -> str:
        """Every withheld image's message, as one paragraph ("" when nothing was withheld)."""
        return " ".join(item.message for item in self.withheld)


def withheld_message(job_id: str, index: int, category: str) -> str:
    return (f"Image {index + 1} was withheld: the image check flagged it as {category}, which is not allowed "
            f"here. If this is a mistake: /appeal {job_id} <why>")


class Deliveries:
    """Builds deliveries under the settings' safety rules. Built once (bot/bootstrap.py)."""

    def __init__(self, settings: Settings) -> None:
        self.image_check_on = settings.safety.image_checker != "none"

    def of_job(self, job: JobView, kind: EventKind | None = None) -> Delivery:
        """The job as it stands: for redelivery after a restart, /job, and the HTTP API's job JSON."""
        kind = kind or _KIND_OF_STATUS.get(job.status, EventKind.QUEUED)
        if kind is EventKind.FAILED:
            return Delivery(kind, job, error=job.error)
        if kind is EventKind.PROGRESS:
            return Delivery(kind, job, step=job.progress_step, total=job.progress_total)
        images, withheld = self.split(job)
        return Delivery(kind, job, images=images, withheld=withheld)

    def of_event(self, event: Event, job: JobView) -> Delivery:
        """What `event` shows of `job` (the job as read after the event)."""
        payload = event.payload
        if event.kind is EventKind.QUEUED:
            return Delivery(event.kind, job, position=int(payload.get("position", 1)))
        if event.kind is EventKind.STARTED:
            return Delivery(event.kind, job, batch_size=payload.get("batch_size", job.batch_size))
        if event.kind is EventKind.PROGRESS:
            preview, spoiler = self._preview(job, payload.get("preview"))
            return Delivery(event.kind, job, step=int(payload.get("step", 0)), total=int(payload.get("total", 0)),
                            preview=preview, preview_spoiler=spoiler, loss=payload.get("loss"),
                            eta_s=payload.get("eta_s"), sample=payload.get("sample"))
        if event.kind is EventKind.FAILED:
            return Delivery(event.kind, job, error=payload.get("error") or job.error)
        if event.kind is EventKind.RELEASED:
            released = set(payload.get("indexes", ()))
            images, _ = self.split(job)
            return Delivery(event.kind, job, images=tuple(i for i in images if i.index in released))
        if event.kind is EventKind.DONE:
            return self.of_job(job, EventKind.DONE)
        return Delivery(event.kind, job)

    def split(self, job: JobView) -> tuple[tuple[ShownImage, ...], tuple[WithheldNotice, ...]]:
        """The job's images that may be shown, and a notice for each one that may not."""
        shown: list[ShownImage] = []
        withheld: list[WithheldNotice] = []
        for image in job.images:
            category = flagged_category(image.safety_flags, WITHHOLD)
            if category is not None:
                withheld.append(WithheldNotice(image.index, image.seed, category,
                                               withheld_message(job.id, image.index, category)))
                continue
            shown.append(ShownImage(image.index, image.seed, image.sha256, image.path, image.width, image.height,
                                    spoiler=flagged_category(image.safety_flags, SPOILER) is not None))
        return tuple(shown), tuple(withheld)

    def _preview(self, job: JobView, preview: str | None) -> tuple[str | None, bool]:
        if preview is None or not self.image_check_on:
            return preview, False
        if job.nsfw_allowed:
            return preview, True  # not yet checked: behind a spoiler, like a flagged final image here
        return None, False


_PASSING_KINDS = (EventKind.QUEUED, EventKind.STARTED, EventKind.PROGRESS)
_KIND_OF_STATUS = {JobStatus.SUCCEEDED: EventKind.DONE, JobStatus.FAILED: EventKind.FAILED,
                   JobStatus.CANCELLED: EventKind.CANCELLED, JobStatus.RUNNING: EventKind.PROGRESS}


# -- the delivery loop ---------------------------------------------------------------------------------

DeliveryHandler = Callable[[Delivery], Awaitable[bool]]


async def deliver_events(service: JobService, deliveries: Deliveries, platform: str, handler: DeliveryHandler,
                         stop: asyncio.Event | None = None, ready: asyncio.Event | None = None,
                         concurrency: int = 16) -> None:
    """Run until `stop` is set (or forever): redeliver what was missed, then follow new events.

    `ready` is set once every later event is sure to be followed: an adapter takes commands only
    then, so the events of a job submitted at start-up are not missed.
    """
    bus = service.bus
    after_id = await bus.latest_id()  # taken first: anything later is followed, anything earlier redelivered
    if ready is not None:
        ready.set()
    lanes = _Lanes(service, deliveries, handler, concurrency)
    try:
        for job in await service.undelivered(platform):
            lanes.put_final(job)
        events = bus.follow(platform, after_id=after_id)
        try:
            while stop is None or not stop.is_set():
                event = await _next_or_stop(events, stop)
                if event is None:
                    break
                lanes.put(event)
        finally:
            await events.aclose()
    finally:
        await lanes.close()


async def _next_or_stop(events: AsyncIterator[Event], stop: asyncio.Event | None) -> Event | None:
    next_event = asyncio.ensure_future(anext(events))
    waiters = {next_event} if stop is None else {next_event, asyncio.ensure_future(stop.wait())}
    done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    # Let a cancelled read unwind first: closing the generator while it still runs raises.
    await asyncio.gather(*pending, return_exceptions=True)
    return next_event.result() if next_event in done else None


class _Lanes:
    """One lane per job: each job's events in order, different jobs' concurrently, at most `limit` at once.

    A lane's task ends when its queue is empty; the next event of that job starts a new one.
    """

    def __init__(self, service: JobService, deliveries: Deliveries, handler: DeliveryHandler, limit: int) -> None:
        self.service = service
        self.deliveries = deliveries
        self.handler = handler
        self._slots = asyncio.Semaphore(limit)
        self._queues: dict[str, asyncio.Queue[Event | JobView]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._delivered: set[str] = set()  # final results shown by this loop (a redelivery is not repeated)

    def put(self, event: Event) -> None:
        self._enqueue(event.job_id, event)

    def put_final(self, job: JobView) -> None:
        """A finished job's final result, rebuilt from its row (never confirmed delivered)."""
        self._enqueue(job.id, job)

    def _enqueue(self, job_id: str, item: Event | JobView) -> None:
        queue = self._queues.get(job_id)
        if queue is None:
            queue = self._queues[job_id] = asyncio.Queue()
            task = asyncio.create_task(self._drain(job_id, queue), name=f"easel-deliver-{job_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queue.put_nowait(item)

    async def _drain(self, job_id: str, queue: asyncio.Queue[Event | JobView]) -> None:
        try:
            while not queue.empty():
                item = queue.get_nowait()
                async with self._slots:
                    await self._handle(item)
        finally:
            del self._queues[job_id]

    async def _handle(self, item: Event | JobView) -> None:
        try:
            if isinstance(item, JobView):
                job, delivery = item, self.deliveries.of_job(item)
            else:
                if item.is_final and item.job_id in self._delivered:
                    return
                job = await self.service.get_job(item.job_id)
                if item.kind in _PASSING_KINDS and job.status.is_final:
                    return  # a late progress event must never cover the result
                delivery = self.deliveries.of_event(item, job)
            shown = await self.handler(delivery)
            if delivery.is_final and shown:
                self._delivered.add(job.id)
                await self.service.mark_delivered(job.id)
        except Exception:
            # One error hook for every adapter's deliveries: log and keep serving. A final result that
            # failed to show stays undelivered and is tried again on the next start.
            log.exception("delivering an event of job %s failed", getattr(item, "job_id", None) or item.id)

    async def close(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Let deliveries in flight finish for up to `grace_s`, then cancel the rest: an undelivered
        result stays undelivered and is sent on the next start."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
