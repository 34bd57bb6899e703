"""Service metrics read from the job rows, and `PrometheusExporter`, which serves them to Prometheus.

Everything is computed from the database, not from counters in one process, so the numbers are the
same whichever process serves `/metrics` and include workers on other hosts. Read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.clock import utcnow
from bot.database import Database
from bot.domain import JobStatus
from bot.models import Image, Job, WorkerRow


@dataclass(frozen=True)
class Metrics:
    queue_length: int  # jobs waiting for a worker
    jobs_by_status: dict[str, int]  # every status, zero included
    generation_seconds_sum: float  # started -> finished, over every succeeded job
    generation_seconds_count: int
    images_per_second: float  # images stored over the last `window_s`, per second
    worker_busy_ratio: float  # share of the last `window_s` during which some batch was running
    window_s: float
    # Per worker ("host:pid"), every registered one and any other that ran a batch in the window.
    workers: dict[str, WorkerRates] = field(default_factory=dict)
    workers_by_status: dict[str, int] = field(default_factory=dict)  # the registry's rows: idle, busy, draining


@dataclass(frozen=True)
class WorkerRates:
    images_per_second: float  # images it stored over the window, per second
    busy_ratio: float  # share of the window it had a batch in hand


async def read_metrics(db: Database, window_s: float = 300.0, clock: Callable[[], datetime] = utcnow) -> Metrics:
    now = clock()
    since = now - timedelta(seconds=window_s)
    async with db.unit_of_work(write=False) as uow:
        session = uow.session
        counts = dict((await session.execute(select(Job.status, func.count()).group_by(Job.status))).all())
        # Summed by the database: a scrape must not read every job ever run.
        generation_sum, generation_count = (await session.execute(
            select(func.coalesce(func.sum(_seconds_between(Job.started_at, Job.finished_at, session)), 0),
                   func.count())
            .where(Job.status == JobStatus.SUCCEEDED.value, Job.started_at.is_not(None),
                   Job.finished_at.is_not(None)))).one()
        recent_images = await session.scalar(select(func.count()).select_from(Image)
                                             .where(Image.created_at >= since))
        # Jobs of one batch share their start; the batch ran until its last job finished (or runs on).
        batches = (await session.execute(
            select(Job.worker, Job.started_at, func.max(func.coalesce(Job.finished_at, now)))
            .where(Job.started_at.is_not(None),
                   (Job.finished_at >= since) | (Job.status == JobStatus.RUNNING.value))
            .group_by(Job.worker, Job.started_at))).all()
        images_by_worker = dict((await session.execute(
            select(Job.worker, func.count(Image.id)).join(Job, Job.id == Image.job_id)
            .where(Image.created_at >= since, Job.worker.is_not(None)).group_by(Job.worker))).all())
        registered = (await session.execute(select(WorkerRow.id, WorkerRow.status))).all()
    busy_by_worker: dict[str, list[tuple[datetime, datetime]]] = {}
    for worker, start, end in batches:
        if worker is not None:
            busy_by_worker.setdefault(worker, []).append((max(start, since), end))
    names = {worker for worker, _ in registered} | set(busy_by_worker) | set(images_by_worker)
    statuses: dict[str, int] = {}
    for _, status in registered:
        statuses[status] = statuses.get(status, 0) + 1
    return Metrics(
        queue_length=counts.get(JobStatus.QUEUED.value, 0),
        jobs_by_status={status.value: counts.get(status.value, 0) for status in JobStatus},
        generation_seconds_sum=float(generation_sum),
        generation_seconds_count=int(generation_count),
        images_per_second=(recent_images or 0) / window_s,
        worker_busy_ratio=_covered_seconds([(max(s, since), e) for _, s, e in batches], now) / window_s,
        window_s=window_s,
        workers={name: WorkerRates(images_per_second=images_by_worker.get(name, 0) / window_s,
                                   busy_ratio=_covered_seconds(busy_by_worker.get(name, []), now) / window_s)
                 for name in sorted(names)},
        workers_by_status=statuses,
    )


def _seconds_between(start: Any, end: Any, session: AsyncSession) -> Any:
    """`end - start` in seconds, in SQL (SQLite stores datetimes as text; PostgreSQL has intervals)."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def _covered_seconds(intervals: list[tuple[datetime, datetime]], now: datetime) -> float:
    """Seconds covered by the union of (start, end) intervals: overlapping batches count once."""
    covered, reach = 0.0, None
    for start, end in sorted(intervals):
        end = min(end, now)
        if reach is not None and start < reach:
            start = reach
        if end > start:
            covered += (end - start).total_seconds()
            reach = end if reach is None else max(reach, end)
    return covered


# -- Prometheus ----------------------------------------------------------------------------------------

# The text format prometheus_client's generate_latest writes (the one every Prometheus version scrapes).
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Snapshot(Collector):
    """One `Metrics` reading as Prometheus metric families."""

    def __init__(self) -> None:
        self.metrics: Metrics | None = None

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        if m is None:
            return
        yield GaugeMetricFamily("easel_queue_length", "Jobs waiting for a worker.", value=m.queue_length)
        jobs = GaugeMetricFamily("easel_jobs", "Jobs by status.", labels=["status"])
        for status, count in m.jobs_by_status.items():
            jobs.add_metric([status], count)
        yield jobs
        yield SummaryMetricFamily("easel_generation_seconds", "Start to finish of succeeded jobs.",
                                  count_value=m.generation_seconds_count, sum_value=m.generation_seconds_sum)
        yield GaugeMetricFamily("easel_images_per_second",
                                f"Images made per second over the last {m.window_s:g} s.", value=m.images_per_second)
        yield GaugeMetricFamily("easel_worker_busy_ratio",
                                f"Share of the last {m.window_s:g} s some batch was running.",
                                value=m.worker_busy_ratio)
        registered = GaugeMetricFamily("easel_fleet_workers", "Registered workers by status.", labels=["status"])
        for status, count in m.workers_by_status.items():
            registered.add_metric([status], count)
        yield registered
        throughput = GaugeMetricFamily("easel_fleet_worker_images_per_second",
                                       f"Images each worker made per second over the last {m.window_s:g} s.",
                                       labels=["worker"])
        busy = GaugeMetricFamily("easel_fleet_worker_busy_ratio",
                                 f"Share of the last {m.window_s:g} s each worker had a batch in hand.",
                                 labels=["worker"])
        for worker, rates in m.workers.items():
            throughput.add_metric([worker], rates.images_per_second)
            busy.add_metric([worker], rates.busy_ratio)
        yield throughput
        yield busy


class PrometheusExporter:
    """`/metrics` for one database: a registry of its own (never the process-wide default, so two apps in
    one process don't collide), read fresh from the database at every scrape:

        exporter = core.metrics  # built once by bot.bootstrap: PrometheusExporter(db, clock)
        body = await exporter.scrape()  # b"# HELP easel_queue_length Jobs waiting for a worker.\\n..."
    """

    def __init__(self, db: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)

    async def scrape(self) -> bytes:
        # Collectors are synchronous and the reading is not: read first, then render with no await in
        # between, so concurrent scrapes never mix two readings.
        self._snapshot.metrics = await read_metrics(self.db, clock=self.clock)
        return generate_latest(self.registry)
