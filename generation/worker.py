"""The generation worker: claim a fair batch, run it as one diffusers call, store, publish. Repeat.

    worker = Worker(queue, generator, store, settings)
    await worker.run()            # serve forever (until stop())
    await worker.run(burst=True)  # drain the queue, then return: tests and `easel worker --burst`

A job that raises never kills the worker: the batch is retried one job at a time so one bad job
cannot fail its neighbours, and each job that still fails gets a message saying what went wrong.
Final writes are shielded from cancellation, so a shutdown never loses a finished image.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from PIL import Image

from bot.bootstrap import Core
from bot.config import Settings
from bot.errors import EaselError
from bot.queue import JobQueue, this_worker_id
from bot.service import utcnow
from bot.store import ImageStore
from bot.views import JobView
from generation.pipelines import GenerationTask
from generation.safety_checker import ImageChecker, NoImageCheck, build_image_checker

log = logging.getLogger("easel.worker")

StepCallback = Callable[[int, int], None]
T = TypeVar("T")
UPKEEP_EVERY_S = 30

# All torch work of the process (generation, warm-up, the output check) runs on this one thread:
# torch keeps per-thread state, and on the CPU each calling thread gets a pool of OpenMP threads of
# its own; a second pool idling beside the first was measured to slow generation by a quarter.
TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easel-torch")


async def on_torch_thread(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(TORCH_THREAD, function, *args)


class Generator(Protocol):
    def generate(self, tasks: list[GenerationTask],
                 on_step: StepCallback | None = None) -> list[list[Image.Image]]: ...

    def warm(self, model_name: str) -> None: ...


class BatchCancelled(Exception):
    """Raised from the step callback when every job of the running batch was cancelled."""


@dataclass
class WorkerStats:
    batches: int = 0
    images: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    busy_seconds: float = 0.0


class Worker:
    def __init__(self, queue: JobQueue, generator: Generator, store: ImageStore, settings: Settings,
                 worker_id: str | None = None, image_checker: ImageChecker | None = None) -> None:
        self.queue = queue
        self.generator = generator
        # The output check runs on every image before it is stored as done (generation/safety_checker.py).
        self.image_checker: ImageChecker = image_checker or NoImageCheck()
        self.store = store
        self.settings = settings
        self.worker_id = worker_id or this_worker_id()
        self.stats = WorkerStats()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Finish the batch in hand, then return from run()."""
        self._stop.set()

    async def run(self, *, burst: bool = False) -> WorkerStats:
        poll_s = self.settings.generation.poll_interval_ms / 1000
        if self.settings.generation.compile:  # trace the compiled UNet now, not in a user's first job
            await on_torch_thread(self.generator.warm, self.settings.generation.default_model)
        last_upkeep = -float("inf")
        while not self._stop.is_set():
            if time.monotonic() - last_upkeep > UPKEEP_EVERY_S:
                await self._upkeep()
                last_upkeep = time.monotonic()
            await self._wait_for_a_fuller_batch()
            # Taken before claiming: a job submitted while the claim runs still wakes the idle wait.
            marker = self.queue.bus.change_marker()
            batch = await self.queue.claim_batch(self.worker_id, self.settings.generation.max_batch)
            if not batch:
                if burst:
                    break
                await self._idle(poll_s, marker)
                continue
            started = time.monotonic()
            await self._run_batch(batch)
            self.stats.batches += 1
            self.stats.busy_seconds += time.monotonic() - started
        return self.stats

    async def _wait_for_a_fuller_batch(self) -> None:
        """With `generation.batch_wait_ms`, give a part-full queue a moment to fill a batch.

        No job waits longer than batch_wait_ms past its submission for this: a larger batch costs
        each image less, but only a short wait is worth it.
        """
        wait = timedelta(milliseconds=self.settings.generation.batch_wait_ms)
        while wait and not self._stop.is_set():
            images, oldest = await self.queue.waiting()
            if images == 0 or images >= self.settings.generation.max_batch or oldest is None:
                return
            left = (oldest + wait - utcnow()).total_seconds()
            if left <= 0:
                return
            await self.queue.bus.wait_for_change(left)

    async def _idle(self, poll_s: float, since: asyncio.Event) -> None:
        """Sleep until a job is submitted in this process (woken at once), stop() is called, or
        `poll_s` passes (jobs submitted by another process are found on the next poll)."""
        waits = [asyncio.ensure_future(self._stop.wait()),
                 asyncio.ensure_future(self.queue.bus.wait_for_change(poll_s, since))]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _upkeep(self) -> None:
        """At start and every UPKEEP_EVERY_S: take back the jobs of workers that died (here or on
        another host), and delete progress events nobody needs any more."""
        report = await self.queue.requeue_abandoned()
        if report.requeued:
            log.warning("requeued %d job(s) left running by a stopped worker: %s",
                        len(report.requeued), ", ".join(report.requeued))
        if report.failed:
            log.warning("failed %d job(s) that stopped a worker too often: %s",
                        len(report.failed), ", ".join(report.failed))
        await self.queue.prune_progress_events()

    async def _run_batch(self, batch: Sequence[JobView]) -> None:
        try:
            results = await self._generate(batch)
        except BatchCancelled:
            self.stats.cancelled += len(batch)
            return
        except Exception as error:
            if len(batch) > 1 and not isinstance(error, EaselError):
                log.warning("batch of %d failed (%r); retrying its jobs one at a time", len(batch), error)
                for job in batch:
                    await self._run_batch([job])
                return
            for job in batch:
                await self._fail(job, error)
            return
        for job, images in zip(batch, results, strict=True):
            await asyncio.shield(self._finish(job, images))

    async def _generate(self, batch: Sequence[JobView]) -> list[list[Image.Image]]:
        tasks = [self._task_for(job) for job in batch]
        progress = ProgressReporter(self.queue, [job.id for job in batch],
                                    self.settings.generation.progress_every_s)
        try:
            return await on_torch_thread(self.generator.generate, tasks, progress.on_step)
        finally:
            await progress.settle()  # its last write lands before the jobs' final events

    def _task_for(self, job: JobView) -> GenerationTask:
        def load(sha: str | None, mode: str) -> Image.Image | None:
            if sha is None:
                return None
            with Image.open(self.store.path_of(sha)) as image:
                return image.convert(mode)

        return GenerationTask(params=job.params, init_image=load(job.init_image_sha, "RGB"),
                              mask_image=load(job.mask_image_sha, "L"))

    async def _finish(self, job: JobView, images: list[Image.Image]) -> None:
        try:
            # A checker that fails fails the job (below): an unchecked image is never delivered.
            verdicts = await on_torch_thread(self.image_checker.check, images)
            stored = []
            for seed, image in zip(job.params.image_seeds(), images, strict=True):
                saved = await asyncio.to_thread(self.store.save_generated, image, job.params, seed)
                stored.append((seed, saved))
            if await self.queue.complete(job.id, stored, verdicts):
                self.stats.succeeded += 1
                self.stats.images += len(stored)
            else:
                self.stats.cancelled += 1
        except Exception as error:
            await self._fail(job, error)

    async def _fail(self, job: JobView, error: BaseException) -> None:
        if isinstance(error, EaselError):
            message = error.message
        else:
            log.exception("job %s failed", job.id, exc_info=error)
            message = (f"Generation failed with an internal error ({type(error).__name__}); "
                       "it has been logged. Try again, or with other settings.")
        self.stats.failed += 1
        await asyncio.shield(self.queue.fail(job.id, message))


