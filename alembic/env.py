"""Alembic environment: runs migrations over the async engine Easel itself uses."""

import asyncio

from sqlalchemy import text

from alembic import context
from bot.database import MIGRATION_BUSY_TIMEOUT_MS, MIGRATION_LOCK_KEY, create_engine
from bot.models import Base

target_metadata = Base.metadata


def _run(connection) -> None:
    # Several processes may start on a new database at once (three `easel worker`s, say): each would find
    # no alembic_version table, create one, and all but the first would crash. So every migration runs in
    # one transaction that first takes a lock, held until it commits or rolls back: on PostgreSQL a
    # transaction-level advisory lock, on SQLite the write lock (BEGIN IMMEDIATE, see create_engine).
    # Whoever waited then finds the schema at head and does nothing.
    connection.execution_options(sqlite_begin="IMMEDIATE")
    with connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table instead
            compare_type=True,
        )
        with context.begin_transaction():  # Alembic sees ours and starts none of its own
            context.run_migrations()


async def _run_async() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = create_engine(url, busy_timeout_ms=MIGRATION_BUSY_TIMEOUT_MS)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
