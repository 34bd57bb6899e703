"""Content safety: the prompt check (each evasion class, each action), strikes and their expiry, and
the output check through the real worker (builtin:tiny) with a real diffusers safety checker."""

from __future__ import annotations

import asyncio
import io
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from adapters.console import ConsoleChat
from bot.bootstrap import Core
from bot.config import SafetyCategoryConfig, SafetyConfig, load_settings
from bot.domain import JobStatus, Requester
from bot.errors import ConfigError, Refused
from bot.events import EventKind
from bot.models import Image, SafetyFlag
from bot.safety import PromptCheck, fold
from generation.safety_checker import DiffusersSafetyChecker, build_image_checker
from generation.worker import Worker
from tests.conftest import alice, bob, save_tiny_safety_checker

CHECK = PromptCheck.from_settings(SafetyConfig())


def nsfw_place() -> Requester:
    return Requester(platform="console", user_id="alice", display_name="Alice", nsfw_allowed_here=True)


async def submit(core: Core, text: str, who=alice):
    return await core.service.submit(who(), core.parser.parse(text))


async def flags(core: Core) -> list[SimpleNamespace]:
    """Every safety flag row, oldest first, as plain values."""
    async with core.db.unit_of_work(write=False) as uow:
        rows = (await uow.session.scalars(select(SafetyFlag).order_by(SafetyFlag.id))).all()
        return [SimpleNamespace(**{c.key: getattr(row, c.key) for c in SafetyFlag.__table__.columns})
                for row in rows]


# -- normalisation: every evasion class ---------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "evasion"), [
    ("a NUDE woman on a beach", "case"),
    ("a nüdé woman", "accents"),
    ("a nudе woman", "Cyrillic look-alike е"),
    ("pοrn", "Greek look-alike ο"),
    ("ｎｕｄｅ art", "full-width letters"),
    ("a nu\u200bde woman", "zero-width space inside the word"),
    ("s3x scene", "leetspeak digits"),
    ("a n@ked man", "leetspeak symbols"),
    ("p0rn", "leetspeak zero"),
    ("a n.u.d.e woman", "dots between letters"),
    ("a n u d e woman", "spaces between letters"),
    ("a nu-de woman", "hyphen inside the word"),
    ("a n_a_k_e_d man", "underscores between letters"),
    ("N.Ü.D.3 art", "everything at once"),
])
def test_each_evasion_class_still_matches(prompt: str, evasion: str) -> None:
    matches = CHECK.check(prompt).matches
    assert [m.category for m in matches] == ["sexual"], evasion


@pytest.mark.parametrize("prompt", [
    "a cottage in the Essex countryside", "a sunset over the sea", "1girl, solo, portrait, 4k",
    "a sussex spaniel", "the nudibranch, a sea slug", "a 1990s car at night",
])
def test_ordinary_prompts_do_not_match(prompt: str) -> None:
    assert CHECK.check(prompt).matches == ()


def test_fold_undoes_width_accents_look_alikes_and_invisible_characters() -> None:
    assert fold("ＮÜDЕ\u200b") == "nude"


def test_patterns_catch_combinations_words_alone_do_not() -> None:
    assert CHECK.check("a child playing in the park").matches == ()
    assert [m.category for m in CHECK.check("a ch1ld, n.a.k.e.d").matches] == ["minors", "sexual"]


def test_a_bad_pattern_in_the_config_names_itself() -> None:
    with pytest.raises(ConfigError, match=r"safety.categories.x.*not a valid regular expression"):
        load_settings(None, safety={"categories": {"x": {"action": "block", "patterns": ["(unclosed"]}}})


def test_the_semantic_check_matches_prompts_close_to_a_description() -> None:
    # A deterministic bag-of-words embedder stands in for a sentence model (none is installed here):
    # it exercises the real similarity, threshold and action code.
    vocabulary = ["violence", "blood", "weapon", "flower", "garden", "sunny"]

    def embed(texts):
        return np.array([[text.lower().count(word) + 0.01 for word in vocabulary] for text in texts])

    categories = {"violent": SafetyCategoryConfig(action="flag", description="violence, blood and a weapon")}
    check = PromptCheck(categories, embedder=embed, semantic_threshold=0.8)
    found = check.check("blood everywhere, a weapon, pure violence").matches
    assert [(m.category, m.reason_code) for m in found] == [("violent", "semantic_match")]
    assert check.check("a sunny flower garden").matches == ()


