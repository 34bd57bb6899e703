"""Shared fixtures: real settings, a real SQLite database migrated by Alembic, and the real built-in model."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
from PIL import Image

from adapters.local_worker import garbage_collection_paused
from bot.bootstrap import Core, open_core
from bot.config import Settings, load_settings
from bot.database import upgrade_database
from bot.domain import Requester


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs one worker per core), share the cores out: each worker's
    torch, and the `easel` processes it starts, use cores/workers threads, so two workers on two
    cores do not fight over them (oversubscribed torch threads spin and slow every test down).

    And every process the tests start prints each thread's Python stack if it dies of a native crash
    (SIGSEGV, SIGABRT: faulthandler), into the stderr the tests show when they fail: an `easel worker`
    once ended with "terminate called without an active exception" after draining its batch cleanly, and
    did not again in eight runs of the same test."""
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, threads)
        with garbage_collection_paused():
            import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Generator[None, object, object]:
    """Collecting imports torch, diffusers, transformers and every test module: with the garbage
    collector paused and what they made frozen afterwards, as `easel` does for the generation stack
    (adapters/local_worker.py), collection takes half the CPU, and the tests' own collections no longer
    walk those objects."""
    with garbage_collection_paused():
        return (yield)


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own settings; a developer's environment must not leak in."""
    for var in ("EASEL_CONFIG", "DISCORD_TOKEN", "TELEGRAM_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # Tests run on builtin:tiny, the fastest model, alone; builtin:shapes (the default for users) is
    # tested in test_shapes.py. Environment variables reach Settings() and `easel` subprocesses alike.
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "tiny")
    monkeypatch.setenv("EASEL_MODELS", '{"tiny": {"source": "builtin:tiny", "default_width": 64, '
                                       '"default_height": 64}}')


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for built-in models across the session, so builtin:tiny is built once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database that Alembic brought to head once for the session. The `settings` fixtures start
    each test's database as a copy: migrating a new file takes some 50 ms, and over 300 tests open one.
    A new database's own migration is tested in test_migrations.py and test_migration_lock.py."""
    path = tmp_path_factory.mktemp("migrated") / "easel.db"
    upgrade_database(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
def data_dir(tmp_path: Path, migrated_sqlite: Path) -> Path:
    """A test's data folder, its database (easel.db, where settings look by default) a copy of the
    migrated one: what every `settings` fixture points storage.data_dir at."""
    folder = tmp_path / "data"
    folder.mkdir()
    # SQLite's backup copies a consistent snapshot, whatever the template's write-ahead log holds.
    with closing(sqlite3.connect(migrated_sqlite)) as source, closing(sqlite3.connect(folder / "easel.db")) as copy:
        source.backup(copy)
    return folder


@pytest.fixture
def settings(data_dir: Path, models_dir: Path) -> Settings:
    return load_settings(None, storage={"data_dir": data_dir, "models_dir": models_dir},
                         generation={"poll_interval_ms": 50, "progress_every_s": 0})


@pytest.fixture
async def core(settings: Settings) -> AsyncIterator[Core]:
    core = await open_core(settings)
    try:
        yield core
    finally:
        await core.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server for the session, started by tests/postgres.py (`make install` installs it)."""
    from tests.postgres import find_bin_dir, postgres_server

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.fail("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH): run "
                    "`make install` as root, which installs Debian's postgresql, or install it yourself",
                    pytrace=False)
    with postgres_server(bin_dir) as url:
        yield url


async def new_postgres_database(server_url: str, template: str = "template1") -> str:
    """The URL of a new database on the test server, made as a copy of `template` (by default, empty)."""
    import asyncpg

    name = f"easel_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(server_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await connection.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def migrated_postgres(postgres_url: str) -> str:
    """A database on the test server that Alembic brought to head once for the session: PostgreSQL copies
    it for `any_core`, as `migrated_sqlite` is copied for SQLite."""
    def migrate_a_new_database() -> str:
        url = asyncio.run(new_postgres_database(postgres_url))
        upgrade_database(url)  # its engine is gone afterwards: PostgreSQL copies only a database nobody uses
        return url

    # In a thread: `any_core` asks for this from inside a running event loop, and both asyncio.run and
    # Alembic (alembic/env.py) start loops of their own.
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(migrate_a_new_database).result().rsplit("/", 1)[1]


@pytest.fixture(params=["sqlite", "postgresql"])
async def new_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database on each supported engine, for the tests of the migrations themselves."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'easel.db'}"
    return await new_postgres_database(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_core(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Core]:
    """The core on each supported database: a SQLite file, and a database of its own on PostgreSQL."""
    if request.param == "postgresql":
        settings.database.url = await new_postgres_database(request.getfixturevalue("postgres_url"),
                                                            template=request.getfixturevalue("migrated_postgres"))
    core = await open_core(settings)
    try:
        yield core
    finally:
        await core.close()


@pytest.fixture(scope="session")
def generator(models_dir: Path):
    """The real diffusers generator on builtin:tiny, loaded once for the session."""
    from bot.config import Settings
    from generation.pipelines import DiffusersGenerator

    return DiffusersGenerator(Settings().models, device="cpu", dtype="float32", cache_dir=models_dir)


def alice() -> Requester:
    return Requester(platform="console", user_id="alice", display_name="Alice")


def bob() -> Requester:
    return Requester(platform="console", user_id="bob", display_name="Bob")


def png_bytes(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_bytes(width: int = 64, height: int = 64) -> bytes:
    """White (repaint) on the left half, black (keep) on the right."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


# -- a real output check that flags every image ---------------------------------------------------------


def save_tiny_safety_checker(folder: Path, *, flag_everything: bool) -> Path:
    """A real StableDiffusionSafetyChecker, tiny and with random weights, saved like a model's subfolders.
    Its concept thresholds decide: -2 flags every image (cosine > -1 always), 2 flags none."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(text_config={**small, "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 2,
                                     "pad_token_id": 1},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
    checker.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor")
    return folder


@pytest.fixture(scope="session")
def flag_all_checker(tmp_path_factory: pytest.TempPathFactory):
    """The real diffusers safety checker, loaded through Easel's loader, that flags every image."""
    from generation.safety_checker import DiffusersSafetyChecker, build_image_checker

    folder = save_tiny_safety_checker(tmp_path_factory.mktemp("checker-all"), flag_everything=True)
    settings = load_settings(None, safety={"image_checker": "diffusers", "image_checker_source": str(folder)})
    checker = build_image_checker(settings)  # the real loading path
    assert isinstance(checker, DiffusersSafetyChecker)
    return checker
