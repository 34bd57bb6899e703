"""`/models` and GET /v1/models as users reach them: the console, Telegram (python-telegram-bot against a
fake Bot API), the HTTP API with the real openai SDK, and the web chat in headless Chromium (Discord:
tests/test_models_discord.py). A checkpoint dropped
into the folder while the service runs shows up in the next listing; a pickle file is listed as refused."""

from __future__ import annotations

import io
from pathlib import Path

import openai
import pytest
from playwright.async_api import BrowserContext, expect

from adapters.console import ConsoleChat
from bot.bootstrap import Core, open_core
from bot.config import load_settings
from bot.policy import describe_quota
from tests import http_fixtures
from tests.conftest import alice
from tests.fake_telegram import FakeTelegram
from tests.http_fixtures import Server
from tests.test_catalog import family_checkpoint
from tests.test_telegram import ALICE, fake, replies_to, running_bot, tg  # noqa: F401 (fixtures)
from tests.test_web import browser, chromium, open_chat  # noqa: F401 (fixtures)

settings, server = http_fixtures.settings, http_fixtures.server  # the HTTP tests' fixtures (port 0, ...)


def drop_models(core: Core) -> Path:
    """An SDXL checkpoint, described in the config, and a pickle file, put in while the service runs."""
    checkpoints = core.settings.storage.checkpoints
    family_checkpoint(checkpoints / "juggernaut_xl.safetensors", "sdxl")
    (checkpoints / "old.ckpt").write_bytes(b"\x80\x04pickle")
    return checkpoints


async def test_the_console_lists_the_models_with_a_checkpoint_dropped_in_since_start(core: Core) -> None:
    out = io.StringIO()
    chat = ConsoleChat(core, out, requester=alice(), progress=False)
    await chat.handle("/models")
    before = out.getvalue()
    drop_models(core)
    await chat.handle("/models")
    after = out.getvalue().removeprefix(before)

    assert "tiny (default)  SD 1.x; defaults 64x64, 20 steps, cfg 7, euler" in before
    assert "juggernaut_xl" not in before
    assert "juggernaut_xl  SDXL; defaults 1024x1024, 20 steps, cfg 7, euler" in after
    assert "Not usable:\n  old.ckpt: old.ckpt is a pickle checkpoint (.ckpt), and loading one can run any code" \
        in after


async def test_telegram_answers_models_in_the_chat(tg: Core, fake: FakeTelegram) -> None:  # noqa: F811
    drop_models(tg)
    chat = fake.private(ALICE)
    async with running_bot(tg, fake):
        asked = fake.send(chat, "/models")
        await fake.wait_for(lambda: replies_to(fake, ALICE, asked), what="/models")
    [answer] = replies_to(fake, ALICE, asked)
    assert answer.shown.startswith("Models (pick one with --model NAME; default tiny):")
    assert "juggernaut_xl  SDXL" in answer.shown and "old.ckpt is a pickle checkpoint" in answer.shown


async def test_get_v1_models_lists_family_size_defaults_and_description(server: Server) -> None:
    token = await server.new_key()
    drop_models(server.core)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=token)
    listed = await client.models.list()
    juggernaut = await client.models.retrieve("Juggernaut_XL")  # names are matched in any case
    with pytest.raises(openai.NotFoundError) as refused:
        await client.models.retrieve("old")
    async with server.client(token) as http:
        raw = (await http.get("/v1/models")).json()

    assert [model.id for model in listed.data] == ["tiny", "juggernaut_xl"]
    tiny = listed.data[0].model_extra
    assert (tiny["default"], tiny["family"], tiny["family_name"], tiny["default_width"]) == (True, "sd1", "SD 1.x", 64)
    assert tiny["defaults"] == {"steps": 20, "cfg": 7.0, "sampler": "euler", "negative_prompt": ""}
    assert tiny["description"] == "untrained, draws noise: for testing Easel itself" and tiny["origin"] == "config"
    assert juggernaut.id == "juggernaut_xl" and juggernaut.object == "model" and juggernaut.owned_by == "easel"
    extra = juggernaut.model_extra
    assert (extra["family"], extra["default_width"], extra["default_height"], extra["origin"]) == \
        ("sdxl", 1024, 1024, "checkpoints")
    assert "old.ckpt is a pickle checkpoint" in refused.value.message
    [(file, reason)] = [(each["file"], each["reason"]) for each in raw["refused"]]
    assert file == "old.ckpt" and "can run any code hidden in it" in reason
    assert raw["text"].startswith("Models (pick one with --model NAME; default tiny):")


async def test_a_job_through_the_api_may_name_a_checkpoint_found_since_start(server: Server) -> None:
    token = await server.new_key()
    drop_models(server.core)
    async with server.client(token) as http:
        checked = (await http.post("/v1/jobs?dry_run=true", json={"command": "/imagine a lighthouse "
                                                                             "--model juggernaut_xl"})).json()
        pickled = await http.post("/v1/jobs", json={"command": "/imagine a lighthouse --model old"})
    assert checked["valid"] and (checked["params"]["width"], checked["params"]["height"]) == (1024, 1024)
    assert pickled.status_code == 400 and "old.ckpt is a pickle checkpoint" in pickled.json()["message"]


async def test_the_web_chat_shows_the_models(server: Server, browser: BrowserContext) -> None:  # noqa: F811
    drop_models(server.core)
    page = await open_chat(browser, server.url)
    await page.locator("#command").fill("/models")
    await page.keyboard.press("Enter")
    answer = page.locator("#log pre").last
    await expect(answer).to_contain_text("Models (pick one with --model NAME; default tiny):")
    await expect(answer).to_contain_text("juggernaut_xl  SDXL; defaults 1024x1024")
    assert page.errors == []  # type: ignore[attr-defined]


async def test_quota_prices_a_plain_imagine_at_the_default_models_own_size_and_steps(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "juggernaut_xl")  # a checkpoint, by a table of its name
    monkeypatch.setenv("EASEL_MODELS", '{"juggernaut_xl": {"default_steps": 30}}')
    settings = load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir})
    family_checkpoint(settings.storage.checkpoints / "juggernaut_xl.safetensors", "sdxl")
    core = await open_core(settings)
    try:
        answer = describe_quota(await core.service.quota(alice()))
    finally:
        await core.close()
    assert "/imagine 1024x1024, 30 steps, 1 image costs 6 units" in answer  # 4x the pixels, 1.5x the steps