# -- actions, through the job service ------------------------------------------------------------------


async def test_block_refuses_records_a_strike_and_names_the_appeal(core: Core) -> None:
    with pytest.raises(Refused) as refused:
        await submit(core, "/imagine a l0li")
    message = refused.value.message
    recorded = await flags(core)
    assert [(f.category, f.reason_code, f.action, f.source) for f in recorded] == [
        ("minors", "matched_word", "block", "prompt_check")]
    assert "minors" in message and "strike 1 of 3" in message and f"/appeal f{recorded[0].id}" in message
    assert "a l0li" in recorded[0].detail and recorded[0].job_id is None
    assert await core.service.list_jobs() == []


async def test_nsfw_only_is_refused_outside_nsfw_places_without_a_strike(core: Core) -> None:
    with pytest.raises(Refused, match=r"allowed only where NSFW content is allowed") as refused:
        await submit(core, "/imagine a n.u.d.e statue")
    assert "strike" not in refused.value.message
    assert [(f.category, f.action) for f in await flags(core)] == [("sexual", "refuse_here")]


async def test_nsfw_only_is_allowed_and_recorded_where_nsfw_is_allowed(core: Core) -> None:
    job = (await submit(core, "/imagine a nude statue", who=nsfw_place)).job
    assert job.status is JobStatus.QUEUED
    assert [(f.category, f.action, f.job_id) for f in await flags(core)] == [("sexual", "allow_nsfw", job.id)]


async def test_flag_allows_the_job_and_records_it_for_moderators(core: Core) -> None:
    job = (await submit(core, "/imagine a g0ry battle scene")).job
    assert job.status is JobStatus.QUEUED
    assert [(f.category, f.action, f.job_id) for f in await flags(core)] == [("gore", "flag", job.id)]


async def test_the_negative_prompt_is_not_checked(core: Core) -> None:
    job = (await submit(core, "/imagine a portrait --no nude, blurry")).job
    assert job.params.negative == "nude, blurry"
    assert await flags(core) == []


# -- strikes and their expiry --------------------------------------------------------------------------


async def test_strikes_ban_for_the_configured_time_and_the_ban_expires(core: Core) -> None:
    moderation = core.settings.moderation
    moderation.strikes_to_ban, moderation.strike_window_hours, moderation.strike_ban_hours = 2, 1, 2
    start = core.clock()
    core.clock.set(start)
    with pytest.raises(Refused, match="strike 1 of 2 within 1 h; at 2 you are banned for 2 h"):
        await submit(core, "/imagine loli")
    with pytest.raises(Refused, match=r"strike 2 of 2 within 1 h, so you are banned for 2 h, until .* \(in 2 h\)"):
        await submit(core, "/imagine shota")
    with pytest.raises(Refused, match=r"You are banned until .* Reason: 2 refused requests within 1 h\..*"
                                      r"/appeal ban"):
        await submit(core, "/imagine a cat")
    await submit(core, "/imagine a cat", who=bob)  # others are not affected
    assert [f.action for f in await flags(core)][-1] == "ban"

    core.clock.set(start + timedelta(hours=2, minutes=1))
    assert (await submit(core, "/imagine a cat")).job.status is JobStatus.QUEUED
    # Strikes before the ban do not count again: the next one is the first of a new count.
    with pytest.raises(Refused, match="strike 1 of 2"):
        await submit(core, "/imagine loli")


