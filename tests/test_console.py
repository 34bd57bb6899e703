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


async def test_jobs_lists_my_recent_jobs_newest_first(core: Core) -> None:
    assert "You have no jobs yet" in await answer(core, "/jobs", alice())
    for prompt in ("a red fox", "a blue whale"):
        await core.service.submit(alice(), core.parser.parse(f"/imagine {prompt}"))  # type: ignore[arg-type]
    await core.service.submit(bob(), core.parser.parse("/imagine bob's owl"))  # type: ignore[arg-type]
    lines = (await answer(core, "/jobs", alice())).splitlines()
    assert lines[0] == "Your 2 most recent job(s), newest first (/job <id> shows one):"
    assert "queued" in lines[1] and "imagine" in lines[1] and lines[1].endswith("a blue whale")
    assert lines[2].endswith("a red fox") and len(lines) == 3


async def test_job_says_a_cancelled_job_ran_and_stopped_not_that_it_was_generated(core: Core) -> None:
    cancelled = (await core.service.submit(alice(), core.parser.parse("/imagine a red fox"))).job  # type: ignore[arg-type]
    done = (await core.service.submit(alice(), core.parser.parse("/imagine a blue whale"))).job  # type: ignore[arg-type]
    await core.queue.claim_batch("test:1", 4)  # both start, in one batch of two
    await core.service.cancel(alice(), cancelled.id)
    assert await core.queue.complete(done.id, [])
    shown = await answer(core, f"/job {cancelled.id}", alice())
    assert "cancelled after" in shown and "running (batch of 2 images)" in shown and "generated" not in shown
    shown = await answer(core, f"/job {done.id}", alice())
    assert "generated in" in shown and "(batch of 2 images)" in shown


async def test_help_gives_the_console_form_of_edit_and_inpaint(core: Core) -> None:
    text = await answer(core, "/help")
    assert "/edit <image file> <prompt> [flags]" in text
    assert "/inpaint <image file> <mask file> <prompt> [flags]" in text
    assert "/edit street.png the same street in winter" in text and "(attach a picture)" not in text


async def test_the_person_at_the_keyboard_has_the_owner_tier(core: Core) -> None:
    big: GenerateCommand = core.parser.parse(BIG)  # type: ignore[assignment]
    assert (await core.service.estimate(console_requester(), big)).cost == 6
    quota = await answer(core, "/quota", console_requester())
    assert "Quota (owner tier): no daily limit on units" in quota
    # The images-per-day cap is apart from the tier, for the owner too: it says which setting it is.
    assert "Images today: 0 of 200 (the daily image cap, queue.daily_images_per_user)." in quota
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
