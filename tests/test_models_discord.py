"""`/models` on Discord (discord.py against a fake Discord API): the same listing as every platform, with a
checkpoint dropped into the folder while the bot runs."""

from __future__ import annotations

from bot.bootstrap import Core
from tests.fake_discord import FakeDiscord
from tests.test_catalog import family_checkpoint
from tests.test_discord import callbacks, fake, running, settings, slash  # noqa: F401 (fixtures)


async def test_discord_answers_models_privately_and_offers_new_checkpoints_as_choices(
        core: Core, fake: FakeDiscord) -> None:  # noqa: F811
    family_checkpoint(core.settings.storage.checkpoints / "juggernaut_xl.safetensors", "sdxl")
    async with running(core) as bot:
        token = bot.dispatch(slash("models"))
        listing = (await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path)).content
        assert callbacks(fake, token)[0].json["data"]["flags"] == 64  # only the one who asked sees it
        typed = bot.dispatch(slash("imagine", focused="model", prompt="a cat", model="jugg"))
        choices = await fake.wait_for(lambda r: r.path.endswith(f"/{typed}/callback"))
    assert listing.startswith("```\nModels (pick one with --model NAME; default tiny):")
    assert "juggernaut_xl  SDXL; defaults 1024x1024, 20 steps, cfg 7, euler" in listing
    assert [choice["value"] for choice in choices.json["data"]["choices"]] == ["juggernaut_xl"]
