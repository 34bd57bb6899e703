"""Engine, unit of work and migrations.

SQLite (the default) is tuned for one writer and many readers across processes: WAL journal, a busy
timeout instead of instant "database is locked" errors, and `BEGIN IMMEDIATE` for every unit of work
that may write, so a transaction that reads then writes takes the write lock up front and never fails
half-way on a lock upgrade; within one process, writing units of work take turns (WriteTurns) rather
than meet in SQLite's busy handler, which sleeps milliseconds between tries. WAL checkpoints run in
the background every CHECKPOINT_EVERY write commits instead of inside whichever commit crossed
SQLite's threshold (one submission in ~150 paid for copying pages and two fsyncs). PostgreSQL works
by URL (`postgresql+asyncpg://...`); there the queue claims rows with `FOR UPDATE SKIP LOCKED` so
several workers can share it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Executable, Row, Table, event, insert, make_url
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from bot.errors import ConfigError
from bot.repositories import JobRepository, UserRepository
from bot.sqlite_driver import OneTripDriver

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"
# A job is stored, claimed and finished with INSERT/UPDATE ... RETURNING (bot/queue.py, bot/repositories.py),
# which SQLite has since 3.35 (2021). Python's sqlite3 module links whichever SQLite its build found.
MIN_SQLITE_VERSION = (3, 35)
AUTOCHECKPOINT_PAGES = 10_000  # SQLite checks this itself only if the background checkpoints fall behind
# The PostgreSQL advisory lock every Easel process takes around migrations (alembic/env.py): any fixed
# bigint will do, as long as it is the same everywhere; this one is "Easel" in ASCII, then 1.
MIGRATION_LOCK_KEY = 0x4561_7365_6C00_0001
MIGRATION_BUSY_TIMEOUT_MS = 120_000  # SQLite: how long a process waits for another's migrations

log = logging.getLogger("easel.database")


def create_engine(url: str, busy_timeout_ms: int = 5000) -> AsyncEngine:
    """An async engine for `url`; SQLite files get WAL, a busy timeout and explicit BEGINs."""
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(f"database.url {url!r} is not a database URL; "
                          "use e.g. sqlite+aiosqlite:///data/easel.db") from None
    if parsed.get_backend_name() == "sqlite":
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            needed = ".".join(map(str, MIN_SQLITE_VERSION))
            raise ConfigError(f"Easel needs SQLite {needed} or newer, and this Python's sqlite3 module has "
                              f"{sqlite3.sqlite_version}; run Easel with a newer Python build, or set "
                              "database.url to a PostgreSQL database")
        options: dict[str, Any] = {}
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        if parsed.get_driver_name() == "aiosqlite":  # one trip to its thread per statement, not four
            options["module"] = AsyncAdapt_aiosqlite_dbapi(OneTripDriver(), sqlite3)
        engine = create_async_engine(parsed, connect_args={"timeout": busy_timeout_ms / 1000}, **options)
        _tune_sqlite(engine, busy_timeout_ms)
        return engine
    return create_async_engine(parsed, pool_pre_ping=True)


def _tune_sqlite(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # A safety net only: Database checkpoints in the background long before the WAL is this big.
        cursor.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        options = connection.get_execution_options()
        begin = options.get("sqlite_begin", "DEFERRED")  # None: no BEGIN, each statement on its own (`reading`)
        if options.get("isolation_level") == "AUTOCOMMIT" or begin is None:
            return
        connection.exec_driver_sql(f"BEGIN {begin}")


class Database:
    """The engine plus two session factories: one for units of work that write, one for reads."""

    CHECKPOINT_EVERY = 100  # SQLite: write commits between background WAL checkpoints

    def __init__(self, url: str, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.engine = create_engine(url, busy_timeout_ms)
        write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write_sessions = async_sessionmaker(write_engine, expire_on_commit=False)
        self._read_sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # `reading` runs each statement on its own, with no BEGIN on SQLite: a SELECT reads what was
        # committed when it runs (as each statement of a PostgreSQL transaction does at READ COMMITTED),
        # and neither a BEGIN nor a rollback has to reach the connection's thread (bot/sqlite_driver.py).
        self._reads = self.engine.execution_options(sqlite_begin=None)
        in_a_file = make_url(url).database not in (None, "", ":memory:")
        self._checkpoints = self.engine.dialect.name == "sqlite" and in_a_file
        self._write_commits = 0
        self._checkpointing: asyncio.Task[None] | None = None
        self._write_turns = WriteTurns(busy_timeout_ms / 1000) if self.engine.dialect.name == "sqlite" else None

    def unit_of_work(self, *, write: bool = True, first: bool = False) -> UnitOfWork:
        """`first`: a write that goes before the writes of this process already waiting for their turn
        (WriteTurns): a worker's claim, which the device waits for, goes before submissions, which only
        their users' replies wait for."""
        if write:
            return UnitOfWork(self._write_sessions, on_commit=self._committed if self._checkpoints else None,
                              turns=self._write_turns, first=first)
        return UnitOfWork(self._read_sessions)

    def reading(self) -> AsyncConnection:
        """A connection for read-only Core statements (`async with db.reading() as connection:`): no
        session and no ORM objects, for the reads made most often (each job's watchers reading its
        events, a worker choosing its batch), where a unit of work's session cost the event loop twice
        what the statements did. Each statement reads what is committed when it runs, not a snapshot
        shared with the statements before it: what a caller acts on, it checks again in a unit of work
        (a worker's claim takes the jobs it chose only if they are still queued)."""
        return self._reads.connect()

    async def read(self, statement: Executable, values: dict[str, Any]) -> Sequence[Row[Any]]:
        """The rows of one read-only Core statement (see `reading`)."""
        async with self.reading() as connection:
            return (await connection.execute(statement, values)).all()

    def _committed(self) -> None:
        self._write_commits += 1
        busy = self._checkpointing is not None and not self._checkpointing.done()
        if self._write_commits % self.CHECKPOINT_EVERY == 0 and not busy:
            self._checkpointing = asyncio.create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database file without blocking readers or writers (PASSIVE)."""
        try:
            async with self.engine.connect() as connection:
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                await autocommit.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception:  # the next one, or SQLite's own at AUTOCHECKPOINT_PAGES, catches up
            log.warning("background WAL checkpoint failed", exc_info=True)

    async def dispose(self) -> None:
        if self._checkpointing is not None:
            await self._checkpointing
        await self.engine.dispose()


class WriteTurns:
    """SQLite lets one transaction write at a time. The others wait in its busy handler, which sleeps 1,
    2, 5, 10... ms between tries, so a submission queued behind a completion that took half a
    millisecond often lost five. This process's writing units of work take turns here instead, each
    starting the moment the one before it ends (other processes still meet SQLite's busy timeout).

    Turns go in the order they were asked for, except that a `first` one goes before every other
    waiting: a worker's claim, asked for right after the last batch's `done` events set a burst of
    submissions off, waited 8 to 12 ms behind them while the device stood idle.

    A task that already holds the turn (a unit of work opened inside another's block) does not wait
    for itself: it meets SQLite's lock, as it would without the turns."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._held = False
        self._holder: asyncio.Task[Any] | None = None
        # Those waiting, each a future resolved when its turn comes: the `first` ones, then the others.
        self._waiting: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (deque(), deque())

    @property
    def waiting(self) -> int:
        """How many writers wait for their turn."""
        return sum(len(line) for line in self._waiting)

    async def take(self, *, first: bool = False) -> bool:
        """Wait for the turn; False when the current task holds it already (nothing to give back)."""
        task = asyncio.current_task()
        if task is not None and task is self._holder:
            return False
        if self._held:  # free only when nobody waits: a turn given back goes straight to the next
            await self._wait(self._waiting[0 if first else 1])
        self._held, self._holder = True, task
        return True

    async def _wait(self, line: deque[asyncio.Future[None]]) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.append(turn)
        try:
            async with asyncio.timeout(self._timeout_s):
                await turn
        except BaseException as error:
            if turn.done() and not turn.cancelled():
                self._hand_over()  # handed the turn just as it gave up: the next one gets it
            elif turn in line:
                line.remove(turn)
            if isinstance(error, TimeoutError):
                raise TimeoutError(f"the database was busy writing for over {self._timeout_s:g} s "
                                   "(database.busy_timeout_ms)") from None
            raise

    def give_back(self) -> None:
        self._holder = None
        self._hand_over()

    def _hand_over(self) -> None:
        """Pass the turn straight to the next one waiting (it stays held), or free it."""
        for line in self._waiting:
            while line:
                turn = line.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self._held = False


class UnitOfWork:
    """One transaction, with the repositories services look things up in (`users`, `jobs`). Nothing is
    saved unless `commit()` is called; leaving the block rolls back.

    Hooks registered with `after_commit` (the event bus's wake-up for the jobs it staged events for)
    run after a commit succeeds, never after a rollback.

    Example:
        async with db.unit_of_work() as uow:
            job = await uow.jobs.get("k7mq2x9a")
            bus.stage(uow, job, EventKind.CANCELLED)
            await uow.commit()   # saves the change and the event, then wakes the job's watchers
    """

    users: UserRepository
    jobs: JobRepository

    def __init__(self, session_factory: async_sessionmaker[AsyncSession],
                 on_commit: Callable[[], None] | None = None, turns: WriteTurns | None = None,
                 first: bool = False) -> None:
        self._session_factory = session_factory
        self._on_commit = on_commit
        self._turns = turns
        self._first = first
        self._took_turn = False
        self._after_commit: dict[Callable[[list[str]], None], list[str]] = {}
        self._inserts: dict[Table, list[dict[str, Any]]] = {}
        self.session: AsyncSession

    async def __aenter__(self) -> UnitOfWork:
        if self._turns is not None:
            self._took_turn = await self._turns.take(first=self._first)
        self.session = self._session_factory()
        self.users = UserRepository(self.session)
        self.jobs = JobRepository(self.session)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._after_commit.clear()  # what was not committed must not be announced
        self._inserts.clear()
        try:
            await self.session.rollback()
        finally:
            try:
                await self.session.close()
            finally:
                if self._took_turn:
                    self._turns.give_back()

    def after_commit(self, hook: Callable[[list[str]], None], job_id: str) -> None:
        """Call `hook` once after the next successful commit, with every job id given for it (in order,
        without repeats)."""
        job_ids = self._after_commit.setdefault(hook, [])
        if job_id not in job_ids:
            job_ids.append(job_id)

    def insert_at_commit(self, table: Table, row: dict[str, Any]) -> None:
        """Insert `row` (its columns by name) into `table` when `commit()` runs, after the session's own
        changes, in one statement with the other rows for that table: the event outbox's rows, of which
        every job has several. An ORM object each cost the event loop a flush plan."""
        self._inserts.setdefault(table, []).append(row)

    async def commit(self) -> None:
        if self._inserts:
            inserts, self._inserts = self._inserts, {}
            # What the rows may refer to goes first (a flush with nothing to write still costs a trip
            # through the session's greenlet: the claim and the completion change no ORM object).
            if self.session.dirty or self.session.new or self.session.deleted:
                await self.session.flush()
            connection = await self.session.connection()
            for table, rows in inserts.items():
                await connection.execute(insert(table), rows)
        await self.session.commit()
        if self._on_commit is not None:
            self._on_commit()
        hooks, self._after_commit = self._after_commit, {}
        for hook, job_ids in hooks.items():
            hook(job_ids)


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply migrations (synchronously; call it before the event loop starts or in a thread)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The revision the database is at, or None for a new database."""
    from alembic.runtime.migration import MigrationContext

    async def _read() -> str | None:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: MigrationContext.configure(sync).get_current_revision()
                )
        finally:
            await engine.dispose()

    return asyncio.run(_read())
