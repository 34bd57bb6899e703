"""A worker that stops making progress holds nothing for long: the per-job time limit, the lease that
is renewed only while steps advance, the takeover of a killed worker's job, and the watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from bot.bootstrap import Core
from bot.domain import JobStatus, Requester
from bot.models import Job
from bot.views import JobView
from generation.worker import WATCHDOG_EXIT_STATUS, ProgressReporter, TimeLimit, Watchdog, Worker
from tests.conftest import alice, bob

WAIT_S = 120  # a bound on every wait, never a pause: each wait ends as soon as its event comes


async def submit(core: Core, line: str, who: Callable[[], Requester] = alice) -> str:
    return (await core.service.submit(who(), core.parser.parse(line))).job.id


async def finished(core: Core, job_id: str) -> JobView:
    """The job once its final event (done, failed, cancelled) is written, by any process."""
    async def final() -> None:
        async for _ in core.bus.watch(job_id):
            pass

    await asyncio.wait_for(final(), WAIT_S)
    return await core.service.get_job(job_id)


async def reached_step(core: Core, job_id: str, step: int = 1) -> None:
    async def progress() -> None:
        async for event in core.bus.watch(job_id):
            if event.kind == "progress" and event.payload["step"] >= step:
                return
        raise AssertionError(f"job {job_id} ended before step {step}")

    await asyncio.wait_for(progress(), WAIT_S)


async def started_again(core: Core, job_id: str) -> None:
    """Wait for the job's second start: it was taken back and claimed again."""
    async def second_start() -> None:
        starts = 0
        async for event in core.bus.watch(job_id):
            starts += event.kind == "started"
            if starts == 2:
                return
        raise AssertionError(f"job {job_id} ended before it was started again")

    await asyncio.wait_for(second_start(), WAIT_S)


async def worker_of(core: Core, job_id: str) -> str | None:
    async with core.db.unit_of_work(write=False) as uow:
        return await uow.session.scalar(select(Job.worker).where(Job.id == job_id))


class StuckInAStep:
    """A generator that makes one step, then hangs inside the second until released."""

    def __init__(self) -> None:
        self.stuck = threading.Event()
        self.release = threading.Event()

    def generate(self, tasks, on_step=None):
        on_step(1, 10)
        self.stuck.set()
        self.release.wait(WAIT_S)
        on_step(2, 10)
        return [[Image.new("RGB", (task.params.width, task.params.height))] * task.params.n for task in tasks]

    def warm(self, model_name: str) -> None:
        pass


class SlowSteps:
    """The real generator, each step made slower by `delay_s`."""

    def __init__(self, generator, delay_s: float) -> None:
        self.generator, self.delay_s = generator, delay_s

    def generate(self, tasks, on_step=None):
        def slow(step, total, *previews):
            threading.Event().wait(self.delay_s)
            on_step(step, total, *previews)

        return self.generator.generate(tasks, slow)

    def warm(self, model_name: str) -> None:
        pass


def serve(core: Core, generator, worker_id: str, **options) -> tuple[Worker, asyncio.Task]:
    worker = Worker(core.queue, generator, core.store, core.settings, worker_id=worker_id, **options)
    return worker, asyncio.create_task(worker.run())


async def stop(*served: tuple[Worker, asyncio.Task]) -> None:
    for worker, _ in served:
        worker.stop()
    await asyncio.gather(*(task for _, task in served))


# -- the time limit ------------------------------------------------------------------------------


async def test_a_job_past_its_time_limit_fails_saying_what_to_lower_and_the_worker_goes_on(
        core: Core, generator) -> None:
    core.settings.queue.time_limit_base_s = 0.001  # every step of builtin:tiny takes longer
    core.settings.queue.time_limit_s_per_megapixel_step = 0
    served = serve(core, generator, "test-worker:1")
    try:
        slow = await finished(core, await submit(core, "/imagine a cat --steps 6"))
        assert slow.status is JobStatus.FAILED
        assert slow.error == ("this job ran past its time limit of 0.001 s (64x64, 6 steps, 1 image(s)); "
                              "lower --steps, --size or --n")
        assert slow.attempts == 1  # failed for good, not retried

        core.settings.queue.time_limit_base_s = 60
        fine = await finished(core, await submit(core, "/imagine a dog --steps 6", who=bob))
        assert fine.status is JobStatus.SUCCEEDED and len(fine.images) == 1
    finally:
        await stop(served)
    assert served[0].stats.failed == 1 and served[0].stats.succeeded == 1


