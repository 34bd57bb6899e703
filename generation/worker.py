"""The generation worker: claim a fair batch, run it as one diffusers call, store, publish. Repeat.

    worker = Worker(queue, generator, store, settings)
    await worker.run()            # serve forever (until stop())
    await worker.run(burst=True)  # drain the queue, then return: tests and `easel worker --burst`

A job that raises never kills the worker: the batch is retried one job at a time so one bad job
cannot fail its neighbours, and each job that still fails gets a message saying what went wrong.
Final writes are shielded from cancellation, so a shutdown never loses a finished image.

Nor does a job hold the worker forever (settings in [queue]): each diffusers call has a time limit
that grows with its pixels x steps x images, checked at every step; the lease of the jobs in hand is
renewed only while their batch makes progress, so another worker takes back the jobs of one stuck
inside a step; and a watchdog thread ends a process whose batch stopped, for its supervisor to
restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from PIL import Image

from bot.animation import CLIP_NAME, GIF_NAME, frame_name
from bot.config import QueueConfig, Settings
from bot.domain import GenerationParams, JobKind, JobStatus
from bot.errors import EaselError, GenerationFailed, NotFound
from bot.extra_networks import ExtraNetworks
from bot.images import to_png_bytes
from bot.policy import TRAINING_STEP_FACTOR, steps_run
from bot.queue import Finished, JobQueue, this_worker_id
from bot.safety import ImageVerdict
from bot.store import ImageStore, StoredImage, write_atomically
from bot.views import JobView, TrainingView
from bot.workers import DeviceReport, WorkerRegistry, WorkerReport, WorkerStatus
from generation.animation import animate, gif_bytes, mp4_bytes
from generation.pipelines import GenerationTask
from generation.safety_checker import ImageChecker, NoImageCheck, build_image_checker
from generation.teach import CHECKPOINT, SliceResult, SliceTrainer, TrainingSpec

log = logging.getLogger("easel.worker")

StepCallback = Callable[[int, int], None]
T = TypeVar("T")
PRUNE_EVERY_S = 30  # progress events are kept an hour: deleting them this often is plenty
# A busy worker's registry row changes with every batch; people watching `easel workers` or /metrics need
# it no fresher than this, and each write is a transaction on the event loop beside the torch thread.
REPORT_AT_MOST_EVERY_S = 1.0
# The longest a worker about to claim waits for the next of the submissions under way in its process to
# land (one takes a few milliseconds; one held up longer, fetching a reference picture say, is not waited for).
SUBMISSIONS_WAIT_S = 0.1
WATCHDOG_EXIT_STATUS = 70  # EX_SOFTWARE: the supervisor (systemd, Docker, ...) restarts the worker

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
    """Raised from the step callback when every job of the running batch was cancelled, or taken
    back by another worker after this one's lease ran out."""


class TimeLimitExceeded(GenerationFailed):
    """Raised from the step callback when a diffusers call runs past its time limit."""


@dataclass(frozen=True)
class TimeLimit:
    """How long one diffusers call may take, from the size of its work (queue.time_limit_*)."""

    total_s: float  # from its first step to its last
    step_s: float  # one step (or loading the model, or decoding) before the batch counts as stuck
    work: str  # what the user can lower, in their words: "64x64, 20 steps, 2 image(s)"

    @classmethod
    def of(cls, tasks: Sequence[GenerationTask], config: QueueConfig) -> TimeLimit:
        params = tasks[0].params  # the tasks of one call share size and steps (batch_key)
        images = sum(task.params.n for task in tasks)
        per_step = config.time_limit_s_per_megapixel_step * params.width * params.height / 1e6 * images
        together = " in one batch with other jobs" if len(tasks) > 1 else ""
        # An animation's steps are those of all its frames.
        steps = steps_run(params) if params.kind is JobKind.ANIMATE else params.steps
        frames = f", {params.motion.frames} frames" if params.motion is not None else ""
        return cls(total_s=config.time_limit_base_s + per_step * steps,
                   step_s=config.time_limit_base_s + per_step,
                   work=f"{params.width}x{params.height}, {params.steps} steps{frames}, {images} image(s){together}")

    def exceeded(self) -> TimeLimitExceeded:
        seconds = f"{self.total_s:.0f}" if self.total_s >= 10 else f"{self.total_s:.2g}"
        return TimeLimitExceeded(f"this job ran past its time limit of {seconds} s ({self.work}); "
                                 "lower --steps, --size or --n")


@dataclass
class WorkerStats:
    batches: int = 0
    images: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    busy_seconds: float = 0.0


