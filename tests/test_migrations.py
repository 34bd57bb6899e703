"""The schema is made only by migrations: they must build exactly what the models describe."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from bot.bootstrap import Core, open_core
from bot.config import load_settings
from bot.database import current_revision
from bot.models import Base


@pytest.fixture
async def new_core(new_database_url: str, tmp_path: Path) -> AsyncIterator[Core]:
    """The core opened on a new, empty database, so open_core runs every migration (the other tests'
    databases are copies of one that conftest migrated once)."""
    core = await open_core(load_settings(None, storage={"data_dir": tmp_path / "data"},
                                         database={"url": new_database_url}))
    try:
        yield core
    finally:
        await core.close()


async def test_migrations_build_the_schema_the_models_describe(new_core: Core) -> None:
    core = new_core
    def diff(sync_connection):
        context = MigrationContext.configure(sync_connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)

    async with core.db.engine.connect() as connection:
        differences = await connection.run_sync(diff)
        tables = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert differences == []
    # Issue 6: quota_usage gave way to the jobs' own charges (jobs.cost_milli) and quota_grants.
    assert {"users", "jobs", "images", "quota_grants", "safety_flags", "appeals", "job_events"} <= tables


async def test_a_new_database_is_upgraded_to_the_newest_revision(new_core: Core) -> None:
    import asyncio

    from alembic.script import ScriptDirectory

    from bot.database import alembic_config

    head = ScriptDirectory.from_config(alembic_config(new_core.db.url)).get_current_head()
    assert await asyncio.to_thread(current_revision, new_core.db.url) == head


async def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(core: Core) -> None:
    async with core.db.engine.connect() as connection:
        journal = (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar()
        timeout = (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar()
    assert journal == "wal"
    assert timeout == core.settings.database.busy_timeout_ms


async def test_sqlite_checkpoints_in_the_background_so_the_wal_stays_small(core: Core) -> None:
    from bot.domain import JobKind, Requester

    core.db.CHECKPOINT_EVERY = 10
    wal = core.settings.storage.data_dir / "easel.db-wal"
    largest = 0
    for index in range(150):  # about 8 pages of WAL per submission
        command = core.parser.parse_generation(JobKind.IMAGINE, f"a cat number {index}")
        await core.service.submit(Requester(platform="console", user_id=f"user{index}"), command)
        # Let a background checkpoint the submission started finish before the next request, as a
        # moment between requests would: waiting on it, not sleeping, keeps this exact on a slow machine.
        if core.db._checkpointing is not None:
            await core.db._checkpointing
        largest = max(largest, wal.stat().st_size)
    # Without checkpoints the WAL would hold all 150 submissions (several MB) until SQLite's
    # own checkpoint at AUTOCHECKPOINT_PAGES; the background ones keep it to a few dozen.
    assert largest < 150 * 8 * 4096 / 3
    async with core.db.unit_of_work(write=False) as uow:
        from sqlalchemy import func, select

        from bot.models import Job
        assert await uow.session.scalar(select(func.count()).select_from(Job)) == 150


async def test_a_sqlite_statement_is_one_trip_to_the_connection_thread(core: Core,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """bot/sqlite_driver.py: each statement is made, run and read in one trip (aiosqlite as SQLAlchemy
    drives it takes four), and sqlite's own errors still reach the caller as SQLAlchemy's."""
    from sqlalchemy import exc, text

    from bot.sqlite_driver import OneTripConnection

    trips = []
    real_execute = OneTripConnection._execute

    async def counted(self: OneTripConnection, function, *args, **kwargs):
        trips.append(function)
        return await real_execute(self, function, *args, **kwargs)

    async with core.db.engine.connect() as connection:
        await connection.exec_driver_sql("SELECT 1")  # the connection is made, and its setup done, first
        monkeypatch.setattr(OneTripConnection, "_execute", counted)
        await connection.execute(text("CREATE TEMP TABLE names (id INTEGER PRIMARY KEY, name TEXT)"))
        assert len(trips) == 1
        await connection.execute(text("INSERT INTO names VALUES (7, 'ann')"))
        rows = (await connection.execute(text("SELECT id, name FROM names WHERE id > :id"), {"id": 0})).all()
        assert len(trips) == 3 and rows == [(7, "ann")]
        with pytest.raises(exc.IntegrityError):  # the same id again
            await connection.execute(text("INSERT INTO names VALUES (7, 'bob')"))
        updated = await connection.execute(text("UPDATE names SET name = 'ann2' WHERE id = 7"))
        assert updated.rowcount == 1  # the ORM checks this on every UPDATE it flushes


async def test_a_begin_rides_with_the_next_statement_and_an_empty_commit_or_rollback_costs_no_trip(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """bot/sqlite_driver.py: a unit of work that writes is two trips whatever its statements (BEGIN
    IMMEDIATE with the first, then COMMIT; those after the first run under the write lock without a trip;
    no BEGIN of its own, no pool rollback after), a read one a statement; BEGIN IMMEDIATE still keeps every
    other writer out from its first statement on, and a statement that fails, right after its BEGIN or
    under the lock, still has its transaction rolled back, so the next writer gets in."""
    import sqlite3

    from sqlalchemy import exc, text

    from bot.sqlite_driver import OneTripConnection

    async with core.db.unit_of_work() as uow:  # the pool's connection is made, and its setup done, first
        await uow.session.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY)"))
        await uow.commit()
    trips: list[str] = []
    real_execute = OneTripConnection._execute

    async def counted(self: OneTripConnection, function, *args, **kwargs):
        trips.append("commit" if function is sqlite3.Connection.commit else
                     "rollback" if function is sqlite3.Connection.rollback else "statement")
        return await real_execute(self, function, *args, **kwargs)

    monkeypatch.setattr(OneTripConnection, "_execute", counted)
    another_process = sqlite3.connect(core.settings.storage.data_dir / "easel.db", timeout=0, isolation_level=None)
    try:
        async with core.db.unit_of_work() as uow:
            await uow.session.execute(text("INSERT INTO notes VALUES (1)"))
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                another_process.execute("BEGIN IMMEDIATE")  # the write lock is held from the first statement
            await uow.session.execute(text("INSERT INTO notes VALUES (2)"))
            assert (await uow.session.execute(text("SELECT max(id) FROM notes"))).all() == [(2,)]
            await uow.session.execute(text("DELETE FROM notes WHERE id = 2"))
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                another_process.execute("BEGIN IMMEDIATE")  # and after those, until the commit
            await uow.commit()
        assert trips == ["statement", "commit"]
        trips.clear()
        assert await core.db.read(text("SELECT count(*) FROM notes"), {}) == [(1,)]
        assert trips == ["statement"]
        trips.clear()
        async with core.db.reading() as connection:  # a worker's claim: its choice is read statement by statement
            await connection.execute(text("SELECT count(*) FROM notes"))
            await connection.execute(text("SELECT max(id) FROM notes"))
        assert trips == ["statement", "statement"]

        with pytest.raises(exc.IntegrityError):  # the BEGIN ran, the INSERT after it failed
            async with core.db.unit_of_work() as uow:
                await uow.session.execute(text("INSERT INTO notes VALUES (1)"))
        another_process.execute("BEGIN IMMEDIATE")  # so the rollback was sent, and the lock let go
        another_process.execute("ROLLBACK")

        with pytest.raises(exc.IntegrityError):  # an INSERT under the lock failed: all of it is undone
            async with core.db.unit_of_work() as uow:
                await uow.session.execute(text("INSERT INTO notes VALUES (3)"))
                await uow.session.execute(text("INSERT INTO notes VALUES (1)"))
        another_process.execute("BEGIN IMMEDIATE")
        another_process.execute("ROLLBACK")
        assert await core.db.read(text("SELECT id FROM notes"), {}) == [(1,)]
    finally:
        another_process.close()


async def test_writers_of_one_process_take_turns_and_a_held_turn_times_out_clearly(settings) -> None:
    """bot/database.py WriteTurns: a second writer waits for the first instead of failing; one kept
    waiting past database.busy_timeout_ms gets an error naming that setting, and the next writer after
    the first finishes goes ahead; a unit of work opened inside another's block does not wait for itself."""
    import asyncio

    from sqlalchemy import text

    from bot.database import Database

    db = Database(settings.database_url, busy_timeout_ms=300)
    try:
        first_holds, release = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with db.unit_of_work() as uow:
                await uow.session.execute(text("CREATE TABLE IF NOT EXISTS notes (body TEXT)"))
                await uow.session.execute(text("INSERT INTO notes VALUES ('first')"))
                first_holds.set()
                await release.wait()
                await uow.commit()

        holder = asyncio.create_task(first())
        await first_holds.wait()
        with pytest.raises(TimeoutError, match=r"database\.busy_timeout_ms"):
            async with db.unit_of_work() as uow:
                await uow.session.execute(text("INSERT INTO notes VALUES ('too late')"))
        waiting = asyncio.create_task(_insert(db, "second"))  # queued behind the first, not refused
        release.set()
        await holder
        await waiting

        async with db.unit_of_work() as outer:  # nothing written yet: the inner one may write and commit
            await _insert(db, "inner")
            await outer.session.execute(text("INSERT INTO notes VALUES ('outer')"))
            await outer.commit()
        async with db.unit_of_work(write=False) as uow:
            notes = (await uow.session.scalars(text("SELECT body FROM notes"))).all()
        assert notes == ["first", "second", "inner", "outer"]
    finally:
        await db.dispose()