def test_the_time_limit_grows_with_pixels_steps_and_images() -> None:
    from bot.config import QueueConfig
    from bot.domain import GenerationParams, JobKind
    from generation.pipelines import GenerationTask

    config = QueueConfig(time_limit_base_s=60, time_limit_s_per_megapixel_step=20)
    tasks = [GenerationTask(GenerationParams(JobKind.IMAGINE, "a cat", width=500, height=400, steps=30, n=n,
                                             seed=1)) for n in (1, 2)]
    limit = TimeLimit.of(tasks, config)
    assert limit.total_s == pytest.approx(60 + 20 * 0.2 * 30 * 3)
    assert limit.step_s == pytest.approx(60 + 20 * 0.2 * 3)
    assert limit.work == "500x400, 30 steps, 3 image(s) in one batch with other jobs"
    assert "time limit of 420 s (500x400" in limit.exceeded().message


# -- the lease ------------------------------------------------------------------------------------


async def test_a_worker_stuck_inside_a_step_loses_its_job_to_a_live_worker(core: Core, generator) -> None:
    core.settings.queue.lease_s = 0.5
    core.settings.queue.time_limit_base_s = 0.2  # a step longer than this counts as stuck
    core.settings.queue.time_limit_s_per_megapixel_step = 0
    stuck = StuckInAStep()
    first = serve(core, stuck, "test-worker:stuck")
    job_id = await submit(core, "/imagine a cat --steps 4")
    await asyncio.to_thread(stuck.stuck.wait, WAIT_S)
    core.settings.queue.time_limit_base_s = 60  # for the live worker's batch: the stuck one keeps its own
    try:
        assert await worker_of(core, job_id) == "test-worker:stuck"
        # A live worker: its upkeep finds the stuck worker's lease run out and takes the job back.
        second = serve(core, generator, "test-worker:live")
        try:
            await started_again(core, job_id)
            assert await worker_of(core, job_id) == "test-worker:live"
            # Both workers share this process's one torch thread: the live worker generates once the
            # stuck one lets go of it. Another process would not wait.
            stuck.release.set()
            job = await finished(core, job_id)
        finally:
            await stop(second)
        assert job.status is JobStatus.SUCCEEDED and job.attempts == 2
        assert await worker_of(core, job_id) == "test-worker:live"
        assert second[0].stats.succeeded == 1
    finally:
        stuck.release.set()
        await stop(first)
    assert first[0].stats.succeeded == 0  # its late result was not stored over the live worker's


async def test_a_worker_whose_steps_advance_keeps_its_job_past_many_leases(core: Core, generator) -> None:
    core.settings.queue.lease_s = 1
    core.settings.generation.progress_every_s = 3600  # no progress writes: only the heartbeat renews the lease
    served = serve(core, SlowSteps(generator, 0.2), "test-worker:1")
    job_id = await submit(core, "/imagine a cat --steps 20")  # 4 s or more: four leases at least
    takeovers: list[str] = []

    async def another_worker_looks() -> None:
        while True:
            report = await core.queue.requeue_abandoned(is_dead=lambda worker: False)
            takeovers.extend(report.requeued)
            await asyncio.sleep(0.05)

    looking = asyncio.create_task(another_worker_looks())
    try:
        job = await finished(core, job_id)
    finally:
        looking.cancel()
        await stop(served)
    assert takeovers == []
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 1


def pause_outside_a_write(process: subprocess.Popen[bytes], database: Path) -> None:
    """SIGSTOP `process` at a moment it holds no SQLite write lock. A worker writes every lease_s/4 (its
    heartbeat and registry row); stopped inside such a transaction it would lock everyone else out until
    SIGCONT. So: stop it, see whether a write can begin at once, and if not let it finish and try again."""
    while True:
        process.send_signal(signal.SIGSTOP)
        with contextlib.closing(sqlite3.connect(database, timeout=0.5, isolation_level=None)) as connection:
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("ROLLBACK")
                return
            except sqlite3.OperationalError:  # database is locked: by the process just stopped
                process.send_signal(signal.SIGCONT)


