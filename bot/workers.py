"""The worker registry: which workers exist, on which hosts and devices, and what each is doing.

Each worker writes its own row of `workers` (bot.models.WorkerRow) when it starts, when a batch starts
and ends, and every lease_s/4 while it runs (the same beat that renews its jobs' lease); it deletes the
row when it stops cleanly. A host that died stops beating: its row is deleted by the next worker that
looks once its heartbeat is `queue.worker_expiry_s` old. `easel workers` and /metrics read the rows.

    registry = WorkerRegistry(db, clock)
    await registry.report(WorkerReport(worker_id="gpu-3:4121", status=WorkerStatus.BUSY, ...))
    for worker in await registry.list():
        print(worker.id, worker.status, worker.images_done)
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Update, bindparam, delete, select, update

from bot.database import Database
from bot.models import WorkerRow


class WorkerStatus(enum.StrEnum):
    IDLE = "idle"  # waiting for a job
    BUSY = "busy"  # generating or storing a batch
    DRAINING = "draining"  # asked to stop (SIGTERM): finishing its batch, claiming nothing new


@dataclass(frozen=True)
class DeviceReport:
    """The accelerator a worker generates on, and how much of its memory is in use."""

    device: str = "cpu"  # "cuda:0", "cpu", "mps"
    name: str = ""  # "NVIDIA H100 80GB HBM3", the CPU's model
    memory_used_mb: int = 0
    memory_total_mb: int = 0


@dataclass(frozen=True)
class WorkerReport:
    """What a worker says of itself at each beat."""

    worker_id: str  # "host:pid"
    host: str
    pid: int
    status: WorkerStatus
    device: DeviceReport = DeviceReport()
    models: Sequence[str] = ()
    loras: Sequence[str] = ()
    batch: Sequence[str] = ()  # the job ids in hand
    images_done: int = 0
    batches_done: int = 0
    busy_seconds: float = 0.0
    started_at: datetime | None = None


@dataclass(frozen=True)
class WorkerView:
    """One row of `easel workers`."""

    id: str
    host: str
    pid: int
    device: str
    device_name: str
    memory_used_mb: int
    memory_total_mb: int
    models: list[str]
    loras: list[str]
    status: str
    batch: list[str]
    images_done: int
    batches_done: int
    busy_seconds: float
    started_at: datetime
    heartbeat_at: datetime

    def silent_s(self, now: datetime) -> float:
        """Seconds since its last heartbeat."""
        return max(0.0, (now - self.heartbeat_at).total_seconds())


class WorkerRegistry:
    def __init__(self, db: Database, clock: Callable[[], datetime], expiry_s: float = 300.0) -> None:
        self.db = db
        self.clock = clock
        self.expiry = timedelta(seconds=expiry_s)

    async def report(self, report: WorkerReport) -> None:
        """Write the worker's row (inserted on its first report), with a fresh heartbeat."""
        now = self.clock()
        values = {
            "host": report.host, "pid": report.pid, "device": report.device.device,
            "device_name": report.device.name[:255], "memory_used_mb": report.device.memory_used_mb,
            "memory_total_mb": report.device.memory_total_mb, "models": list(report.models),
            "loras": list(report.loras), "status": report.status.value, "batch": list(report.batch),
            "images_done": report.images_done, "batches_done": report.batches_done,
            "busy_seconds": report.busy_seconds, "heartbeat_at": now,
        }
        # One UPDATE, no read first, of a statement built once: a busy worker reports about once a second,
        # beside its diffusers call, and putting this UPDATE of 14 columns together cost the event loop
        # twice what running it does. The row is inserted only when the UPDATE finds none.
        async with self.db.unit_of_work() as uow:
            updated = await uow.session.execute(
                _update_reported(), {"worker_id": report.worker_id,
                                     **{f"reported_{name}": value for name, value in values.items()}})
            if updated.rowcount == 0:
                uow.session.add(WorkerRow(id=report.worker_id, started_at=report.started_at or now, **values))
            await uow.commit()

    async def forget(self, worker_id: str) -> None:
        """Delete a worker's row: it stopped cleanly."""
        async with self.db.unit_of_work() as uow:
            await uow.session.execute(delete(WorkerRow).where(WorkerRow.id == worker_id))
            await uow.commit()

    async def expire(self) -> list[str]:
        """Delete the rows of workers silent for longer than the expiry; return their ids."""
        cutoff = self.clock() - self.expiry
        async with self.db.unit_of_work(write=False) as uow:  # usually nothing: no write lock for that
            stale = list(await uow.session.scalars(select(WorkerRow.id).where(WorkerRow.heartbeat_at < cutoff)))
        if stale:
            async with self.db.unit_of_work() as uow:
                await uow.session.execute(delete(WorkerRow).where(WorkerRow.id.in_(stale),
                                                                  WorkerRow.heartbeat_at < cutoff))
                await uow.commit()
        return stale

    async def list(self) -> list[WorkerView]:
        """Every registered worker, by host then id."""
        async with self.db.unit_of_work(write=False) as uow:
            rows = (await uow.session.scalars(select(WorkerRow).order_by(WorkerRow.host, WorkerRow.id))).all()
            return [_view(row) for row in rows]


@functools.cache
def _update_reported() -> Update:
    """The row of worker :worker_id, each column a report sets (all but the id and started_at) from the
    parameter reported_<column>. (Not named after their columns: SQLAlchemy keeps those names for itself.)"""
    values: dict[str, Any] = {column.name: bindparam(f"reported_{column.name}", type_=column.type)
                              for column in WorkerRow.__table__.c if column.name not in ("id", "started_at")}
    return update(WorkerRow).where(WorkerRow.id == bindparam("worker_id")).values(values) \
        .execution_options(synchronize_session=False)


def _view(row: WorkerRow) -> WorkerView:
    return WorkerView(
        id=row.id, host=row.host, pid=row.pid, device=row.device, device_name=row.device_name,
        memory_used_mb=row.memory_used_mb, memory_total_mb=row.memory_total_mb, models=list(row.models),
        loras=list(row.loras), status=row.status, batch=list(row.batch), images_done=row.images_done,
        batches_done=row.batches_done, busy_seconds=row.busy_seconds, started_at=row.started_at,
        heartbeat_at=row.heartbeat_at)