async def test_a_first_writer_goes_before_the_writers_already_waiting_and_one_giving_up_passes_its_turn_on(
        settings) -> None:
    """bot/database.py WriteTurns: a worker's claim (`first`) waits only for the writer holding the turn, not
    for the submissions queued before it; the others keep their order; a writer cancelled just as the turn
    reached it hands the turn on instead of keeping it."""
    import asyncio

    from sqlalchemy import text

    from bot.database import Database

    db = Database(settings.database_url, busy_timeout_ms=2000)
    try:
        async with db.unit_of_work() as uow:
            await uow.session.execute(text("CREATE TABLE notes (body TEXT)"))
            await uow.commit()
        holds, release = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with db.unit_of_work() as uow:
                holds.set()
                await release.wait()
                await uow.session.execute(text("INSERT INTO notes VALUES ('holder')"))
                await uow.commit()

        async def waiting(count: int) -> None:  # until `count` writers wait for their turn
            while db._write_turns.waiting < count:
                await asyncio.sleep(0)

        holding = asyncio.create_task(holder())
        await holds.wait()
        writers = [asyncio.create_task(_insert(db, f"submission {i}")) for i in range(3)]
        await waiting(3)
        claim = asyncio.create_task(_insert(db, "claim", first=True))
        await waiting(4)
        release.set()
        await asyncio.gather(holding, claim, *writers)
        async with db.unit_of_work(write=False) as uow:
            notes = (await uow.session.scalars(text("SELECT body FROM notes"))).all()
        assert notes == ["holder", "claim", "submission 0", "submission 1", "submission 2"]

        # A writer cancelled while the turn was on its way to it (given, its task not yet run) passes it on.
        turns = db._write_turns
        assert await turns.take()
        on_its_way, behind = asyncio.create_task(turns.take()), asyncio.create_task(turns.take())
        await waiting(2)
        turns.give_back()
        on_its_way.cancel()
        assert await asyncio.wait_for(behind, 5) is True
        with pytest.raises(asyncio.CancelledError):
            await on_its_way
        turns.give_back()
        await _insert(db, "after")  # and the turn is free again
    finally:
        await db.dispose()


async def _insert(db, body: str, *, first: bool = False) -> None:
    from sqlalchemy import text

    async with db.unit_of_work(first=first) as uow:
        await uow.session.execute(text("INSERT INTO notes VALUES (:body)"), {"body": body})
        await uow.commit()
