"""Engine, unit of work and migrations.

SQLite (the default) is tuned for one writer and many readers across processes: WAL journal, a busy
timeout instead of instant "database is locked" errors, and `BEGIN IMMEDIATE` for every unit of work
that may write, so a transaction that reads then writes takes the write lock up front and never fails
half-way on a lock upgrade. PostgreSQL works by URL (`postgresql+asyncpg://...`); there the queue
claims rows with `FOR UPDATE SKIP LOCKED` so several workers can share it.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from bot.errors import ConfigError

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"


def create_engine(url: str, busy_timeout_ms: int = 5000) -> AsyncEngine:
    """An async engine for `url`; SQLite files get WAL, a busy timeout and explicit BEGINs."""
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(f"database.url {url!r} is not a database URL; "
                          "use e.g. sqlite+aiosqlite:///data/easel.db") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, connect_args={"timeout": busy_timeout_ms / 1000})
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
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """The engine plus two session factories: one for units of work that write, one for reads."""

    def __init__(self, url: str, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.engine = create_engine(url, busy_timeout_ms)
        write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write_sessions = async_sessionmaker(write_engine, expire_on_commit=False)
        self._read_sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def unit_of_work(self, *, write: bool = True) -> UnitOfWork:
        return UnitOfWork(self._write_sessions if write else self._read_sessions)

    async def dispose(self) -> None:
        await self.engine.dispose()


class UnitOfWork:
    """One transaction. Nothing is saved unless `commit()` is called; leaving the block rolls back.

    Example:
        async with db.unit_of_work() as uow:
            uow.session.add(job)
            await uow.commit()
    """

    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self._session_factory = session_factory
        self.session: AsyncSession

    async def __aenter__(self) -> UnitOfWork:
        self.session = self._session_factory()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.session.rollback()
        finally:
            await self.session.close()

    async def commit(self) -> None:
        await self.session.commit()


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
    import asyncio

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
