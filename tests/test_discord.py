"""The Discord adapter through the real discord.py client, a local fake Discord API and the real worker.

Interactions are dispatched through discord.py's own INTERACTION_CREATE parser (what its gateway
does with each event); every REST call discord.py makes goes over HTTP to tests/fake_discord.py on
127.0.0.1. Generation runs on the real builtin:tiny model in a burst-mode worker. The assertions
are about what the user sees in Discord: the deferral, the edits, the files, the buttons.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import av
import discord
import numpy as np
import pytest
from discord.ext import commands
from PIL import Image

from adapters.cli import build_parser
from adapters.discord import DiscordAdapter, command_text
from adapters.discord_render import pack_results
from bot.bootstrap import Core, open_core
from bot.config import Settings, load_settings
from bot.domain import JobKind, JobStatus
from bot.store import read_parameters
from generation.worker import Worker
from tests.conftest import png_bytes
from tests.fake_discord import APPLICATION_ID, FakeDiscord, Request, snowflake

GUILD_ID = 700000000000000001
CHANNEL_ID = 700000000000000002
ALICE = 700000000000000010
BOB = 700000000000000011
MANAGE_MESSAGES = 1 << 13
BOT_TOKEN = "test-bot-token"

# discord.py's option types
STRING, INTEGER, NUMBER, ATTACHMENT = 3, 4, 10, 11
_OPTION_TYPES = {"seed": INTEGER, "steps": INTEGER, "count": INTEGER, "cfg": NUMBER, "strength": NUMBER,
                 "image": ATTACHMENT, "mask": ATTACHMENT, "zoom": NUMBER, "left": INTEGER, "right": INTEGER,
                 "up": INTEGER, "down": INTEGER, "frames": INTEGER, "fps": INTEGER, "rotate": NUMBER,
                 "rank": INTEGER, **{f"picture{number}": ATTACHMENT for number in range(1, 11)}}


# -- fixtures and helpers -----------------------------------------------------------------------------


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    monkeypatch.setattr(discord.http.Route, "BASE", server.api_base)
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def settings(data_dir: Path, models_dir: Path) -> Settings:
    return load_settings(None, storage={"data_dir": data_dir, "models_dir": models_dir},
                         generation={"poll_interval_ms": 50, "progress_every_s": 0},
                         discord={"token": BOT_TOKEN, "progress_edit_every_s": 0})


class Bot:
    """One running adapter (one bot process), fed interactions as the gateway would feed them."""

    def __init__(self, core: Core, clock: Any = time.time) -> None:
        self.adapter = DiscordAdapter(core, gateway=False, clock=clock)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Bot:
        self.task = asyncio.create_task(self.adapter.run(self.stop))
        ready = asyncio.ensure_future(self.adapter.ready.wait())
        await asyncio.wait([ready, self.task], return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()  # raise what stopped it
        return self

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task

    def dispatch(self, payload: dict[str, Any]) -> str:
        """Hand an INTERACTION_CREATE event to discord.py's parser; returns the interaction's token."""
        self.adapter.client._connection.parsers["INTERACTION_CREATE"](payload)
        return payload["token"]


@contextlib.asynccontextmanager
async def running(core: Core, **kwargs: Any) -> AsyncIterator[Bot]:
    bot = await Bot(core, **kwargs).start()
    try:
        yield bot
    finally:
        await bot.close()


async def work_until(core: Core, generator, fake: FakeDiscord, predicate, checker=None) -> Request:
    """Run a burst worker (with the output `checker`, if any) over and over until the fake Discord has
    seen a matching request."""
    async def drain() -> None:
        while True:
            await Worker(core.queue, generator, core.store, core.settings, worker_id="test:1",
                         image_checker=checker).run(burst=True)
            await asyncio.sleep(0.02)

    worker = asyncio.create_task(drain())
    try:
        return await fake.wait_for(predicate)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


_counter = iter(range(1, 10**6))


def _member(user_id: int, permissions: int) -> dict[str, Any]:
    return {"user": {"id": str(user_id), "username": f"user{user_id % 100}", "discriminator": "0",
                     "global_name": f"User {user_id % 100}", "avatar": None},
            "roles": [], "joined_at": "2024-01-01T00:00:00+00:00", "deaf": False, "mute": False,
            "permissions": str(permissions), "flags": 0, "nick": None, "avatar": None, "pending": False}


def _base(kind: int, *, user: int, permissions: int, created: datetime | None, nsfw: bool,
          upload_limit: int) -> dict[str, Any]:
    interaction_id = snowflake(created, counter=next(_counter))
    return {
        "id": str(interaction_id), "application_id": str(APPLICATION_ID), "type": kind,
        "token": f"interaction-token-{interaction_id}", "version": 1, "guild_id": str(GUILD_ID),
        "channel_id": str(CHANNEL_ID),
        "channel": {"id": str(CHANNEL_ID), "type": 0, "guild_id": str(GUILD_ID), "name": "art", "position": 0,
                    "nsfw": nsfw, "permission_overwrites": [], "parent_id": None, "topic": None,
                    "last_message_id": None, "rate_limit_per_user": 0, "flags": 0},
        "member": _member(user, permissions), "app_permissions": "2147483647", "locale": "en-US",
        "guild_locale": "en-US", "entitlements": [], "authorizing_integration_owners": {"0": str(GUILD_ID)},
        "context": 0, "attachment_size_limit": upload_limit,
    }


def slash(name: str, *, user: int = ALICE, permissions: int = 0, created: datetime | None = None,
          nsfw: bool = False, upload_limit: int = 10 * 1024 * 1024, focused: str | None = None,
          **options: Any) -> dict[str, Any]:
    """An application command interaction, as Discord sends it; attachments as fake.add_attachment made them."""
    payload = _base(4 if focused else 2, user=user, permissions=permissions, created=created, nsfw=nsfw,
                    upload_limit=upload_limit)
    resolved: dict[str, Any] = {}
    data_options = []
    for key, value in options.items():
        option = {"name": key, "type": _OPTION_TYPES.get(key, STRING), "value": value}
        if isinstance(value, dict):  # an attachment
            resolved.setdefault("attachments", {})[value["id"]] = value
            option["value"] = value["id"]
        if key == focused:
            option["focused"] = True
        data_options.append(option)
    payload["data"] = {"id": "1", "name": name, "type": 1, "options": data_options, "resolved": resolved}
    return payload


def press(fake: FakeDiscord, message: dict[str, Any], custom_id: str, *, user: int = ALICE,
          permissions: int = 0) -> dict[str, Any]:
    """A button press on a message the fake holds."""
    payload = _base(3, user=user, permissions=permissions, created=None, nsfw=False, upload_limit=10 * 1024 * 1024)
    payload["message"] = message
    fake.pressed_on(payload["token"], int(message["id"]))
    payload["data"] = {"custom_id": custom_id, "component_type": 2}
    return payload


def webhook_path(token: str) -> str:
    return f"/webhooks/{APPLICATION_ID}/{token}"


def is_final_edit(token: str):
    return lambda r: r.method == "PATCH" and r.path.startswith(webhook_path(token)) and bool(r.files) \
        and r.status == 200


def is_progress(request: Request) -> bool:
    return re.search(r"step \d+/\d+", request.content or "") is not None


def callbacks(fake: FakeDiscord, token: str) -> list[Request]:
    return [r for r in fake.requests if r.path.endswith(f"/{token}/callback")]


async def only_job(core: Core):
    jobs = await core.service.list_jobs()
    assert len(jobs) == 1
    return jobs[0]


# -- slash commands, progress and results ------------------------------------------------------------


async def test_imagine_defers_then_shows_position_progress_and_the_images_with_buttons(
        core: Core, generator, fake: FakeDiscord) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", prompt="a lighthouse at dusk --seed 42", steps=3, count=2,
                                   negative="fog"))
        final = await work_until(core, generator, fake, is_final_edit(token))

    # The first thing Discord heard for this interaction is the deferral ("Easel is thinking...").
    token_requests = [r for r in fake.requests if token in r.path]
    assert token_requests[0].path.endswith("/callback") and token_requests[0].json["type"] == 5
    edits = [r.content for r in token_requests if r.method == "PATCH"]
    assert "queued, position 1" in edits[0]
    assert any("step 1/3" in text for text in edits) and any("step 3/3" in text for text in edits)

    job = await only_job(core)
    assert job.params.prompt == "a lighthouse at dusk" and job.params.negative == "fog"
    assert [image.seed for image in job.images] == [42, 43]
    assert f"<@{ALICE}>" in final.content and "seeds 1: 42, 2: 43" in final.content
    assert [f.name for f in final.files] == [f"{job.id}-1-seed42.png", f"{job.id}-2-seed43.png"]
    for sent, image in zip(final.files, job.images, strict=True):
        assert sent.data == Path(image.path).read_bytes()
        assert "Seed: " + str(image.seed) in read_parameters(sent.data)
    assert {f"easel:reroll:{job.id}", f"easel:info:{job.id}", f"easel:delete:{job.id}",
            f"easel:vary:{job.id}:0", f"easel:vary:{job.id}:1", f"easel:upscale:{job.id}:1"} \
        <= set(final.custom_ids)
    assert not any(":zoom" in i or ":left:" in i for i in final.custom_ids)  # zoom and pan: one image only
    assert (await core.service.get_job(job.id)).delivered_at is not None


@pytest.mark.parametrize(("options", "expected"), [
    ({"prompt": "a cat", "steps": 500}, "--steps must be a whole number from 1 to 50 (got 500)"),
    ({"prompt": "a cat --sed 4"}, "unknown flag --sed (did you mean --seed?)"),
    ({"prompt": "a cat --seed 4", "seed": 5}, "--seed was given twice"),
    ({"prompt": "a cat", "aspect": "16:9"}, None),
])
async def test_options_and_typed_flags_go_through_the_same_grammar(
        core: Core, fake: FakeDiscord, options: dict[str, Any], expected: str | None) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", **options))
        answer = await fake.wait_for(lambda r: r.path.endswith(f"/{token}/callback"))
        if expected is None:
            await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path and "queued" in (r.content or ""))
    if expected is None:
        assert answer.json["type"] == 5  # accepted: deferred, and queued
        job = await only_job(core)
        assert job.params.width > job.params.height  # --ar 16:9
        return
    assert answer.json["type"] == 4 and answer.json["data"]["flags"] == 64  # only the user sees it
    assert expected in answer.json["data"]["content"]
    assert await core.service.list_jobs() == []


def test_command_text_turns_options_into_flags() -> None:
    assert command_text("a cat", {"aspect": "16: 9", "count": 2, "negative": "blurry  text"}) == \
        "a cat --ar 16:9 --n 2 --no blurry text"


async def test_model_and_sampler_names_autocomplete(core: Core, fake: FakeDiscord) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", focused="sampler", prompt="a cat", sampler="dpm"))
        answer = await fake.wait_for(lambda r: r.path.endswith(f"/{token}/callback"))
    assert answer.json["type"] == 8
    assert [c["value"] for c in answer.json["data"]["choices"]] == ["dpmpp_2m", "dpmpp_2m_karras"]


# -- tokens that expire, and Discord errors ------------------------------------------------------------


async def test_results_go_to_the_channel_when_discord_refuses_the_expired_token(
        core: Core, generator, fake: FakeDiscord) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", prompt="a red fox --seed 3", steps=2))
        await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path and "queued" in (r.content or ""))
        fake.expire_token(token)
        posted = await work_until(core, generator, fake,
                                  lambda r: r.method == "POST" and r.path == f"/channels/{CHANNEL_ID}/messages")
    job = await only_job(core)
    assert posted.status == 200 and posted.authorization == f"Bot {BOT_TOKEN}"
    assert f"<@{ALICE}>" in posted.content and [f.name for f in posted.files] == [f"{job.id}-1-seed3.png"]
    assert f"easel:reroll:{job.id}" in posted.custom_ids
    original = callbacks(fake, token)[0]
    assert int(posted.json["message_reference"]["message_id"]) == _original_id(fake, original)
    assert any(r.status == 401 for r in fake.requests if token in r.path)  # the refused edit
    assert (await core.service.get_job(job.id)).delivered_at is not None


async def test_results_go_to_the_channel_without_trying_a_token_about_to_expire(
        core: Core, generator, fake: FakeDiscord) -> None:
    now = [time.time()]
    async with running(core, clock=lambda: now[0]) as bot:
        token = bot.dispatch(slash("imagine", prompt="a red fox", steps=2))
        await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path and "queued" in (r.content or ""))
        seen = len(fake.requests)
        now[0] += 14 * 60  # the job waited 14 minutes: less than the margin is left of the token
        posted = await work_until(core, generator, fake,
                                  lambda r: r.method == "POST" and r.path == f"/channels/{CHANNEL_ID}/messages")
    assert posted.status == 200 and len(posted.files) == 1
    assert not [r for r in fake.requests[seen:] if token in r.path]  # no doomed edits were tried


async def test_a_progress_edit_near_expiry_says_where_the_result_will_be(
        core: Core, generator, fake: FakeDiscord) -> None:
    now = [time.time()]
    async with running(core, clock=lambda: now[0]) as bot:
        token = bot.dispatch(slash("imagine", prompt="a red fox", steps=2))
        await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path and "queued" in (r.content or ""))
        now[0] += 12 * 60 + 30  # 2.5 minutes of the token left: one last edit, then the channel
        final = await work_until(core, generator, fake, is_final_edit(token))
    edits = [r for r in fake.requests if r.method == "PATCH" and token in r.path]
    assert any("posted in this channel" in (r.content or "") for r in edits)
    assert not any(is_progress(r) for r in edits)  # the hand-off note is not covered by progress
    assert final is edits[-1]  # and the token, still valid, carried the result


async def test_a_rate_limited_edit_and_a_failed_upload_are_retried(core: Core, generator, fake: FakeDiscord) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", prompt="a red fox --seed 9", steps=2))
        fake.fail_next("PATCH", webhook_path(token), 429, when=is_progress)
        fake.fail_next("PATCH", webhook_path(token), 500, when=lambda r: bool(r.files))
        final = await work_until(core, generator, fake, is_final_edit(token))
    statuses = [(r.status, bool(r.files), is_progress(r)) for r in fake.requests
                if r.method == "PATCH" and token in r.path]
    assert (429, False, True) in statuses and statuses.index((429, False, True)) < len(statuses) - 1
    assert statuses[-2:] == [(500, True, False), (200, True, False)]  # the upload, refused once, then sent
    assert [f.name.endswith("seed9.png") for f in final.files] == [True]


# -- restarts ------------------------------------------------------------------------------------------


async def test_results_finished_while_the_bot_was_down_are_delivered_after_it_starts(
        core: Core, generator, fake: FakeDiscord) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", prompt="a lighthouse --seed 5", steps=2))
        await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path and "queued" in (r.content or ""))
    # The bot is down; the worker (another process in production) finishes the job meanwhile.
    await Worker(core.queue, generator, core.store, core.settings, worker_id="test:1").run(burst=True)
    job = await only_job(core)
    assert job.status is JobStatus.SUCCEEDED and job.delivered_at is None
    assert not [r for r in fake.requests if r.files]

    async with running(core):
        final = await fake.wait_for(is_final_edit(token))
    assert [f.name for f in final.files] == [f"{job.id}-1-seed5.png"]
    assert (await core.service.get_job(job.id)).delivered_at is not None


async def test_zoom_out_and_pan_buttons_outpaint_the_image_after_a_restart(core: Core, generator, fake: FakeDiscord,
                                                                           settings: Settings) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", prompt="a castle --seed 11", steps=2))
        final = await work_until(core, generator, fake, is_final_edit(token))
    job = await only_job(core)
    assert {f"easel:{action}:{job.id}:0" for action in ("zoom15", "zoom2", "left", "up", "right", "down")} \
        <= set(final.custom_ids)
    message = fake.messages[_original_id(fake, callbacks(fake, token)[0])]

    await core.close()
    core = await open_core(settings)  # a new process: it has never seen the message it gets presses from
    try:
        async with running(core) as bot:
            zoom_token = bot.dispatch(press(fake, message, f"easel:zoom2:{job.id}:0", user=BOB))
            zoomed = await work_until(core, generator, fake, is_final_edit(zoom_token))
            pan_token = bot.dispatch(press(fake, message, f"easel:left:{job.id}:0"))
            panned = await work_until(core, generator, fake, is_final_edit(pan_token))
        bigger, wider = (await core.service.list_jobs())[1], (await core.service.list_jobs())[0]
        original = Image.open(job.images[0].path)
        with Image.open(io.BytesIO(zoomed.files[0].data)) as zoomed_png, \
                Image.open(io.BytesIO(panned.files[0].data)) as panned_png:
            assert zoomed_png.size == (128, 128) and panned_png.size == (96, 64)
            assert zoomed_png.crop((32, 32, 96, 96)).tobytes() == original.convert("RGB").tobytes()
            assert panned_png.crop((32, 0, 96, 64)).tobytes() == original.convert("RGB").tobytes()
        assert bigger.params.kind is wider.params.kind is JobKind.OUTPAINT
        assert bigger.user_id == str(BOB) and bigger.params.prompt == "a castle"
    finally:
        await core.close()


async def test_buttons_work_after_a_restart(core: Core, generator, fake: FakeDiscord, settings: Settings) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", prompt="a castle --seed 11", steps=2))
        await work_until(core, generator, fake, is_final_edit(token))
    job = await only_job(core)
    message = fake.messages[_original_id(fake, callbacks(fake, token)[0])]

    # A new process: new core, new client; it has never seen the message it gets presses from.
    await core.close()
    core = await open_core(settings)
    try:
        async with running(core) as bot:
            # Info: the settings and seeds, only for the presser.
            info_token = bot.dispatch(press(fake, message, f"easel:info:{job.id}", user=BOB))
            info = await fake.wait_for(lambda r: r.method == "PATCH" and info_token in r.path)
            assert callbacks(fake, info_token)[0].json["data"]["flags"] == 64
            assert "image 1: 11" in info.content and "a castle" in info.content

            # Re-roll: a new job with the same settings and another seed, shown in a new message.
            reroll_token = bot.dispatch(press(fake, message, f"easel:reroll:{job.id}"))
            rerolled = await work_until(core, generator, fake, is_final_edit(reroll_token))
            jobs = await core.service.list_jobs()
            new = jobs[0]
            assert new.id != job.id and new.params.prompt == "a castle" and new.params.steps == 2
            assert new.seeds != job.seeds and rerolled.files[0].name == f"{new.id}-1-seed{new.seeds[0]}.png"

            # Variations and Upscale: img2img from the first image; the upscale at twice the size.
            vary_token = bot.dispatch(press(fake, message, f"easel:vary:{job.id}:0"))
            await work_until(core, generator, fake, is_final_edit(vary_token))
            upscale_token = bot.dispatch(press(fake, message, f"easel:upscale:{job.id}:0"))
            upscaled = await work_until(core, generator, fake, is_final_edit(upscale_token))
            varied, bigger = (await core.service.list_jobs())[1], (await core.service.list_jobs())[0]
            assert varied.params.kind is JobKind.EDIT and varied.init_image_sha is not None
            assert (bigger.params.width, bigger.params.height) == (128, 128)
            with Image.open(io.BytesIO(upscaled.files[0].data)) as png:
                assert png.size == (128, 128)

            # Delete: refused to someone else, done for a moderator.
            refused_token = bot.dispatch(press(fake, message, f"easel:delete:{job.id}", user=BOB))
            refusal = await fake.wait_for(lambda r: r.method == "POST" and r.path == webhook_path(refused_token))
            assert "only the owner" in refusal.content and refusal.json["flags"] == 64
            assert int(message["id"]) in fake.messages
            mod_token = bot.dispatch(press(fake, message, f"easel:delete:{job.id}", user=BOB,
                                           permissions=MANAGE_MESSAGES))
            await fake.wait_for(lambda r: r.method == "DELETE" and mod_token in r.path and r.status == 204)
            assert int(message["id"]) not in fake.messages
    finally:
        await core.close()


# -- attachments ---------------------------------------------------------------------------------------


async def test_edit_downloads_the_attachment_and_runs_img2img(core: Core, generator, fake: FakeDiscord) -> None:
    photo = fake.add_attachment("photo.png", png_bytes(96, 64, (20, 40, 220)))
    async with running(core) as bot:
        token = bot.dispatch(slash("edit", image=photo, prompt="make it winter", strength=0.6, steps=2))
        await work_until(core, generator, fake, is_final_edit(token))
    job = await only_job(core)
    assert fake.downloads == ["photo.png"]
    assert job.params.kind is JobKind.EDIT and job.params.strength == 0.6
    assert job.params.width > job.params.height  # the photo's shape is kept


async def test_outpaint_paints_around_the_attachment(core: Core, generator, fake: FakeDiscord) -> None:
    photo = fake.add_attachment("photo.png", png_bytes(64, 64, (20, 40, 220)))
    async with running(core) as bot:
        token = bot.dispatch(slash("outpaint", image=photo, prompt="a lake", left=32, steps=2))
        await work_until(core, generator, fake, is_final_edit(token))
    job = await only_job(core)
    assert job.params.kind is JobKind.OUTPAINT and (job.params.width, job.params.height) == (96, 64)
    with Image.open(job.images[0].path) as result:
        assert result.getpixel((80, 30)) == (20, 40, 220)  # the picture, kept, right of the new border


async def test_animate_posts_the_clip_beside_its_poster(core: Core, generator, fake: FakeDiscord) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("animate", prompt="a cat", frames=3, steps=4, pan="2,0"))
        final = await work_until(core, generator, fake, is_final_edit(token))
    job = await only_job(core)
    assert job.params.kind is JobKind.ANIMATE and job.params.motion.pan == (2.0, 0.0)
    assert [f.name for f in final.files] == [f"{job.id}-1-seed{job.seeds[0]}.mp4", f"{job.id}-1-seed{job.seeds[0]}.png"]
    with av.open(io.BytesIO(final.files[0].data)) as clip:
        assert len(list(clip.decode(video=0))) == 3


@pytest.mark.parametrize(("attachment", "expected"), [
    (dict(name="huge.png", data=png_bytes(), size=30 * 1024 * 1024), "the image is 30.0 MB; the limit is 20.0 MB"),
    (dict(name="notes.txt", data=b"hello", content_type="text/plain"), "not a picture"),
])
async def test_attachments_too_large_or_not_pictures_are_refused_before_download(
        core: Core, fake: FakeDiscord, attachment: dict[str, Any], expected: str) -> None:
    image = fake.add_attachment(**attachment)
    async with running(core) as bot:
        token = bot.dispatch(slash("edit", image=image, prompt="winter"))
        answer = await fake.wait_for(lambda r: r.path.endswith(f"/{token}/callback"))
    assert expected in answer.json["data"]["content"] and answer.json["data"]["flags"] == 64
    assert fake.downloads == [] and await core.service.list_jobs() == []


async def test_teach_takes_its_pictures_as_attachment_options_and_queues_a_training(
        core: Core, fake: FakeDiscord) -> None:
    from tests.test_teach import teaching_pictures

    pictures = [fake.add_attachment(f"{index}.png", picture.data) for index, picture in enumerate(teaching_pictures(3))]
    async with running(core) as bot:
        token = bot.dispatch(slash("teach", word="zorb", picture1=pictures[0], picture2=pictures[1],
                                   picture3=pictures[2], steps=40, caption="a zorb shape"))
        queued = await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path
                                     and "queued, position" in r.content)
        refused = bot.dispatch(slash("teach", word="no way", picture1=pictures[0], picture2=pictures[1],
                                     picture3=pictures[2]))
        refusal = await fake.wait_for(lambda r: r.path.endswith(f"/{refused}/callback"))
    job = await only_job(core)
    training = await core.queue.training(job.id)
    assert fake.downloads == ["0.png", "1.png", "2.png"] and training.steps == 40
    assert [caption for _, caption in training.pictures] == ["a zorb shape"] * 3
    assert job.id in queued.content
    assert "a trained word's name is 1 to 32 letters" in refusal.json["data"]["content"]


async def test_a_damaged_picture_is_refused_after_download(core: Core, fake: FakeDiscord) -> None:
    image = fake.add_attachment("cut.png", png_bytes()[:60])
    async with running(core) as bot:
        token = bot.dispatch(slash("edit", image=image, prompt="winter"))
        answer = await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path)
    assert "damaged or incomplete" in answer.content and fake.downloads == ["cut.png"]
    assert await core.service.list_jobs() == []


async def test_results_larger_than_the_upload_limit_go_as_jpeg_in_several_messages(
        core: Core, generator, fake: FakeDiscord) -> None:
    async with running(core) as bot:
        # A limit under one PNG of the tiny model (noise, about 12 kB) and two JPEGs (about 3 kB each),
        # above one JPEG.
        token = bot.dispatch(slash("imagine", prompt="noise --seed 1", steps=2, count=2, upload_limit=5000))
        first = await work_until(core, generator, fake, is_final_edit(token))
        second = await fake.wait_for(lambda r: r.method == "POST" and r.path == webhook_path(token))
    assert [f.name.endswith(".jpg") for f in first.files + second.files] == [True, True]
    assert "JPEG" in first.content and "Part 1 of 2" in first.content and "Part 2 of 2" in second.content
    for sent in first.files + second.files:
        assert len(sent.data) <= 5000
        with Image.open(io.BytesIO(sent.data)) as picture:
            assert picture.format == "JPEG"


def test_packing_keeps_pngs_when_they_fit_and_splits_when_they_do_not(core: Core) -> None:
    from bot.delivery import ShownImage

    rng = np.random.default_rng(0)
    pngs = []
    for index in range(3):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append((ShownImage(index, 10 + index, "0" * 64, "", 64, 64), buffer.getvalue()))
    job = type("J", (), {"id": "abc"})()
    assert pack_results(job, pngs, 10**6).messages[0][0].name == "abc-1-seed10.png"
    packed = pack_results(job, pngs, 5000)
    assert [len(group) for group in packed.messages] == [1, 1, 1] and "JPEG" in packed.note
    assert "did not fit" in pack_results(job, pngs, 300).note


# -- who and where -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("permissions", "nsfw", "policy", "moderator", "nsfw_allowed"), [
    (0, False, "nsfw_channels", False, False),
    (MANAGE_MESSAGES, True, "nsfw_channels", True, True),
    (0, True, "never", False, False),
])
async def test_requester_carries_moderator_and_nsfw_channel_for_the_policy(
        core: Core, fake: FakeDiscord, permissions: int, nsfw: bool, policy: str, moderator: bool,
        nsfw_allowed: bool) -> None:
    core.settings.discord.nsfw = policy
    async with running(core) as bot:
        payload = slash("quota", permissions=permissions, nsfw=nsfw)
        interaction = discord.Interaction(data=payload, state=bot.adapter.client._connection)
        requester = bot.adapter.cog.requester(interaction)
    assert (requester.is_platform_moderator, requester.nsfw_allowed_here) == (moderator, nsfw_allowed)
    assert requester.user_id == str(ALICE)


async def test_quota_job_and_cancel_answer_only_the_user(core: Core, fake: FakeDiscord) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", prompt="a cat", steps=2, count=2))
        await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path and "queued" in (r.content or ""))
        job = await only_job(core)
        answers = {}
        for name, options in (("quota", {}), ("job", {"id": job.id}), ("cancel", {}), ("cancel", {})):
            other = bot.dispatch(slash(name, **options))
            answers.setdefault(name, []).append(
                (await fake.wait_for(lambda r, t=other: r.method == "PATCH" and t in r.path)).content)
            assert callbacks(fake, other)[0].json["data"]["flags"] == 64
        cancelled = await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path
                                        and "was cancelled" in (r.content or ""))
    assert "left today" in answers["quota"][0]  # bot/policy.py's words, as on every platform
    assert f"Job `{job.id}`" in answers["job"][0] and "a cat" in answers["job"][0]
    assert answers["cancel"] == [f"Job `{job.id}` cancelled.", "⚠️ You have no queued or running job to cancel"]
    assert cancelled.status == 200


async def test_jobs_lists_the_users_own_recent_jobs_newest_first(core: Core, fake: FakeDiscord) -> None:
    async with running(core) as bot:
        for user, prompt in ((ALICE, "a red fox"), (BOB, "bob's owl"), (ALICE, "a blue whale")):
            token = bot.dispatch(slash("imagine", user=user, prompt=prompt, steps=2))
            await fake.wait_for(lambda r, t=token: r.method == "PATCH" and t in r.path
                                and "queued" in (r.content or ""))
        token = bot.dispatch(slash("jobs"))
        listing = (await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path)).content
        assert callbacks(fake, token)[0].json["data"]["flags"] == 64  # only Alice sees it
    lines = listing.splitlines()
    assert lines[0].startswith("**Your 2 most recent job(s)**, newest first")
    assert "queued · imagine · a blue whale" in lines[1] and lines[2].endswith("a red fox") and len(lines) == 3


async def test_help_comes_whole_in_as_many_messages_as_it_needs(core: Core, fake: FakeDiscord) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("help"))
        first = await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path)
        last_line = core.parser.help_text().splitlines()[-1]
        await fake.wait_for(lambda r: r.method == "POST" and r.path.endswith(token)
                            and r.json["content"].removesuffix("\n```").endswith(last_line))
        rest = [r for r in fake.requests if r.method == "POST" and r.path.endswith(token)]
    parts = [first.content, *(r.json["content"] for r in rest)]
    assert "\n".join(part.removeprefix("```\n").removesuffix("\n```") for part in parts) == core.parser.help_text()
    assert all(len(part) <= 2000 for part in parts) and all(r.json["flags"] == 64 for r in rest)


# -- command registration ------------------------------------------------------------------------------


async def test_discord_sync_registers_the_commands_in_one_guild(core: Core, fake: FakeDiscord, capsys) -> None:
    from adapters.cli import COMMANDS

    args = build_parser().parse_args(["discord", "sync", "--guild", str(GUILD_ID)])
    assert await COMMANDS["discord"](core, args) == 0
    put = await fake.wait_for(lambda r: r.method == "PUT")
    assert put.path == f"/applications/{APPLICATION_ID}/guilds/{GUILD_ID}/commands"
    commands = {command["name"]: command for command in put.json}
    assert set(commands) == {"imagine", "edit", "inpaint", "outpaint", "animate", "quota", "job", "jobs", "cancel",
                             "help", "models", "styles", "loras", "teach"}
    imagine = {option["name"]: option for option in commands["imagine"]["options"]}
    assert imagine["prompt"]["required"] and imagine["model"]["autocomplete"] and imagine["seed"]["type"] == INTEGER
    assert "image" in {option["name"] for option in commands["inpaint"]["options"]}
    printed = capsys.readouterr().out
    assert "image" in {option["name"] for option in commands["outpaint"]["options"]}
    assert not {option["name"]: option for option in commands["outpaint"]["options"]}["prompt"]["required"]
    assert "registered 14 commands in server" in printed and BOT_TOKEN not in printed


def _original_id(fake: FakeDiscord, callback: Request) -> int:
    return fake.original_message_id(callback.path.split("/")[3])


async def test_a_refused_bot_token_is_a_one_line_error_without_the_token(core: Core, fake: FakeDiscord) -> None:
    from bot.errors import ConfigError

    fake.fail_next("GET", "/users/@me", 401, code=0, message="401: Unauthorized")
    with pytest.raises(ConfigError) as refused:
        await DiscordAdapter(core, gateway=False).sync_commands()
    assert "Discord refused the bot token" in refused.value.message and BOT_TOKEN not in refused.value.message
    assert not fake.find("PUT")


# -- flagged images, and one user's rate limit ------------------------------------------------------


async def test_a_withheld_image_is_never_uploaded_and_gets_no_follow_up_buttons(
        core: Core, generator, fake: FakeDiscord, flag_all_checker) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", prompt="a statue --seed 7", steps=2))
        final = await work_until(core, generator, fake, lambda r: r.method == "PATCH" and token in r.path
                                 and "withheld" in (r.content or ""), checker=flag_all_checker)
        job = await only_job(core)
    assert final.files == [] and not any(r.files for r in fake.requests)
    assert "Image 1 was withheld" in final.content and f"/appeal {job.id}" in final.content
    assert not any(":vary:" in i or ":upscale:" in i for i in final.custom_ids)
    assert f"easel:reroll:{job.id}" in final.custom_ids


async def test_a_flagged_image_goes_behind_a_spoiler_in_an_nsfw_channel(
        core: Core, generator, fake: FakeDiscord, flag_all_checker) -> None:
    async with running(core) as bot:
        token = bot.dispatch(slash("imagine", prompt="a statue --seed 7", steps=2, nsfw=True))
        final = await work_until(core, generator, fake, is_final_edit(token), checker=flag_all_checker)
        job = await only_job(core)
    assert [f.name for f in final.files] == [f"SPOILER_{job.id}-1-seed7.png"]
    assert final.files[0].data == Path(job.images[0].path).read_bytes()


async def test_one_users_rate_limited_edits_never_hold_up_another_users_result(
        core: Core, generator, fake: FakeDiscord) -> None:
    """Alice's message answers 429 with retry_after 3 s to every edit; Bob's result still arrives first."""
    async with running(core) as bot:
        fake.fail_next("PATCH", "", 429, times=3, retry_after=3, when=lambda r: alice in r.path)
        alice = bot.dispatch(slash("imagine", prompt="a red fox --seed 1", steps=2))
        # Alice's job is queued and her first edit (its position) is being held up before Bob asks.
        await fake.wait_for(lambda r: alice in r.path and r.status == 429)
        bob = bot.dispatch(slash("imagine", prompt="a blue bird --seed 2", steps=2, user=BOB))
        bob_result = await work_until(core, generator, fake, is_final_edit(bob))
        alice_result = await work_until(core, generator, fake, is_final_edit(alice))
    order = {id(request): number for number, request in enumerate(fake.requests)}
    limited = [order[id(r)] for r in fake.requests if webhook_path(alice) in r.path and r.status == 429]
    # Alice was held up (three 429s, 3 s apart) while Bob's whole job ran and his result was shown:
    # it arrived before Alice's last 429, not after her wait.
    assert len(limited) == 3 and limited[0] < order[id(bob_result)] < limited[-1] < order[id(alice_result)]


# -- inside another bot: the extension ------------------------------------------------------------------

EASEL_COMMANDS = {"imagine", "edit", "inpaint", "outpaint", "animate", "quota", "job", "jobs", "cancel", "help",
                  "models", "styles", "loras", "teach"}


def host_bot(core: Core | None = None) -> commands.Bot:
    """A server owner's own bot with its own slash command, loading Easel as the README shows."""

    class MyBot(commands.Bot):
        async def setup_hook(self) -> None:
            await self.load_extension("adapters.discord_plugin")

    bot = MyBot(command_prefix="!", intents=discord.Intents.default())
    if core is not None:
        bot.easel_core = core  # type: ignore[attr-defined]

    @bot.tree.command(description="Is the bot alive?")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    return bot