class Trainer(Protocol):
    """Runs `/teach` slices (generation/teach.py's SliceTrainer)."""

    def run_slice(self, spec: TrainingSpec, slice_steps: int,
                  on_step: StepCallback | None = None) -> SliceResult: ...

    def save_result(self, spec: TrainingSpec, path: Path) -> None: ...

    def forget(self, job_id: str) -> None: ...

    def has_checkpoint(self, job_id: str) -> bool: ...

    def comparison_params(self, spec: TrainingSpec, lora: str) -> tuple[GenerationParams, GenerationParams]: ...


class Worker:
    def __init__(self, queue: JobQueue, generator: Generator, store: ImageStore, settings: Settings,
                 worker_id: str | None = None, image_checker: ImageChecker | None = None,
                 exit_process: Callable[[int], object] = os._exit, trainer: Trainer | None = None) -> None:
        """`exit_process` is what the watchdog calls to end a stuck worker (tests pass a fake). Without
        a `trainer` the worker never claims a training slice (`easel worker --no-train`)."""
        self.trainer = trainer
        self.queue = queue
        self.generator = generator
        # The output check runs on every image before it is stored as done (generation/safety_checker.py).
        self.image_checker: ImageChecker = image_checker or NoImageCheck()
        self.store = store
        self.settings = settings
        self.networks = ExtraNetworks.from_settings(settings)  # LoRA and embedding files, for their hashes
        self.worker_id = worker_id or this_worker_id()
        self.stats = WorkerStats()
        self._stop = asyncio.Event()
        self._report_due = asyncio.Event()  # the registry row is out of date: _report_when_due writes it
        self._exit_process = exit_process
        self._in_hand: ProgressReporter | None = None  # the batch being generated or finished
        self._claimed: Sequence[JobView] = ()  # the batch from its claim until it is finished
        self.registry = WorkerRegistry(queue.db, queue.clock, settings.queue.worker_expiry_s)
        self._started_at = queue.clock()
        # Jobs that ended before this have had their leftover files deleted (a day back at start).
        self._ended_looked_at = self._started_at - timedelta(days=1)

    @property
    def batch_in_hand(self) -> ProgressReporter | None:
        return self._in_hand

    def stop(self) -> None:
        """Finish the batch in hand, then return from run()."""
        self._stop.set()

    async def run(self, *, burst: bool = False) -> WorkerStats:
        poll_s = self.settings.generation.poll_interval_ms / 1000
        if self.settings.generation.compile:  # trace the compiled UNet now, not in a user's first job
            await on_torch_thread(self.generator.warm, self.settings.generation.default_model)
        await self._upkeep(prune=True)  # before the first claim: what a dead worker left goes first
        await self._report()
        watchdog = self._start_watchdog()
        upkeep = asyncio.create_task(self._keep_up(), name=f"easel-upkeep-{self.worker_id}")
        reporter = asyncio.create_task(self._report_when_due(), name=f"easel-report-{self.worker_id}")
        try:
            while not self._stop.is_set():
                await self._wait_for_a_fuller_batch()
                if self._stop.is_set():  # draining: claim nothing new
                    break
                # Taken before claiming: a job submitted while the claim runs still wakes the idle wait.
                marker = self.queue.bus.change_marker()
                # A burst worker never leaves a job to another: it would stop with the job still queued.
                batch = await self.queue.claim_batch(self.worker_id, self.settings.generation.max_batch,
                                                     loaded_models=self._loaded_models(), may_leave=not burst,
                                                     train=self.trainer is not None)
                if not batch:
                    if burst:
                        break
                    await self._idle(poll_s, marker)
                    continue
                started = time.monotonic()
                self._claimed = batch
                self._report_due.set()
                try:
                    await self._run_batch(batch)
                finally:
                    self._claimed = ()
                self.stats.batches += 1
                self.stats.busy_seconds += time.monotonic() - started
                self._report_due.set()
        finally:
            upkeep.cancel()
            reporter.cancel()
            await asyncio.gather(upkeep, reporter, return_exceptions=True)
            await asyncio.shield(self._forget())
            if watchdog is not None:
                watchdog.stop()
        return self.stats

    def _start_watchdog(self) -> Watchdog | None:
        if not self.settings.queue.watchdog_s:
            return None
        watchdog = Watchdog(self.settings.queue.watchdog_s, lambda: self._in_hand,
                            asyncio.get_running_loop(), exit_process=self._exit_process)
        watchdog.start()
        return watchdog

    async def _wait_for_a_fuller_batch(self) -> None:
        """Give a part-full queue a moment to fill a batch: always for the submissions already under way in
        this process, and with `generation.batch_wait_ms` for jobs that may yet come.

        No job waits longer than batch_wait_ms past its submission for the latter: a larger batch costs
        each image less, but only a short wait is worth it.
        """
        await self._wait_for_submissions_under_way()
        wait = timedelta(milliseconds=self.settings.generation.batch_wait_ms)
        while wait and not self._stop.is_set():
            images, oldest = await self.queue.waiting()
            if images == 0 or images >= self.settings.generation.max_batch or oldest is None:
                return
            left = (oldest + wait - self.queue.clock()).total_seconds()
            if left <= 0:
                return
            await self.queue.bus.wait_for_change(left)

    async def _wait_for_submissions_under_way(self) -> None:
        """Wait while submissions in this process are under way and the queue holds less than a batch: a
        burst of people submitting at one moment then shares the first batch, instead of the first job
        going alone and the rest waiting a whole batch behind it. Nothing is waited for that is not
        already on its way, and no longer than SUBMISSIONS_WAIT_S for the next of them to land."""
        bus, max_batch = self.queue.bus, self.settings.generation.max_batch
        landed, deadline = -1, 0.0
        while bus.submissions_under_way and not self._stop.is_set():
            marker = bus.submission_marker()  # before the count: one ending meanwhile ends the wait at once
            images, _oldest = await self.queue.waiting()
            if images >= max_batch:
                return
            if images > landed:  # one landed (or this is the first look): the next gets the full allowance
                landed, deadline = images, time.monotonic() + SUBMISSIONS_WAIT_S
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await bus.wait_for_a_submission(left, since=marker)

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

    async def _keep_up(self) -> None:
        """Every lease_s/4 while the worker runs, generating or not: renew the lease of the batch in
        hand while it makes progress, and take back the jobs of workers that died or stalled."""
        last_prune = time.monotonic()
        while True:
            beat_s = self.settings.queue.lease_s / 4
            if self._stop.is_set():
                await asyncio.sleep(beat_s)
            else:  # stop() cuts the wait short once, so the registry shows `draining` at once
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops the cancellation that
                # run() sends as it stops if stop() set the event at the same moment, and this loop
                # then never ends (a stopped worker hung in its shutdown).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(beat_s):
                        await self._stop.wait()
            try:
                await self._heartbeat()
            except Exception:  # the database may be briefly busy: the next beat comes soon
                log.warning("heartbeat of %s failed", self.worker_id, exc_info=True)
            await self._report()
            prune = time.monotonic() - last_prune > PRUNE_EVERY_S
            try:
                await self._upkeep(prune=prune)
            except Exception:
                log.warning("upkeep of %s failed", self.worker_id, exc_info=True)
            if prune:
                last_prune = time.monotonic()

    async def _heartbeat(self) -> None:
        """Renew the lease of the jobs in hand, only while their batch makes progress: a worker stuck
        inside a step lets its lease run out, and another worker takes its jobs back."""
        batch = self._in_hand
        if batch is None or not batch.making_progress():
            return
        gone = await self.queue.heartbeat(self.worker_id, batch.job_ids)
        if gone.issuperset(batch.job_ids):
            batch.drop()  # cancelled or taken back, every one: stop at the next step

    async def _upkeep(self, *, prune: bool) -> None:
        """Take back the jobs of workers that died (on this host) or whose lease ran out (any host),
        and, with `prune`, delete progress events nobody needs any more and the job files nobody will
        read: a training's checkpoint once it ended, an unfinished clip's frames once it was cancelled or
        failed (a finished clip keeps its frames and MP4, which the video routes serve)."""
        report = await self.queue.requeue_abandoned(by=self.worker_id)
        if report.requeued:
            log.warning("requeued %d job(s) left running by a stopped worker: %s",
                        len(report.requeued), ", ".join(report.requeued))
        if report.failed:
            log.warning("failed %d job(s) that stopped a worker too often: %s",
                        len(report.failed), ", ".join(report.failed))
        if prune:
            await self.queue.prune_progress_events()
            if expired := await self.registry.expire():
                log.warning("removed %d silent worker(s) from the registry: %s", len(expired), ", ".join(expired))
            # Since a little before the last look: a job that ended meanwhile is seen once or twice, and
            # deleting a file twice does nothing.
            since, self._ended_looked_at = self._ended_looked_at, self.queue.clock()
            for ended in await self.queue.ended_since(since - timedelta(minutes=1), (JobKind.TEACH, JobKind.ANIMATE)):
                if ended.kind is JobKind.TEACH:
                    await asyncio.to_thread(self.store.delete_job_file, ended.id, CHECKPOINT)
                elif ended.status is not JobStatus.SUCCEEDED:
                    await asyncio.to_thread(self._delete_job_files, ended.id)

    def _delete_job_files(self, job_id: str) -> None:
        for name in self.store.job_file_names(job_id):
            self.store.delete_job_file(job_id, name)

    def _loaded_models(self) -> list[str]:
        """The models the generator holds (a test's fake generator holds none): affinity prefers their jobs."""
        return list(getattr(self.generator, "loaded_models", []))

    def status(self) -> WorkerStatus:
        if self._stop.is_set():
            return WorkerStatus.DRAINING
        return WorkerStatus.BUSY if self._claimed else WorkerStatus.IDLE

    async def _report_when_due(self) -> None:
        """Write the registry row when the batch loop asks (as a batch starts and as it ends), beside the
        loop rather than in its way, and at most every REPORT_AT_MOST_EVERY_S: asks made meanwhile become
        one write, of the newest state."""
        while True:
            await self._report_due.wait()
            self._report_due.clear()
            await self._report()
            await asyncio.sleep(REPORT_AT_MOST_EVERY_S)

    async def _report(self) -> None:
        """Write this worker's row of the registry (`easel workers`). A failure is logged, never raised:
        the registry is for people watching, and the jobs must go on."""
        models, loras = self._loaded_models(), list(getattr(self.generator, "loaded_loras", []))
        describe = getattr(self.generator, "device_report", None)  # a test's fake generator has no device
        host, _, pid = self.worker_id.rpartition(":")
        report = WorkerReport(
            worker_id=self.worker_id, host=host or socket.gethostname(), pid=int(pid) if pid.isdigit() else 0,
            status=self.status(), device=describe() if describe is not None else DeviceReport(),
            models=list(models), loras=list(loras), batch=[job.id for job in self._claimed],
            images_done=self.stats.images, batches_done=self.stats.batches,
            busy_seconds=self.stats.busy_seconds, started_at=self._started_at)
        try:
            await self.registry.report(report)
        except Exception:
            log.warning("could not write %s to the worker registry", self.worker_id, exc_info=True)

    async def _forget(self) -> None:
        try:
            await self.registry.forget(self.worker_id)
        except Exception:
            log.warning("could not remove %s from the worker registry", self.worker_id, exc_info=True)

    async def _run_batch(self, batch: Sequence[JobView]) -> None:
        try:
            await self._run_batch_in_hand(batch)
        finally:
            self._in_hand = None

    async def _run_batch_in_hand(self, batch: Sequence[JobView]) -> None:
        if batch[0].params.kind is JobKind.TEACH:  # claimed alone (bot/queue.py)
            await self._run_training_slice(batch[0])
            return
        try:
            results = await self._generate(batch)
        except BatchCancelled:
            self.stats.cancelled += len(batch)
            return
        except Exception as error:
            # A time limit is an EaselError too: it grows with the images, so alone each job would
            # run past its own limit as well. It is never retried.
            if len(batch) > 1 and not isinstance(error, EaselError):
                log.warning("batch of %d failed (%r); retrying its jobs one at a time", len(batch), error)
                for job in batch:
                    await self._run_batch([job])
                return
            for job in batch:
                await self._fail(job, error)
            return
        await asyncio.shield(self._finish(batch, results))
        if self._in_hand is not None:
            self._in_hand.progressed()

    def _bring_loras(self, batch: Sequence[JobView]) -> None:
        """Copy into this host's lora_dir, from the store, the trained LoRAs the batch names (made by
        /teach on whichever worker finished the training) and any shared copy this host lacks. A trained
        one is compared every time: deleted and taught again, the same name holds new weights."""
        named = {name for job in batch for name, _ in job.params.loras}
        if not named:
            return
        installed = self.networks.loras()  # the files of lora_dir itself; trained ones are in a subfolder
        for name in sorted(named - set(installed)):
            try:
                data = self.store.read_lora(name)
            except NotFound:
                continue  # not one the store keeps: the pipeline names what is missing
            path = self.settings.storage.loras / f"{name}.safetensors"
            if not path.is_file() or path.read_bytes() != data:
                write_atomically(path, data)

    async def _generate(self, batch: Sequence[JobView]) -> list[list[Image.Image]]:
        # On a thread when something is read first: a LoRA, an init image or a mask may come from an object
        # store, a GET the loop must not wait on. A plain prompt's task is made here, without the trip.
        reads = any(job.params.loras or job.init_image_sha or job.mask_image_sha for job in batch)
        tasks = await asyncio.to_thread(self._tasks_for, batch) if reads else self._tasks_for(batch)
        progress = ProgressReporter(self.queue, [job.id for job in batch],
                                    self.settings.generation.progress_every_s,
                                    TimeLimit.of(tasks, self.settings.queue), worker_id=self.worker_id)
        self._in_hand = progress
        try:
            if tasks[0].params.kind is JobKind.ANIMATE:
                return await on_torch_thread(self._animate, batch, tasks, progress.on_step)
            return await on_torch_thread(self.generator.generate, tasks, progress.on_step)
        finally:
            progress.progressed()  # generation is over: the check and the stores come next
            await progress.settle()  # its last write lands before the jobs' final events

    def _animate(self, batch: Sequence[JobView], tasks: list[GenerationTask],
                 on_step: StepCallback) -> list[list[Image.Image]]:
        """Every frame of each animation, resumed from the frames a stopped worker (on any host) left in
        the store, each kept there as it is made; then each clip's MP4 and GIF (on the torch thread: it is the
        one that holds the frames)."""
        done = [_finished_frames(self.store, job.id, task.params.motion.frames)
                for job, task in zip(batch, tasks, strict=True)]

        def keep(task: int, index: int, frame: Image.Image) -> None:
            self.store.put_job_file(batch[task].id, frame_name(index), to_png_bytes(frame))

        clips = animate(self.generator.generate, tasks, done, keep, on_step)
        for job, frames in zip(batch, clips, strict=True):
            self.store.put_job_file(job.id, CLIP_NAME, mp4_bytes(frames, job.params.motion.fps))
            gif = gif_bytes(frames, job.params.motion.fps)
            if gif is not None:
                self.store.put_job_file(job.id, GIF_NAME, gif)
        return clips

    def _tasks_for(self, batch: Sequence[JobView]) -> list[GenerationTask]:
        self._bring_loras(batch)
        return [self._task_for(job) for job in batch]

    def _task_for(self, job: JobView) -> GenerationTask:
        def load(sha: str | None, mode: str) -> Image.Image | None:
            if sha is None:
                return None
            with self.store.open_image(sha) as image:
                return image.convert(mode)

        return GenerationTask(params=job.params, init_image=load(job.init_image_sha, "RGB"),
                              mask_image=load(job.mask_image_sha, "L"))

    async def _finish(self, batch: Sequence[JobView], results: list[list[Image.Image]]) -> None:
        """Check each job's images, store them all at once (their PNG writes and fsyncs overlap), then
        complete the batch's jobs in one unit of work. A job whose check or store fails fails alone."""
        checked = []
        for job, images in zip(batch, results, strict=True):
            try:
                checked.append((job, *await self._checked(job, images)))
            except Exception as error:
                await self._fail(job, error)
        stored = await asyncio.gather(*(asyncio.to_thread(self._save, job, images) for job, images, _ in checked),
                                      return_exceptions=True)
        finished = []
        for (job, _, verdicts), saved in zip(checked, stored, strict=True):
            if isinstance(saved, BaseException):
                await self._fail(job, saved)
            else:
                finished.append((job, Finished(job.id, saved, verdicts)))
        if finished:
            await self._complete(finished)

    async def _checked(self, job: JobView, images: list[Image.Image]) -> tuple[list[Image.Image],
                                                                              list[ImageVerdict | None]]:
        """The images a job keeps and the output check's verdict on each. A checker that fails fails the
        job (its caller): an unchecked image is never delivered."""
        verdicts = await self._check(images)
        if job.params.kind is JobKind.ANIMATE:
            # The clip is shown through its last frame, its poster: one flagged frame flags the whole clip.
            verdicts = [next((verdict for verdict in verdicts if verdict is not None), None)]
            images = images[-1:]
        return images, verdicts

    async def _complete(self, finished: list[tuple[JobView, Finished]]) -> None:
        """Complete stored jobs together; should that fail, each on its own (one bad row must not cost
        the others their pictures), and a job that fails alone fails."""
        try:
            completed = await self.queue.complete_batch([each for _, each in finished], worker_id=self.worker_id)
        except Exception as error:
            if len(finished) == 1:
                await self._fail(finished[0][0], error)
                return
            log.warning("completing a batch of %d failed (%r); completing its jobs one at a time", len(finished), error)
            for one in finished:
                await self._complete([one])
            return
        for job, each in finished:
            if job.id in completed:
                self.stats.succeeded += 1
                self.stats.images += len(each.images)
            else:  # cancelled meanwhile, or taken back by another worker
                self.stats.cancelled += 1

    async def _check(self, images: list[Image.Image]) -> list[ImageVerdict | None]:
        if isinstance(self.image_checker, NoImageCheck):  # no torch work: not worth a trip to its thread
            return self.image_checker.check(images)
        return await on_torch_thread(self.image_checker.check, images)

    def _save(self, job: JobView, images: list[Image.Image]) -> list[tuple[int, StoredImage]]:
        """Store a job's images (PNG encode, write, fsync), on a thread of its own."""
        hashes = self.networks.a1111_hashes(job.params)  # its LoRAs' and embeddings', as AUTOMATIC1111 writes
        fields = [*hashes, *self._upscale_fields(job)]
        return [(seed, self.store.save_generated(image, job.params, seed, fields))
                for seed, image in zip(job.params.image_seeds(), images, strict=True)]

    def _upscale_fields(self, job: JobView) -> list[tuple[str, str]]:
        """An upscale's `Hires upscale` (how many times larger) and `Hires upscaler`, as AUTOMATIC1111 writes
        them for its hires fix; nothing for other kinds."""
        if job.params.kind is not JobKind.UPSCALE or job.init_image_sha is None:
            return []
        with self.store.open_image(job.init_image_sha) as picture:
            factor = job.params.width / picture.width
        return [("Hires upscale", f"{factor:.3g}"), ("Hires upscaler", self.settings.upscale.model or "Lanczos")]

    async def _fail(self, job: JobView, error: BaseException) -> None:
        if isinstance(error, TimeLimitExceeded):
            log.warning("job %s failed: %s", job.id, error.message)
        if isinstance(error, EaselError):
            message = error.message
        else:
            log.exception("job %s failed", job.id, exc_info=error)
            message = (f"Generation failed with an internal error ({type(error).__name__}); "
                       "it has been logged. Try again, or with other settings.")
        self.stats.failed += 1
        await asyncio.shield(self.queue.fail(job.id, message, worker_id=self.worker_id))


    # -- /teach: one slice of a training per claim (bot/teach.py, generation/teach.py) ------------------

    async def _run_training_slice(self, job: JobView) -> None:
        assert self.trainer is not None  # only a worker with a trainer claims trainings
        teach = self.settings.teach
        try:
            view = await self.queue.training(job.id)
            spec = await asyncio.to_thread(self._training_spec, job, view)
        except Exception as error:
            await self._fail(job, error)
            return
        progress = ProgressReporter(self.queue, [job.id], self.settings.generation.progress_every_s,
                                    _slice_time_limit(job, teach.batch, teach.slice_steps, self.settings.queue),
                                    worker_id=self.worker_id)
        self._in_hand = progress
        try:
            if not self.trainer.has_checkpoint(job.id):  # before its first step: the pictures pass the check
                flagged = [(number, verdict) for number, verdict in enumerate(await self._check(spec.pictures), 1)
                           if verdict is not None]
                if flagged:
                    number, verdict = flagged[0]
                    raise GenerationFailed(f"training picture {number} did not pass the image check "
                                           f"({verdict.category}); teach with other pictures")
            result = await on_torch_thread(self.trainer.run_slice, spec, teach.slice_steps, progress.on_step)
        except BatchCancelled:
            self.stats.cancelled += 1
            self.trainer.forget(job.id)
            return
        except Exception as error:
            self.trainer.forget(job.id)
            await self._fail(job, error)
            return
        finally:
            progress.progressed()
            await progress.settle()
        if not result.done(spec):
            sample = await self._training_sample(job, view, spec, result.step)
            eta_s = result.seconds_per_step * (view.steps - result.step)
            if not await self.queue.requeue_slice(job.id, self.worker_id, result.step, result.loss, eta_s, sample):
                self.trainer.forget(job.id)  # cancelled meanwhile
            return
        await asyncio.shield(self._finish_training(job, view, spec, result))

    def _training_spec(self, job: JobView, view: TrainingView) -> TrainingSpec:
        pictures = []
        for sha, _caption in view.pictures:
            with self.store.open_image(sha) as picture:  # from a folder or a bucket alike
                pictures.append(picture.convert("RGB"))
        return TrainingSpec(view=view, pictures=pictures, model=job.params.model, width=job.params.width,
                            height=job.params.height, batch=self.settings.teach.batch,
                            learning_rate=self.settings.teach.learning_rate)

    async def _training_sample(self, job: JobView, view: TrainingView, spec: TrainingSpec, step: int) -> bytes | None:
        """A picture of the first caption made with the LoRA or embedding so far, after evenly spaced slices
        (teach.samples of them); None between them. A failed sample costs the sample, not the training."""
        samples, slice_steps = self.settings.teach.samples, self.settings.teach.slice_steps
        slices = -(-view.steps // slice_steps)
        every = max(1, slices // (samples + 1)) if samples else 0
        if not every or (step // slice_steps) % every or step // slice_steps > every * samples:
            return None
        # a LoRA's sample is a file of its own; an embedding's is its file (its owner's prompts use it
        # only once the training succeeded: bot/teach.py's own_loras)
        path = self.networks.trained_path(view.kind, view.owner_id, view.name)
        if view.kind == "lora":
            path = path.with_name(f"{view.name}.sample.safetensors")
        try:
            await on_torch_thread(self.trainer.save_result, spec, path)
            with_word, _ = self.trainer.comparison_params(spec, f"{view.lora_name}.sample")
            [[image]] = await on_torch_thread(self.generator.generate, [GenerationTask(with_word)])
            [verdict] = await self._check([image])
            return to_png_bytes(image) if verdict is None else None  # a flagged sample is simply not sent
        except Exception:
            log.warning("sample of training %s failed", job.id, exc_info=True)
            return None
        finally:
            path.unlink(missing_ok=True)

    async def _finish_training(self, job: JobView, view: TrainingView, spec: TrainingSpec,
                               result: SliceResult) -> None:
        """Save the LoRA or embedding where its owner's jobs find it, then end with the comparison: the same prompt
        and seed without and with it, as /imagine makes them."""
        try:
            path = self.networks.trained_path(view.kind, view.owner_id, view.name)
            await on_torch_thread(self.trainer.save_result, spec, path)
            if view.kind == "lora":  # the store's copy is the one every worker of a fleet uses (_bring_loras)
                await asyncio.to_thread(lambda: self.store.put_lora(view.lora_name, path.read_bytes()))
            with_word, without = self.trainer.comparison_params(spec, view.lora_name)
            images = []
            for params in (without, with_word):  # two calls: a LoRA changes the weights for a whole call
                [[image]] = await on_torch_thread(self.generator.generate, [GenerationTask(params)])
                images.append(image)
            verdicts = await self._check(images)
            stored = await asyncio.to_thread(lambda: [
                (params.seed, self.store.save_generated(image, params, params.seed or 0))
                for params, image in zip((without, with_word), images, strict=True)])
            await self.queue.record_training_loss(job.id, result.loss)
            if await self.queue.complete(job.id, stored, verdicts, worker_id=self.worker_id):
                self.stats.succeeded += 1
                self.stats.images += len(stored)
            else:
                path.unlink(missing_ok=True)  # cancelled at the last moment: nothing stays
                await asyncio.to_thread(self.store.delete_lora, view.lora_name)
                self.stats.cancelled += 1
            self.trainer.forget(job.id)
        except Exception as error:
            await self._fail(job, error)


def _slice_time_limit(job: JobView, batch: int, slice_steps: int, config: QueueConfig) -> TimeLimit:
    """A training step is about TRAINING_STEP_FACTOR denoising steps per picture of its batch."""
    params = job.params
    per_step = (config.time_limit_s_per_megapixel_step * params.width * params.height / 1e6 * batch
                * TRAINING_STEP_FACTOR)
    return TimeLimit(total_s=config.time_limit_base_s + per_step * slice_steps,
                     step_s=config.time_limit_base_s + per_step,
                     work=f"{slice_steps} training steps of {batch} pictures at {params.width}x{params.height}")


def _finished_frames(store: ImageStore, job_id: str, frames: int) -> list[Image.Image]:
    """The frames kept so far, `frame-0000.png` on, up to the first one missing."""
    kept = set(store.job_file_names(job_id))
    found = []
    for index in range(frames):
        if frame_name(index) not in kept:
            break
        with Image.open(io.BytesIO(store.read_job_file(job_id, frame_name(index)))) as frame:
            found.append(frame.convert("RGB"))
    return found


class ProgressReporter:
    """The step callback of one batch, called on the generation thread, and how the batch is doing:
    throttled progress writes that never hold up generation (they run on the event loop, in order,
    while the next steps compute), a stop once every job of the batch was cancelled or taken back,
    and the batch's time limit, checked at every step.

    `last_progress` (monotonic seconds: the start, each step, the generation's end, each job
    finished) is read by the worker's heartbeat and by the watchdog thread.
    """

    def __init__(self, queue: JobQueue, job_ids: list[str], every_s: float, limit: TimeLimit,
                 worker_id: str | None = None) -> None:
        self.queue = queue
        self.job_ids = job_ids
        self.every_s = every_s
        self.limit = limit
        self.worker_id = worker_id  # progress writes find jobs another worker took back gone
        self.last_progress = time.monotonic()
        self.step, self.total = 0, 0
        self._first_step_at: float | None = None
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
        self.last_progress, self.step, self.total = now, step, total
        # The clock starts at the first step: loading or compiling a model is not the job's doing.
        if self._first_step_at is None:
            self._first_step_at = now
        elif now - self._first_step_at > self.limit.total_s:
            raise self.limit.exceeded()
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
            gone = await self.queue.report_progress(self.job_ids, step, total, previews, self.worker_id)
        except Exception:  # a lost progress report costs a progress bar tick, never the job
            log.warning("progress report for %s failed", ", ".join(self.job_ids), exc_info=True)
            return
        if gone.issuperset(self.job_ids):
            self._all_cancelled = True

    def drop(self) -> None:
        """Every job of the batch was cancelled or taken back: stop at the next step."""
        self._all_cancelled = True

    def progressed(self) -> None:
        """Progress made outside a step: the generation returned, a job was finished."""
        self.last_progress = time.monotonic()

    def stalled_s(self, now: float | None = None) -> float:
        """Seconds since the batch last made progress."""
        return (time.monotonic() if now is None else now) - self.last_progress

    def making_progress(self) -> bool:
        """Whether the batch's lease deserves renewing: its current step (or model load, or decode)
        has not yet taken longer than one step's allowance."""
        return self.stalled_s() < self.limit.step_s

    def describe(self) -> str:
        return f"batch {', '.join(self.job_ids)} at step {self.step}/{self.total or '?'}"

    async def settle(self) -> None:
        """Wait for the last progress write (on the event loop, once generation returned), so it
        lands before the jobs' final events."""
        if self._writing is not None:
            await asyncio.wrap_future(self._writing)


class Watchdog:
    """Ends a worker process whose batch stopped making progress, so that its supervisor restarts it.

    A thread of its own: the torch thread may be stuck inside a step, and the event loop blocked;
    either would silence a watchdog that ran there. Every `poll_s` it asks the event loop to answer,
    and while a batch is in hand it fires when the batch made no progress for `timeout_s` (or for
    one step's allowance, when the time limit grants a step longer) or the event loop has not
    answered for `timeout_s`. Firing logs why and calls `exit_process(WATCHDOG_EXIT_STATUS)`:
    os._exit, since a thread stuck in native code cannot be interrupted or joined.

        watchdog = Watchdog(300, lambda: worker.batch_in_hand, asyncio.get_running_loop())
        watchdog.start()
    """

    def __init__(self, timeout_s: float, batch_in_hand: Callable[[], ProgressReporter | None],
                 loop: asyncio.AbstractEventLoop, *, exit_process: Callable[[int], object] = os._exit,
                 clock: Callable[[], float] = time.monotonic, poll_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.poll_s = poll_s if poll_s is not None else min(1.0, timeout_s / 4)
        self._batch_in_hand = batch_in_hand
        self._loop = loop
        self._exit_process = exit_process
        self._clock = clock
        self._loop_seen = clock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="easel-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def check(self, now: float) -> str | None:
        """Why the worker counts as stuck at monotonic time `now`, or None."""
        batch = self._batch_in_hand()
        if batch is None:
            self._loop_seen = now  # nothing in hand, nothing held up; a batch starts from a running loop
            return None
        allowed = max(self.timeout_s, batch.limit.step_s)
        if (stalled := batch.stalled_s(now)) > allowed:
            return (f"{batch.describe()} made no progress for {stalled:.0f} s (allowed: {allowed:.0f} s, "
                    f"queue.watchdog_s or one step's share of the time limit)")
        if (silent := now - self._loop_seen) > self.timeout_s:
            return (f"the event loop has not run for {silent:.0f} s (queue.watchdog_s = {self.timeout_s:g}) "
                    f"while {batch.describe()} was in hand")
        return None

    def loop_answered(self) -> None:
        """Called on the event loop, when it runs the watchdog's probe."""
        self._loop_seen = self._clock()

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            try:
                self._loop.call_soon_threadsafe(self.loop_answered)
            except RuntimeError:  # the loop was closed: the worker is gone
                return
            reason = self.check(self._clock())
            if reason is not None:
                log.critical("watchdog: %s; ending the worker process with status %d for its supervisor "
                             "to restart it", reason, WATCHDOG_EXIT_STATUS)
                self._exit_process(WATCHDOG_EXIT_STATUS)
                return


class CoreParts(Protocol):
    """What a worker is built from (bot.bootstrap.Core has these); the worker never imports the
    composition root, it is handed its parts."""

    queue: JobQueue
    store: ImageStore
    settings: Settings


def build_worker(core: CoreParts, generator: Generator | None = None, *, train: bool = True) -> Worker:
    """The worker `easel serve` and `easel worker` run: diffusers on the configured device; it trains
    `/teach` slices too unless not `train` (`easel worker --no-train`)."""
    if generator is None:
        from bot.catalog import ModelCatalog
        from generation.pipelines import DiffusersGenerator

        gen = core.settings.generation
        catalog = ModelCatalog.from_settings(core.settings)  # the configured models and the checkpoints folder
        generator = DiffusersGenerator(catalog, device=gen.device, dtype=gen.dtype,
                                       cache_dir=core.settings.storage.model_cache, options=gen,
                                       networks=ExtraNetworks.from_settings(core.settings),
                                       upscale=core.settings.upscale)
    trainer = None
    if train:
        from bot.catalog import ModelCatalog

        trainer = SliceTrainer(ModelCatalog.from_settings(core.settings), core.settings, core.store)
    return Worker(core.queue, generator, core.store, core.settings,
                  image_checker=build_image_checker(core.settings), trainer=trainer)
