"""The job service on a fake unit of work: its own decisions, fast, with no database.

The fakes stand in for `Database.unit_of_work()` and the `uow.jobs` repository (bot/repositories.py);
the policy, event bus and clock are the real ones, as bootstrap would pass them. Queries themselves are
tested on the real databases (tests/test_service.py, tests/test_wiring.py)."""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bot.clock import Clock
from bot.config import Settings
from bot.domain import JobStatus
from bot.errors import InvalidCommand, NotFound, Refused
from bot.events import EventBus, EventKind
from bot.fetch import ImageFetcher
from bot.models import Job, JobEvent, User
from bot.policy import Policy
from bot.safety import PromptCheck
from bot.service import JobService
from bot.store import FolderImageStore
from tests.conftest import alice, bob

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class FakeJobs:
    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    async def get(self, job_id: str) -> Job:
        for job in self.jobs:
            if job.id == job_id.strip().lower():
                return job
        raise NotFound(f"No job with id {job_id!r}")

    async def newest_unfinished(self, platform: str, user_id: str) -> Job | None:
        mine = [job for job in self.jobs if (job.user.platform, job.user.platform_user_id) == (platform, user_id)
                and not JobStatus(job.status).is_final]
        return mine[-1] if mine else None


class FakeUnitOfWork:
    def __init__(self, jobs: FakeJobs) -> None:
        self.jobs = jobs
        self.inserted: list[tuple[str, dict[str, Any]]] = []  # (table, row): bus.stage adds its event row here
        self.committed = False
        self._after_commit: dict[Callable[[list[str]], None], list[str]] = {}

    async def __aenter__(self) -> "FakeUnitOfWork":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._after_commit.clear()

    def insert_at_commit(self, table: Any, row: dict[str, Any]) -> None:
        self.inserted.append((table.name, row))

    def after_commit(self, hook: Callable[[list[str]], None], job_id: str) -> None:
        self._after_commit.setdefault(hook, []).append(job_id)

    async def commit(self) -> None:
        self.committed = True
        for hook, job_ids in self._after_commit.items():
            hook(job_ids)


class FakeDatabase:
    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = FakeJobs(jobs)
        self.units: list[FakeUnitOfWork] = []

    def unit_of_work(self, *, write: bool = True) -> FakeUnitOfWork:
        self.units.append(FakeUnitOfWork(self.jobs))
        return self.units[-1]


def a_job(job_id: str, owner: User, status: JobStatus = JobStatus.QUEUED) -> Job:
    return Job(id=job_id, user=owner, kind="imagine", status=status.value, prompt="a cat", negative="", width=64,
               height=64, steps=4, cfg=7.0, n=1, sampler="euler", model="tiny", seed=1, platform=owner.platform,
               reply_to={}, attempts=0, progress_step=0, progress_total=0, created_at=NOW - timedelta(minutes=1),
               images=[], cost_milli=16, nsfw_allowed=False)


def service_over(db: FakeDatabase, settings: Settings) -> JobService:
    clock = Clock(NOW)
    return JobService(settings, db, FolderImageStore(settings.storage.data_dir / "images"),
                      EventBus(db, clock=clock), policy=Policy(settings),
                      prompt_check=PromptCheck.from_settings(settings.safety),
                      fetcher=ImageFetcher(settings.fetch), clock=clock)


@pytest.fixture
def alices() -> User:
    return User(platform="console", platform_user_id="alice", display_name="Alice", role="user")


async def test_cancelling_finishes_the_newest_unfinished_job_and_announces_it_on_commit(
        settings: Settings, alices: User) -> None:
    older, newer = a_job("aaaaaaaa", alices), a_job("bbbbbbbb", alices)
    db = FakeDatabase([older, newer])
    service = service_over(db, settings)
    marker = service.bus.change_marker()

    view = await service.cancel(alice())

    assert view.id == "bbbbbbbb" and view.status is JobStatus.CANCELLED and view.finished_at == NOW
    assert older.status == JobStatus.QUEUED.value
    [uow] = db.units
    assert uow.committed and marker.is_set()
    assert [(row["job_id"], row["kind"], row["created_at"]) for table, row in uow.inserted
            if table == JobEvent.__tablename__] == [("bbbbbbbb", EventKind.CANCELLED, NOW)]


async def test_only_the_owner_cancels_and_only_what_is_unfinished(settings: Settings, alices: User) -> None:
    db = FakeDatabase([a_job("aaaaaaaa", alices), a_job("dddddddd", alices, JobStatus.SUCCEEDED)])
    service = service_over(db, settings)
    marker = service.bus.change_marker()
    with pytest.raises(Refused, match="Job aaaaaaaa is not yours; only its owner can cancel it"):
        await service.cancel(bob(), "aaaaaaaa")
    with pytest.raises(InvalidCommand, match="Job dddddddd already succeeded; there is nothing to cancel"):
        await service.cancel(alice(), " DDDDDDDD")
    with pytest.raises(NotFound, match="You have no queued or running job to cancel"):
        await service.cancel(bob())
    assert not any(uow.committed for uow in db.units) and not marker.is_set()