def dispatch(bot: commands.Bot, payload: dict[str, Any]) -> str:
    bot._connection.parsers["INTERACTION_CREATE"](payload)
    return payload["token"]


async def test_as_an_extension_of_another_bot_easel_and_the_hosts_own_command_both_answer(
        core: Core, generator, fake: FakeDiscord) -> None:
    bot = host_bot(core)
    async with bot:
        await bot.login(BOT_TOKEN)  # runs setup_hook: Easel is loaded, following job events
        assert {command.name for command in bot.tree.get_commands()} == EASEL_COMMANDS | {"ping"}
        ping = dispatch(bot, slash("ping"))
        pong = await fake.wait_for(lambda r: r.path.endswith(f"/{ping}/callback"))
        imagine = dispatch(bot, slash("imagine", prompt="a lighthouse --seed 4", steps=2))
        final = await work_until(core, generator, fake, is_final_edit(imagine))
        job = await only_job(core)
        # The result's buttons are answered through the host bot as well.
        message = fake.messages[_original_id(fake, callbacks(fake, imagine)[0])]
        info = dispatch(bot, press(fake, message, f"easel:info:{job.id}"))
        info_answer = await fake.wait_for(lambda r: r.method == "PATCH" and info in r.path)

        await bot.unload_extension("adapters.discord_plugin")
        assert [command.name for command in bot.tree.get_commands()] == ["ping"]
        ping_again = dispatch(bot, slash("ping"))
        pong_again = await fake.wait_for(lambda r: r.path.endswith(f"/{ping_again}/callback"))
    assert pong.json["data"]["content"] == pong_again.json["data"]["content"] == "pong"
    assert [f.name for f in final.files] == [f"{job.id}-1-seed4.png"]
    assert f"easel:reroll:{job.id}" in final.custom_ids
    assert "image 1: 4" in info_answer.content
    assert (await core.service.get_job(job.id)).delivered_at is not None  # the host's core is still open