class ProgressReporter:
    """The step callback of one batch, called on the generation thread: throttled progress writes
    that never hold up generation (they run on the event loop, in order, while the next steps
    compute), and a stop once every job of the batch was cancelled."""

    def __init__(self, queue: JobQueue, job_ids: list[str], every_s: float) -> None:
        self.queue = queue
        self.job_ids = job_ids
        self.every_s = every_s
        self._loop = asyncio.get_running_loop()
        # The first report comes `every_s` after the start ("started" was just published), and none
        # at the last step ("done" follows): a job quicker than every_s costs no progress writes.
        self._last_sent = time.monotonic()
        self._writing: Future[None] | None = None  # the last write handed to the loop
        self._all_cancelled = False

    def on_step(self, step: int, total: int, previews: list[bytes] | None = None) -> None:
        # Only the torch thread calls this, one step after another: no lock needed. The event loop
        # only ever sets _all_cancelled, which this reads.
        if self._all_cancelled:
            raise BatchCancelled()
        now = time.monotonic()
        if previews is None and now - self._last_sent < self.every_s:
            return
        self._last_sent = now
        self._writing = asyncio.run_coroutine_threadsafe(
            self._write(self._writing, step, total, previews), self._loop)

    async def _write(self, previous: Future[None] | None, step: int, total: int,
                     previews: list[bytes] | None) -> None:
        if previous is not None:
            await asyncio.wrap_future(previous)  # writes land in step order
        try:
            gone = await self.queue.report_progress(self.job_ids, step, total, previews)
        except Exception:  # a lost progress report costs a progress bar tick, never the job
            log.warning("progress report for %s failed", ", ".join(self.job_ids), exc_info=True)
            return
        if gone.issuperset(self.job_ids):
            self._all_cancelled = True

    async def settle(self) -> None:
        """Wait for the last progress write (on the event loop, once generation returned), so it
        lands before the jobs' final events."""
        if self._writing is not None:
            await asyncio.wrap_future(self._writing)


def build_worker(core: Core, generator: Generator | None = None) -> Worker:
    """The worker `easel serve` and `easel worker` run: diffusers on the configured device."""
    if generator is None:
        from generation.pipelines import DiffusersGenerator

        gen = core.settings.generation
        generator = DiffusersGenerator(core.settings.models, device=gen.device, dtype=gen.dtype,
                                       cache_dir=core.settings.storage.model_cache, options=gen)
    return Worker(core.queue, generator, core.store, core.settings,
                  image_checker=build_image_checker(core.settings))