def test_a_killed_workers_job_is_finished_by_another_live_worker(tmp_path: Path, models_dir: Path) -> None:
    """Two `easel worker` processes; SIGKILL the one running a job, and the other, already serving,
    takes the job back and finishes it. SIGSTOP only decides which worker claims which job."""
    from bot.bootstrap import open_core
    from bot.config import load_settings

    env = {**os.environ, "EASEL_STORAGE__DATA_DIR": str(tmp_path / "data"),
           "EASEL_STORAGE__MODELS_DIR": str(models_dir), "EASEL_GENERATION__PROGRESS_EVERY_S": "0",
           "EASEL_GENERATION__POLL_INTERVAL_MS": "50", "EASEL_QUEUE__LEASE_S": "2"}
    settings = load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir},
                             generation={"poll_interval_ms": 50, "progress_every_s": 0})
    workers: list[subprocess.Popen[bytes]] = []

    def start_worker(name: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{name}.log", "wb") as log:
            workers.append(subprocess.Popen([sys.executable, "-m", "adapters.cli", "worker"], env=env,
                                            stdout=log, stderr=subprocess.STDOUT))
        return workers[-1]

    async def scenario() -> None:
        core = await open_core(settings)  # migrates before any worker starts
        try:
            first = start_worker("first")
            assert (await finished(core, await submit(core, "/imagine warm up --steps 2"))).status \
                is JobStatus.SUCCEEDED
            pause_outside_a_write(first, tmp_path / "data" / "easel.db")
            second = start_worker("second")
            probe = await finished(core, await submit(core, "/imagine probe --steps 2", who=bob))
            assert probe.status is JobStatus.SUCCEEDED  # the second worker is up and serving
            pause_outside_a_write(second, tmp_path / "data" / "easel.db")
            first.send_signal(signal.SIGCONT)
            job_id = await submit(core, "/imagine a slow one --steps 50 --seed 9")
            await reached_step(core, job_id)
            assert await worker_of(core, job_id) == f"{socket.gethostname()}:{first.pid}"

            second.send_signal(signal.SIGCONT)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
            job = await finished(core, job_id)
            assert job.status is JobStatus.SUCCEEDED and job.attempts == 2, job.error
            assert await worker_of(core, job_id) == f"{socket.gethostname()}:{second.pid}"
            assert [image.seed for image in job.images] == [9]
        finally:
            await core.close()

    try:
        asyncio.run(scenario())
    finally:
        for process in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait(timeout=30)


# -- the watchdog ---------------------------------------------------------------------------------


class ExitCalls:
    """A stand-in for os._exit that records the status and lets the test wait for the call."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.called = threading.Event()

    def __call__(self, status: int) -> None:
        self.statuses.append(status)
        self.called.set()


async def test_the_watchdog_ends_a_worker_stuck_inside_a_step(core: Core, caplog) -> None:
    core.settings.queue.watchdog_s = 0.5
    core.settings.queue.time_limit_base_s = 0.1
    core.settings.queue.time_limit_s_per_megapixel_step = 0
    stuck, exit_calls = StuckInAStep(), ExitCalls()
    served = serve(core, stuck, "test-worker:1", exit_process=exit_calls)
    await submit(core, "/imagine a cat --steps 4")
    try:
        with caplog.at_level(logging.CRITICAL, logger="easel.worker"):
            assert await asyncio.to_thread(exit_calls.called.wait, WAIT_S)
    finally:
        stuck.release.set()
        await stop(served)
    assert exit_calls.statuses == [WATCHDOG_EXIT_STATUS] and WATCHDOG_EXIT_STATUS != 0
    assert "at step 1/10 made no progress" in caplog.text


async def test_the_watchdog_ends_a_worker_whose_event_loop_is_blocked(core: Core) -> None:
    batch = ProgressReporter(core.queue, ["job1"], 0, TimeLimit(total_s=60, step_s=0.1, work="64x64"))
    exit_calls = ExitCalls()
    watchdog = Watchdog(0.5, lambda: batch, asyncio.get_running_loop(), exit_process=exit_calls, poll_s=0.05)
    watchdog.start()
    try:
        # Steps keep coming (from another thread), but the event loop is stuck in a blocking call.
        stepping = threading.Event()

        def steps() -> None:
            while not stepping.wait(0.02):
                batch.progressed()

        threading.Thread(target=steps, daemon=True).start()
        assert exit_calls.called.wait(WAIT_S)  # blocks the event loop on purpose
        stepping.set()
    finally:
        watchdog.stop()
    assert exit_calls.statuses == [WATCHDOG_EXIT_STATUS]


async def test_the_watchdog_allows_a_step_as_long_as_the_time_limit_grants_it(core: Core) -> None:
    batch = ProgressReporter(core.queue, ["job1"], 0, TimeLimit(total_s=3000, step_s=100, work="1024x1024"))
    start = batch.last_progress
    now = [start]
    exit_calls = ExitCalls()
    watchdog = Watchdog(10, lambda: batch, asyncio.get_running_loop(), exit_process=exit_calls,
                        clock=lambda: now[0])

    def check_at(seconds: float) -> str | None:
        now[0] = start + seconds
        watchdog.loop_answered()  # the event loop keeps running: only the step is slow
        return watchdog.check(now[0])

    assert check_at(50) is None  # longer than watchdog_s, but the time limit grants one step 100 s
    assert check_at(99) is None
    assert "made no progress for 101 s" in (check_at(101) or "")
    idle = Watchdog(10, lambda: None, asyncio.get_running_loop(), exit_process=exit_calls)
    assert idle.check(start + 10_000) is None  # no batch in hand: nothing to watch
    assert exit_calls.statuses == []