async def test_the_extension_opens_easels_own_configuration_when_the_bot_brings_no_core(
        core: Core, fake: FakeDiscord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "easel.toml"
    config.write_text(f'[storage]\ndata_dir = "{core.settings.storage.data_dir}"\n'
                      f'models_dir = "{core.settings.storage.model_cache}"\n')
    monkeypatch.setenv("EASEL_CONFIG", str(config))
    async with running(core) as standalone:  # a job made through Easel's own bot, in the same data folder
        token = standalone.dispatch(slash("imagine", prompt="a red fox", steps=2))
        await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path and "queued" in (r.content or ""))
    job = await only_job(core)
    bot = host_bot()
    async with bot:
        await bot.login(BOT_TOKEN)
        token = dispatch(bot, slash("job", id=job.id))
        answer = await fake.wait_for(lambda r: r.method == "PATCH" and token in r.path)
    assert f"Job `{job.id}`" in answer.content and "a red fox" in answer.content


# -- prompt syntax: /styles, the style option, permutation prompts ------------------------------------------


async def test_styles_are_listed_and_a_permutations_other_jobs_post_their_own_results(
        core: Core, generator, fake: FakeDiscord) -> None:
    core.settings.storage.styles_path.write_text("name,prompt,negative_prompt\nnight,{prompt} at night,day\n",
                                                 encoding="utf-8")
    async with running(core) as bot:
        listed = bot.dispatch(slash("styles"))
        listing = (await fake.wait_for(lambda r: r.method == "PATCH" and listed in r.path)).content
        token = bot.dispatch(slash("imagine", prompt="a {red, green} fox --seed 5", steps=2, style="night"))
        follow_up = await work_until(core, generator, fake, lambda r: r.method == "POST" and bool(r.files)
                                     and r.path.startswith(webhook_path(token)))
        edited = await fake.wait_for(is_final_edit(token))
    assert callbacks(fake, listed)[0].json["data"]["flags"] == 64  # only the user sees the list
    assert "night: {prompt} at night  (not: day)" in listing
    first, second = sorted(await core.service.list_jobs(), key=lambda job: job.params.seed or 0)
    assert (first.params.prompt, second.params.prompt) == ("a red fox at night", "a green fox at night")
    assert [f.name for f in edited.files] == [f"{first.id}-1-seed5.png"]  # the first job edits the response
    assert [f.name for f in follow_up.files] == [f"{second.id}-1-seed6.png"]  # the other posts its own
