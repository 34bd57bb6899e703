"""The console chat's answers, and the quota of the person at the keyboard (the local operator)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from adapters.console import ConsoleChat, console_requester
from bot.bootstrap import Core, open_core
from bot.config import Settings, load_settings
from bot.domain import GenerateCommand, Requester
from bot.errors import ConfigError, QuotaExceeded
from tests.conftest import alice, bob

BIG = "/imagine a cat --size 512x512 --n 4 --steps 30"  # 6 units: more than a user's 5 a minute


async def answer(core: Core, line: str, requester: Requester | None = None) -> str:
    out = io.StringIO()
    await ConsoleChat(core, out, requester=requester, progress=False).handle(line)
    return out.getvalue()


async def test_the_person_at_the_keyboard_has_the_owner_tier(core: Core) -> None:
    big: GenerateCommand = core.parser.parse(BIG)  # type: ignore[assignment]
    assert (await core.service.estimate(console_requester(), big)).cost == 6
    assert "Quota (owner tier)" in await answer(core, "/quota", console_requester())
    with pytest.raises(QuotaExceeded) as refused:
        await core.service.estimate(Requester("discord", "42"), big)
    assert refused.value.message.endswith("(Set by the operator: quota.tiers.user.per_minute_units.)")


async def test_the_console_tier_is_a_setting(tmp_path: Path, models_dir: Path) -> None:
    settings = load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir},
                             console={"tier": "user"})
    core = await open_core(settings)
    try:
        with pytest.raises(QuotaExceeded, match=r"\(user tier, 5 units a minute\).*quota\.tiers\.user"):
            await core.service.estimate(console_requester(), core.parser.parse(BIG))  # type: ignore[arg-type]
    finally:
        await core.close()
    with pytest.raises(ConfigError, match=r"console\.tier = 'boss' is not one of the \[quota\.tiers\.\*\]"):
        load_settings(None, console={"tier": "boss"})


async def test_every_quota_refusal_names_its_setting(settings: Settings, tmp_path: Path) -> None:
    settings.quota.tiers["user"].daily_units = 1.5
    settings.queue.daily_images_per_user = 2
    core = await open_core(settings)
    try:
        one = core.parser.parse("/imagine a cat --size 512x512")  # 1 unit, 1 image
        await core.service.submit(alice(), one)  # type: ignore[arg-type]
        with pytest.raises(QuotaExceeded, match=r"quota\.tiers\.user\.daily_units\.\)$"):
            await core.service.submit(alice(), one)  # type: ignore[arg-type]
        with pytest.raises(QuotaExceeded, match=r"queue\.daily_images_per_user\.\)$"):
            await core.service.submit(bob(), core.parser.parse("/imagine a cat --n 3"))  # type: ignore[arg-type]
    finally:
        await core.close()