async def test_strikes_older_than_the_window_expire(core: Core) -> None:
    core.settings.moderation.strikes_to_ban, core.settings.moderation.strike_window_hours = 2, 1
    start = core.clock()
    core.clock.set(start)
    with pytest.raises(Refused, match="strike 1 of 2"):
        await submit(core, "/imagine loli")
    core.clock.set(start + timedelta(minutes=61))
    with pytest.raises(Refused, match="strike 1 of 2"):
        await submit(core, "/imagine loli")
    assert (await submit(core, "/imagine a cat")).job.status is JobStatus.QUEUED


# -- the output check, through the real worker ---------------------------------------------------------


def worker_for(core: Core, generator, checker) -> Worker:
    return Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1",
                  image_checker=checker)


async def final_event(core: Core, job_id: str):
    return [event async for event in core.bus.watch(job_id)][-1]


async def test_a_flagged_image_is_withheld_with_the_reason_and_how_to_appeal(
        core: Core, generator, flag_all_checker) -> None:
    job = (await submit(core, "/imagine a statue --steps 2 --n 2")).job
    await worker_for(core, generator, flag_all_checker).run(burst=True)
    done = await final_event(core, job.id)
    finished = await core.service.get_job(job.id)
    delivery = core.deliveries.of_event(done, finished)
    assert delivery.kind is EventKind.DONE and delivery.images == ()
    assert [w.index for w in delivery.withheld] == [0, 1]
    assert f"/appeal {job.id}" in delivery.notice and "flagged it as nsfw" in delivery.notice
    assert finished.status is JobStatus.SUCCEEDED and all(image.withheld for image in finished.images)
    # Not blacked out: the stored image is the generated one, with its colours.
    pixels = np.asarray(PILImage.open(finished.images[0].path))
    assert pixels.std() > 0
    recorded = await flags(core)
    assert [(f.subject, f.action, f.source, f.reason_code) for f in recorded] == [
        (f"image:{image.sha256}", "withhold", "image_check", "diffusers_safety_checker")
        for image in finished.images]


async def test_a_flagged_image_is_spoilered_where_nsfw_is_allowed(core: Core, generator, flag_all_checker) -> None:
    job = (await submit(core, "/imagine a statue --steps 2", who=nsfw_place)).job
    await worker_for(core, generator, flag_all_checker).run(burst=True)
    done = await final_event(core, job.id)
    delivery = core.deliveries.of_event(done, await core.service.get_job(job.id))
    assert [image.spoiler for image in delivery.images] == [True] and delivery.withheld == ()
    async with core.db.unit_of_work(write=False) as uow:
        assert (await uow.session.scalar(select(Image.safety_flags))) == ["nsfw:spoiler"]


async def test_unflagged_images_are_delivered_as_usual(core: Core, generator, tmp_path: Path) -> None:
    folder = save_tiny_safety_checker(tmp_path, flag_everything=False)
    checker = DiffusersSafetyChecker(str(folder))
    job = (await submit(core, "/imagine a statue --steps 2")).job
    await worker_for(core, generator, checker).run(burst=True)
    done = await final_event(core, job.id)
    delivery = core.deliveries.of_event(done, await core.service.get_job(job.id))
    assert len(delivery.images) == 1 and not delivery.images[0].spoiler
    assert await flags(core) == []


async def test_the_console_never_saves_a_withheld_image_and_says_why(
        core: Core, generator, flag_all_checker, tmp_path: Path) -> None:
    out = io.StringIO()
    chat = ConsoleChat(core, out, requester=alice(), output_dir=tmp_path / "out", progress=False)
    handled = asyncio.create_task(chat.handle("/imagine a statue --steps 2"))
    while not handled.done():
        await worker_for(core, generator, flag_all_checker).run(burst=True)
        await asyncio.sleep(0.01)
    job = handled.result()
    assert "Image 1 was withheld" in out.getvalue() and f"/appeal {job.id}" in out.getvalue()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_choosing_an_image_checker_that_cannot_load_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs the nudenet package"):
        build_image_checker(load_settings(None, safety={"image_checker": "nudenet"}))
    with pytest.raises(ConfigError, match=r"needs safety\.image_checker_source"):
        build_image_checker(load_settings(None, safety={"image_checker": "diffusers"}))
