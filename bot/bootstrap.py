"""The composition root: one place that builds Easel's core from settings.

`easel serve`, every other command, the tests and the benchmarks all start here, so they run the
same wiring. The generation worker (generation/worker.py) and the adapters are built on top of the
`Core` this returns; nothing in bot/ imports them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bot.config import Settings
from bot.database import Database, upgrade_database
from bot.delivery import Deliveries
from bot.events import EventBus
from bot.grammar import CommandParser
from bot.queue import JobQueue
from bot.service import JobService
from bot.store import ImageStore


@dataclass
class Core:
    settings: Settings
    db: Database
    store: ImageStore
    bus: EventBus
    parser: CommandParser
    service: JobService
    queue: JobQueue
    deliveries: Deliveries  # what each surface may show of a job (bot/delivery.py)

    async def close(self) -> None:
        await self.db.dispose()


async def open_core(settings: Settings, *, migrate: bool = True) -> Core:
    """Build the core; with `migrate`, first bring the database schema up to date (a no-op when it is)."""
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        # Alembic drives its own event loop (alembic/env.py), so it runs in a thread of its own.
        await asyncio.to_thread(upgrade_database, settings.database_url)
    db = Database(settings.database_url, settings.database.busy_timeout_ms)
    store = ImageStore(settings.storage.data_dir / "images")
    bus = EventBus(db)
    return Core(
        settings=settings,
        db=db,
        store=store,
        bus=bus,
        parser=CommandParser.from_settings(settings),
        service=JobService(settings, db, store, bus),
        queue=JobQueue(settings, db, store, bus),
        deliveries=Deliveries(settings),
    )
