"""The composition root: one place that builds Easel's core from settings.

`easel serve`, every other command, the tests and the benchmarks all start here, so they run the
same wiring. Every service is built here, once, and handed what it uses (the one clock, the policy,
the prompt check with its embedder); no service builds another or loads a model. The generation worker
(generation/worker.py) and the adapters are given the `Core` this returns; nothing in bot/ imports
them, except that the prompt check's optional sentence-embedding model is loaded through
generation/sentence_embedder.py, and only when `safety.semantic_model` is set (the core imports no
torch otherwise).

Example:
    core = await open_core(load_settings())
    result = await core.service.submit(requester, core.parser.parse("/imagine a lighthouse"))
    answer = await core.moderation.handle(moderator, core.parser.parse("/mod appeals"))
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bot.apikeys import ApiKeys
from bot.catalog import ModelCatalog
from bot.clock import Clock
from bot.config import SafetyConfig, Settings
from bot.database import Database, upgrade_database
from bot.delivery import Deliveries
from bot.events import EventBus
from bot.fetch import ImageFetcher
from bot.grammar import CommandParser
from bot.metrics import PrometheusExporter
from bot.moderation import Moderation
from bot.policy import Policy
from bot.queue import JobQueue
from bot.safety import PromptCheck
from bot.service import JobService
from bot.store import ImageStore, open_image_store
from bot.teach import TeachService
from bot.workers import WorkerRegistry


@dataclass
class Core:
    settings: Settings
    clock: Clock  # the one the service, moderation, API keys and events read; tests `set` it
    db: Database
    store: ImageStore
    bus: EventBus
    parser: CommandParser
    catalog: ModelCatalog  # the models: [models.*] and the checkpoints folder, with their defaults
    policy: Policy
    prompt_check: PromptCheck
    service: JobService
    teach: TeachService  # /teach: trainings on the same queue, and the trained words (bot/teach.py)
    moderation: Moderation  # /mod and /appeal
    apikeys: ApiKeys
    metrics: PrometheusExporter  # /metrics, read from the job rows at each scrape
    queue: JobQueue
    deliveries: Deliveries  # what each surface may show of a job (bot/delivery.py)
    workers: WorkerRegistry  # every worker of the fleet, as it last reported itself (`easel workers`)

    async def close(self) -> None:
        await self.db.dispose()


async def open_core(settings: Settings, *, migrate: bool = True) -> Core:
    """Build the core; with `migrate`, first bring the database schema up to date (a no-op when it is)."""
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        # Alembic drives its own event loop (alembic/env.py), so it runs in a thread of its own.
        await asyncio.to_thread(upgrade_database, settings.database_url)
    prompt_check = build_prompt_check(settings.safety)  # first: a model that will not load opens nothing
    clock = Clock()
    db = Database(settings.database_url, settings.database.busy_timeout_ms)
    store = open_image_store(settings.storage)
    bus = EventBus(db, clock=clock)
    policy = Policy(settings)
    parser = CommandParser.from_settings(settings)
    service = JobService(settings, db, store, bus, policy=policy, prompt_check=prompt_check,
                         fetcher=ImageFetcher(settings.fetch), clock=clock, catalog=parser.catalog)
    teach = TeachService(settings, db, store, bus, policy=policy, prompt_check=prompt_check, clock=clock,
                         catalog=parser.catalog, networks=parser.networks)
    return Core(
        settings=settings,
        clock=clock,
        db=db,
        store=store,
        bus=bus,
        parser=parser,
        catalog=parser.catalog,
        policy=policy,
        prompt_check=prompt_check,
        service=service,
        teach=teach,
        moderation=Moderation(settings, db, policy, bus, clock, teach=teach),
        apikeys=ApiKeys(db, clock),
        metrics=PrometheusExporter(db, clock),
        queue=JobQueue(settings, db, store, bus, policy, clock),
        deliveries=Deliveries(settings),
        workers=WorkerRegistry(db, clock, settings.queue.worker_expiry_s),
    )


def build_prompt_check(config: SafetyConfig) -> PromptCheck:
    """The prompt check, with its sentence-embedding model loaded when `safety.semantic_model` names one."""
    embedder = None
    if config.semantic_model:
        # Imported only here: it needs sentence-transformers (and so torch), which the core never imports.
        from generation.sentence_embedder import load_sentence_embedder

        embedder = load_sentence_embedder(config.semantic_model)
    return PromptCheck.from_settings(config, embedder)
