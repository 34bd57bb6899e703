"""Shared fixtures: real settings, a real SQLite database migrated by Alembic, and the real built-in model."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from bot.bootstrap import Core, open_core
from bot.config import Settings, load_settings
from bot.domain import Requester


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own settings; a developer's environment must not leak in."""
    for var in ("EASEL_CONFIG", "DISCORD_TOKEN", "TELEGRAM_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for built-in models across the session, so builtin:tiny is built once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def settings(tmp_path: Path, models_dir: Path) -> Settings:
    return load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir},
                         generation={"poll_interval_ms": 50, "progress_every_s": 0})


@pytest.fixture
async def core(settings: Settings) -> AsyncIterator[Core]:
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
