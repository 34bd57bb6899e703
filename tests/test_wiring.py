"""The composition root and the unit of work: each service built once, one clock, repositories, and
events announced by the commit that saves them (real SQLite; no model needed)."""

import asyncio
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.bootstrap import Core, open_core
from bot.config import SafetyConfig, Settings
from bot.database import create_engine
from bot.errors import ConfigError, NotFound
from bot.events import EventKind
from bot.safety import PromptCheck
from tests.conftest import alice


async def submit(core: Core, text: str = "/imagine a cat"):
    return await core.service.submit(alice(), core.parser.parse(text))


def test_the_core_builds_each_service_once_and_shares_it(core: Core) -> None:
    assert core.service.policy is core.policy and core.moderation.policy is core.policy
    assert core.service.prompt_check is core.prompt_check
    assert core.service.clock is core.clock
    assert core.moderation.clock is core.clock and core.apikeys.clock is core.clock and core.bus.clock is core.clock


async def test_one_clock_stamps_the_job_and_its_event(core: Core) -> None:
    moment = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    core.clock.set(moment)
    job = (await submit(core)).job
    [event] = await core.bus.read_after(0, job_id=job.id)
    assert job.created_at == event.created_at == moment
    core.clock.advance(timedelta(minutes=1))
    cancelled = await core.service.cancel(alice(), job.id)
    assert cancelled.finished_at == moment + timedelta(minutes=1)


async def test_a_wait_cancelled_as_the_change_comes_ends_cancelled(core: Core) -> None:
    """A stopping worker sets its stop event and cancels its upkeep's wait at once: the wait must end
    cancelled, not return as if woken (with Python 3.11's asyncio.wait_for it returned, the upkeep loop
    went on, and the stopped worker never finished stopping)."""
    marker = core.bus.change_marker()
    waiting = asyncio.create_task(core.bus.wait_for_change(60, marker))
    await asyncio.sleep(0)  # it waits
    marker.set()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_the_commit_wakes_the_watchers_of_staged_events_and_a_rollback_does_not(core: Core) -> None:
    marker = core.bus.change_marker()
    job = (await submit(core)).job  # the service calls no notify itself
    assert marker.is_set()

    marker = core.bus.change_marker()
    async with core.db.unit_of_work() as uow:
        core.bus.stage(uow, await uow.jobs.get(job.id), EventKind.PROGRESS, {"step": 1, "total": 2})
    assert not marker.is_set()  # rolled back: nothing happened, so nobody is woken
    assert [e.kind for e in await core.bus.read_after(0, job_id=job.id)] == [EventKind.QUEUED]

    async with core.db.unit_of_work() as uow:
        core.bus.stage(uow, await uow.jobs.get(job.id), EventKind.PROGRESS, {"step": 1, "total": 2})
        await uow.commit()
        assert marker.is_set()


async def test_users_are_made_once_and_renamed_by_their_platform(core: Core) -> None:
    now = core.clock()
    async with core.db.unit_of_work() as uow:
        assert await uow.users.get_by_platform("console", "carol") is None
        made = await uow.users.get_or_create("console", "carol", now=now, display_name="Carol")
        assert made.id is not None  # flushed: rows of the same unit of work may refer to it
        again = await uow.users.get_or_create("console", "carol", now=now, display_name="Caroline")
        unnamed = await uow.users.get_or_create("console", "carol", now=now)  # no name: keep the old one
        assert made is again is unnamed and made.display_name == "Caroline"
        await uow.commit()


async def test_jobs_are_found_by_the_id_as_users_type_it(core: Core) -> None:
    job = (await submit(core)).job
    async with core.db.unit_of_work(write=False) as uow:
        assert (await uow.jobs.get(f"  {job.id.upper()} ")).id == job.id
        assert await uow.jobs.find("zzzzzzzz") is None
        with pytest.raises(NotFound, match=r"No job with id 'zzzzzzzz'; ids look like k7mq2x9a"):
            await uow.jobs.get("zzzzzzzz")


async def test_a_semantic_model_that_cannot_load_stops_the_core_from_opening(settings: Settings) -> None:
    settings.safety.semantic_model = "/models/minilm"
    with pytest.raises(ConfigError, match="sentence-transformers package is not installed"):
        await open_core(settings, migrate=False)  # bootstrap loads it through generation/sentence_embedder.py


def test_a_configured_semantic_model_must_be_passed_in() -> None:
    with pytest.raises(ValueError, match=r"load it .* and pass it as `embedder`"):
        PromptCheck.from_settings(SafetyConfig(semantic_model="/models/minilm"))


def test_the_core_imports_no_torch() -> None:
    code = ("import sys, bot.bootstrap, bot.idempotency, bot.followups\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'generation'))\n"
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_sqlite_too_old_for_returning_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    # Python builds link whichever SQLite they found; before 3.35 every submission would fail mid-way
    # with an internal error about RETURNING.
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(ConfigError, match=r"SQLite 3\.35 or newer.* has 3\.31\.1; .*PostgreSQL"):
        create_engine(f"sqlite+aiosqlite:///{tmp_path}/easel.db")
