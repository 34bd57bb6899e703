"""The Telegram adapter end to end: the real python-telegram-bot Application, long polling a fake Bot
API server on 127.0.0.1 (tests/fake_telegram.py), the real job service on SQLite and the real
builtin:tiny worker. Assertions read what each chat shows: the bot's messages, photos, files and
buttons."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from adapters.telegram import TelegramAdapter
from adapters.telegram_render import TELEGRAM_HELP, parse_callback
from bot.bootstrap import Core
from bot.config import TelegramConfig
from bot.domain import JobKind, JobStatus, Requester
from generation.worker import Worker
from tests.conftest import mask_bytes, png_bytes
from tests.fake_telegram import TOKEN, BotMessage, FakeTelegram

ALICE = 7001
BOB = 7002
GROUP = -100500


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(admins={GROUP: [BOB]}) as server:
        yield server


def telegram_config(fake: FakeTelegram, **settings: Any) -> TelegramConfig:
    """Settings that talk to the fake server at a pace that keeps the tests quick."""
    return TelegramConfig(token=TOKEN, base_url=fake.base_url, base_file_url=fake.base_file_url,
                          private_interval_s=0.02, group_interval_s=0.02, album_wait_s=0.3, poll_timeout_s=2,
                          allowed_chats=[GROUP], **settings)


@pytest.fixture
def tg(core: Core, fake: FakeTelegram) -> Core:
    """The core, configured to talk to the fake server."""
    core.settings.telegram = telegram_config(fake)
    return core


@contextlib.asynccontextmanager
async def running_bot(core: Core, fake: FakeTelegram) -> AsyncIterator[TelegramAdapter]:
    adapter = TelegramAdapter(core)
    stop = asyncio.Event()
    polls = len(fake.calls_of("getUpdates"))
    task = asyncio.create_task(adapter.run(stop))
    await fake.wait_for(lambda: task.done() or len(fake.calls_of("getUpdates")) > polls, what="polling")
    try:
        yield adapter
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def running_worker(core: Core, generator) -> AsyncIterator[None]:
    """The real worker, draining the queue in burst mode again and again until the block ends."""
    stop = asyncio.Event()

    async def serve() -> None:
        while not stop.is_set():
            await Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1").run(burst=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    task = asyncio.create_task(serve())
    try:
        yield
    finally:
        stop.set()
        await task


def replies_to(fake: FakeTelegram, chat: int, message: dict) -> list[BotMessage]:
    return [m for m in fake.chat(chat) if m.reply_to == message["message_id"]]


def photos(fake: FakeTelegram, chat: int) -> list[BotMessage]:
    return [m for m in fake.chat(chat) if m.photo is not None]


async def delivered(core: Core, job_id: str) -> bool:
    return (await core.service.get_job(job_id)).delivered_at is not None


def rgba_png_with_transparent_left_half(width: int = 64, height: int = 64) -> bytes:
    picture = Image.new("RGBA", (width, height), (30, 160, 60, 255))
    picture.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def white_columns(png: bytes) -> tuple[float, float]:
    """Mean of the left and right quarter of a mask: 255 = repaint, 0 = keep."""
    mask = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    quarter = mask.shape[1] // 4
    return float(mask[:, :quarter].mean()), float(mask[:, -quarter:].mean())


# -- /imagine ----------------------------------------------------------------------------------------


async def test_imagine_shows_position_then_an_album_with_seeds_and_buttons(tg: Core, fake: FakeTelegram,
                                                                          generator) -> None:
    async with running_bot(tg, fake):
        command = fake.send(fake.private(ALICE), "/imagine a lighthouse at dusk --seed 42 --steps 3 --n 2")
        status = (await fake.wait_for(lambda: [m for m in replies_to(fake, ALICE, command)
                                                if "Queued (position 1)" in m.shown], what="queued"))[0]
        job = (await tg.service.list_jobs())[0]
        assert f"job {job.id}" in status.shown and f"/cancel {job.id}" in status.shown
        async with running_worker(tg, generator):
            await fake.wait_for(lambda: len(photos(fake, ALICE)) == 2 and status.text.startswith("✅"),
                                what="album")
            await fake.wait_for(lambda: delivered(tg, job.id), what="marked delivered")
        album = photos(fake, ALICE)
        job = await tg.service.get_job(job.id)
    assert status.text == f"✅ Done · job {job.id} · 2 images below"
    assert album[0].media_group_id == album[1].media_group_id is not None
    assert album[0].reply_to == command["message_id"]
    assert "a lighthouse at dusk" in album[0].caption and "seed 42" in album[0].caption
    assert "seed 43" in album[1].caption
    assert [m.photo for m in album] == [tg.store.read_bytes(image.sha256) for image in job.images]
    summary = fake.chat(ALICE)[-1]
    assert "seeds 42, 43" in summary.shown and summary.reply_to == album[0].message_id
    labels = [button["text"] for row in summary.buttons for button in row]
    assert labels == ["🎲 Re-roll", "ℹ️ Info", "🔀 V1", "🔀 V2", "⬆️ U1", "⬆️ U2"]
    for row in summary.buttons:
        for button in row:
            assert len(button["callback_data"].encode()) <= 64
            assert parse_callback(button["callback_data"]).job_id == job.id
    assert job.delivered_at is not None


TELEGRAM_HELP_END = TELEGRAM_HELP.splitlines()[-1]  # the last line of /help on Telegram


async def test_other_commands_answer_in_one_message_each(tg: Core, fake: FakeTelegram) -> None:
    chat = fake.private(ALICE)
    async with running_bot(tg, fake):
        quota = fake.send(chat, "/quota")
        helps = fake.send(chat, "/help")
        typo = fake.send(chat, "/imagine a cat --sed 4")
        await fake.wait_for(lambda: all(replies_to(fake, ALICE, m) for m in (quota, helps, typo)) and any(
            m.shown.endswith(TELEGRAM_HELP_END) for m in replies_to(fake, ALICE, helps)), what="answers")
        command = fake.send(chat, "/imagine a red fox --steps 2")
        status = (await fake.wait_for(lambda: [m for m in replies_to(fake, ALICE, command)
                                                if "Queued" in m.shown], what="queued"))[0]
        job = (await tg.service.list_jobs())[0]
        about = fake.send(chat, f"/job {job.id}")
        cancel = fake.send(chat, "/cancel")
        await fake.wait_for(lambda: replies_to(fake, ALICE, about) and replies_to(fake, ALICE, cancel), what="job")
        await fake.wait_for(lambda: status.text == f"🚫 Job {job.id} was cancelled.", what="cancelled status")
        mine = fake.send(chat, "/jobs")
        await fake.wait_for(lambda: replies_to(fake, ALICE, mine), what="/jobs")
    [jobs_answer] = replies_to(fake, ALICE, mine)
    assert jobs_answer.shown.splitlines()[1] == f"{job.id} · cancelled · imagine · a red fox"
    [quota_answer] = replies_to(fake, ALICE, quota)
    assert quota_answer.shown.startswith("Quota (user tier): 50 of 50 units left today")
    # /help is longer than one Telegram message (4096 characters): it comes whole, in parts split between lines.
    help_parts = [answer.shown for answer in replies_to(fake, ALICE, helps)]
    help_answer = "\n".join(help_parts)
    assert all(len(part) <= 4096 and not part.endswith("…") for part in help_parts)
    assert "/inpaint" in help_answer and "album" in help_answer and "Examples:" in help_answer
    assert help_answer.startswith("Commands:") and help_answer.endswith(TELEGRAM_HELP_END)
    [typo_answer] = replies_to(fake, ALICE, typo)
    assert typo_answer.shown == "⚠️ unknown flag --sed (did you mean --seed?); the flags are " + \
        "--no, --seed, --steps, --cfg, --ar, --size, --n, --sampler, --model, --strength, --style, --lora"
    [about_answer] = replies_to(fake, ALICE, about)
    assert about_answer.shown.startswith(f"Job {job.id}: queued\nimagine: a red fox")
    [cancel_answer] = replies_to(fake, ALICE, cancel)
    assert cancel_answer.shown == f"🚫 Job {job.id} cancelled."
    assert (await tg.service.get_job(job.id)).status is JobStatus.CANCELLED


# -- /edit and /inpaint ----------------------------------------------------------------------------


async def test_edit_from_a_captioned_photo_and_from_a_reply_to_a_file(tg: Core, fake: FakeTelegram,
                                                                     generator) -> None:
    chat = fake.private(ALICE)
    async with running_bot(tg, fake), running_worker(tg, generator):
        fake.send(chat, photo=png_bytes(96, 64, (20, 40, 220)), caption="/edit make it winter --steps 2 --seed 1")
        await fake.wait_for(lambda: len(photos(fake, ALICE)) == 1, what="first edit")
        holder = fake.send(chat, document=png_bytes(64, 96, (200, 200, 20)), filename="tall.png")
        fake.send(chat, "/edit the same at night --steps 2 --strength 0.5", reply_to=holder)
        await fake.wait_for(lambda: len(photos(fake, ALICE)) == 2, what="second edit")
    second, first = await tg.service.list_jobs()
    assert first.params.kind is second.params.kind is JobKind.EDIT
    # The largest photo size was used (the thumbnail is not even a picture), with its aspect ratio kept.
    assert first.params.width > first.params.height and second.params.width < second.params.height
    assert second.params.strength == 0.5
    assert "make it winter" in photos(fake, ALICE)[0].caption and "seed 1 " in photos(fake, ALICE)[0].caption


async def test_outpaint_from_a_reply_to_a_file_paints_around_it(tg: Core, fake: FakeTelegram, generator) -> None:
    chat = fake.private(ALICE)
    async with running_bot(tg, fake), running_worker(tg, generator):
        holder = fake.send(chat, document=png_bytes(64, 64, (200, 200, 20)), filename="square.png")
        fake.send(chat, "/outpaint a field --down 32 --steps 2", reply_to=holder)
        await fake.wait_for(lambda: len(photos(fake, ALICE)) == 1, what="the outpainted picture")
    [job] = await tg.service.list_jobs()
    assert job.params.kind is JobKind.OUTPAINT and (job.params.width, job.params.height) == (64, 96)


async def test_inpaint_takes_the_mask_from_the_second_picture_of_an_album(tg: Core, fake: FakeTelegram,
                                                                         generator) -> None:
    chat = fake.private(ALICE)
    async with running_bot(tg, fake), running_worker(tg, generator):
        first = fake.send(chat, photo=png_bytes(64, 64, (30, 160, 60)), caption="/inpaint a red door --steps 2",
                          media_group_id="album-1")
        fake.send(chat, photo=mask_bytes(64, 64), media_group_id="album-1")  # no caption: the album's 2nd item
        await fake.wait_for(lambda: photos(fake, ALICE), what="inpainted photo")
        [job] = await tg.service.list_jobs()
    assert job.params.kind is JobKind.INPAINT and job.status is JobStatus.SUCCEEDED
    left, right = white_columns(tg.store.read_bytes(job.mask_image_sha))
    assert left == 255 and right == 0  # the mask's white left half is what gets repainted
    assert photos(fake, ALICE)[0].reply_to == first["message_id"]


async def test_inpaint_reads_the_mask_from_transparency_or_a_replied_to_picture(tg: Core,
                                                                                fake: FakeTelegram) -> None:
    chat = fake.private(ALICE)
    async with running_bot(tg, fake):
        transparent = fake.send(chat, document=rgba_png_with_transparent_left_half(), caption="/inpaint a pond")
        mask = fake.send(chat, photo=mask_bytes(64, 64))
        replying = fake.send(chat, photo=png_bytes(64, 64), caption="/inpaint a door", reply_to=mask)
        opaque = fake.send(chat, photo=png_bytes(64, 64), caption="/inpaint a window")
        await fake.wait_for(lambda: all(replies_to(fake, ALICE, m) for m in (transparent, replying, opaque)) and
                            len([m for m in fake.chat(ALICE) if "Queued" in m.shown]) == 2, what="answers")
    by_prompt = {job.params.prompt: job for job in await tg.service.list_jobs()}
    assert set(by_prompt) == {"a pond", "a door"}  # the opaque picture without a mask queued nothing
    for prompt in ("a pond", "a door"):
        left, right = white_columns(tg.store.read_bytes(by_prompt[prompt].mask_image_sha))
        assert left == 255 and right == 0, prompt
    [refusal] = replies_to(fake, ALICE, opaque)
    assert refusal.shown.startswith("⚠️ /inpaint needs a mask") and "album" in refusal.shown


# -- buttons -----------------------------------------------------------------------------------------


async def test_buttons_reroll_upscale_and_info_answer_under_the_result(tg: Core, fake: FakeTelegram,
                                                                      generator) -> None:
    chat = fake.private(ALICE)
    async with running_bot(tg, fake), running_worker(tg, generator):
        fake.send(chat, "/imagine a blue bird --steps 3 --seed 5")  # upscale: 3 x 0.35 > 1 step
        result = (await fake.wait_for(lambda: photos(fake, ALICE), what="first result"))[0]
        [original] = await tg.service.list_jobs()
        fake.press(chat, result, result.button("🎲 Re-roll"))
        await fake.wait_for(lambda: len(photos(fake, ALICE)) == 2, what="re-roll result")
        fake.press(chat, result, result.button("⬆️ Upscale"))
        await fake.wait_for(lambda: len(photos(fake, ALICE)) == 3, what="upscaled result")
        fake.press(chat, result, result.button("ℹ️ Info"))
        info = (await fake.wait_for(lambda: [m for m in fake.chat(ALICE) if m.shown.startswith("Job ")],
                                    what="info"))[0]
    upscaled, rerolled, _ = await tg.service.list_jobs()
    assert rerolled.params.prompt == original.params.prompt and rerolled.params.seed != original.params.seed
    assert (rerolled.params.steps, rerolled.params.width) == (original.params.steps, original.params.width)
    assert upscaled.params.kind is JobKind.EDIT
    assert (upscaled.params.width, upscaled.params.height) == (128, 128)
    for job in (rerolled, upscaled):
        [status] = [m for m in fake.chat(ALICE) if f"job {job.id}" in m.shown and m.text is not None]
        assert status.reply_to == result.message_id and status.text.startswith("✅ Done")
    assert info.reply_to == result.message_id
    assert info.shown.startswith(f"Job {original.id}: succeeded") and "seed 5" in info.shown
    answered = [call.params.get("text") for call in fake.calls_of("answerCallbackQuery")]
    assert len(answered) == 3  # every press is answered, so the client stops its spinner


async def test_zoom_out_and_pan_buttons_under_one_picture_work_from_a_restarted_bot(tg: Core, fake: FakeTelegram,
                                                                                    generator) -> None:
    chat = fake.private(ALICE)
    async with running_bot(tg, fake), running_worker(tg, generator):
        fake.send(chat, "/imagine a blue bird --steps 2 --seed 5")
        result = (await fake.wait_for(lambda: photos(fake, ALICE), what="first result"))[0]
    labels = [button["text"] for row in result.buttons for button in row]
    assert labels[-6:] == ["🔭 Zoom out 1.5x", "🔭 Zoom out 2x", "⬅️", "⬆️", "➡️", "⬇️"]
    async with running_bot(tg, fake), running_worker(tg, generator):  # a new adapter: it never saw the result
        fake.press(chat, result, result.button("🔭 Zoom out 2x"))
        await fake.wait_for(lambda: len(photos(fake, ALICE)) == 2, what="zoomed out")
        fake.press(chat, result, result.button("⬇️"))
        await fake.wait_for(lambda: len(photos(fake, ALICE)) == 3, what="panned down")
    panned, zoomed, original = await tg.service.list_jobs()
    assert zoomed.params.kind is panned.params.kind is JobKind.OUTPAINT
    assert (zoomed.params.width, zoomed.params.height) == (128, 128)
    assert (panned.params.width, panned.params.height) == (64, 96)
    assert zoomed.params.prompt == original.params.prompt == "a blue bird"
    answered = [call.params.get("text") for call in fake.calls_of("answerCallbackQuery")]
    assert answered == [f"Zoom out 2x of job {original.id}…", f"Pan down of job {original.id}…"]


async def test_animate_sends_the_clip_as_an_animation_with_the_buttons(tg: Core, fake: FakeTelegram,
                                                                       generator) -> None:
    chat = fake.private(ALICE)
    async with running_bot(tg, fake), running_worker(tg, generator):
        fake.send(chat, "/animate a cat --frames 3 --steps 4 --zoom 1.1")
        [clip] = await fake.wait_for(lambda: [m for m in fake.chat(ALICE) if m.animation], what="the clip")
    [job] = await tg.service.list_jobs()
    assert job.params.kind is JobKind.ANIMATE and "a cat" in clip.caption
    with av.open(io.BytesIO(clip.animation)) as container:
        assert len(list(container.decode(video=0))) == 3
    assert clip.button("🎲 Re-roll")["callback_data"] == f"r:{job.id}"


# -- flood control, restarts, duplicates -------------------------------------------------------------


async def test_flood_control_waits_as_told_and_network_errors_are_retried(tg: Core, fake: FakeTelegram,
                                                                         generator) -> None:
    tg.settings.telegram.private_interval_s = 0.2
    fake.fail_next("editMessageText", 429, retry_after=1)
    fake.fail_next("sendPhoto", 502, times=2)
    chat = fake.private(ALICE)
    async with running_bot(tg, fake), running_worker(tg, generator):
        fake.send(chat, "/imagine a windmill --steps 4")
        await fake.wait_for(lambda: photos(fake, ALICE), what="photo despite errors")
        [job] = await tg.service.list_jobs()
        await fake.wait_for(lambda: delivered(tg, job.id), what="marked delivered")
    to_chat = [call for call in fake.calls if call.params.get("chat_id") == ALICE]
    [flooded] = [i for i, call in enumerate(to_chat) if call.status == 429]
    # Nothing went to the chat until the second Telegram asked for had passed...
    assert to_chat[flooded + 1].at - to_chat[flooded].at >= 0.95
    # ...and never faster than the configured pace (0.2 s; requests take a few ms to arrive).
    assert all(later.at - earlier.at >= 0.15 for earlier, later in itertools.pairwise(to_chat))
    [status] = [m for m in fake.chat(ALICE) if m.text is not None]
    assert status.text == f"✅ Done · job {job.id} · 1 image below"
    assert [call.status for call in fake.calls_of("sendPhoto")] == [502, 502, 200]


async def test_results_missed_while_stopped_arrive_after_a_restart_and_a_redelivered_message_is_one_job(
        tg: Core, fake: FakeTelegram, generator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="easel.telegram")
    chat = fake.private(ALICE)
    async with running_bot(tg, fake):
        command = fake.send(chat, "/imagine a harbour --steps 2")
        status = (await fake.wait_for(lambda: [m for m in replies_to(fake, ALICE, command)
                                                if "Queued" in m.shown], what="queued"))[0]
    # The bot is down while the job runs.
    await Worker(tg.queue, generator, tg.store, tg.settings, worker_id="test-worker:1").run(burst=True)
    [job] = await tg.service.list_jobs()
    assert job.status is JobStatus.SUCCEEDED and job.delivered_at is None
    # Telegram was never told the command was read (say the bot was killed): it delivers it again.
    original_update = next(call for call in fake.calls_of("getUpdates")
                           if call.params.get("offset"))  # the poll that confirmed it
    again = fake.deliver({"message": command}, update_id=int(original_update.params["offset"]) - 1)
    async with running_bot(tg, fake):
        await fake.wait_for(lambda: photos(fake, ALICE), what="photo after restart")
        await fake.wait_for(lambda: delivered(tg, job.id), what="marked delivered")
        await fake.wait_for(lambda: fake.served.count(again["update_id"]) == 2, what="the command, again")
        # The bot has handled the redelivered command (and answers nothing) once it says so.
        await fake.wait_for(lambda: [r for r in caplog.records if "was delivered again" in r.getMessage()],
                            what="the redelivery recognised")
    assert status.text == f"✅ Done · job {job.id} · 1 image below"
    assert photos(fake, ALICE)[0].reply_to == command["message_id"]
    assert len(await tg.service.list_jobs()) == 1
    assert [m.message_id for m in replies_to(fake, ALICE, command)] == [status.message_id,
                                                                        photos(fake, ALICE)[0].message_id]


async def test_flood_control_in_one_chat_delays_no_other_chat(tg: Core, fake: FakeTelegram) -> None:
    fake.fail_next("sendMessage", 429, retry_after=3, chat=ALICE)
    async with running_bot(tg, fake):
        alices = fake.send(fake.private(ALICE), "/quota")
        await fake.wait_for(lambda: [c for c in fake.calls_of("sendMessage") if c.status == 429], what="the 429")
        bobs = fake.send(fake.private(BOB), "/quota")
        await fake.wait_for(lambda: replies_to(fake, BOB, bobs), what="Bob's answer")
        assert replies_to(fake, ALICE, alices) == []  # Alice's chat is still held
        await fake.wait_for(lambda: replies_to(fake, ALICE, alices), what="Alice's answer")
    flooded, to_alice = [c for c in fake.calls_of("sendMessage") if c.params["chat_id"] == ALICE]
    [to_bob] = [c for c in fake.calls_of("sendMessage") if c.params["chat_id"] == BOB]
    assert flooded.status == 429 and to_alice.at - flooded.at >= 2.95  # Alice waited as told...
    assert flooded.at < to_bob.at < to_alice.at  # ...and Bob did not wait with her


async def test_an_error_while_delivering_goes_to_the_error_hook_and_the_result_comes_after_a_restart(
        tg: Core, fake: FakeTelegram, generator, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    read_bytes, failed = tg.store.read_bytes, []

    def fails_once(sha256: str) -> bytes:
        if not failed:
            failed.append(sha256)
            raise OSError(f"cannot read image {sha256}")
        return read_bytes(sha256)

    monkeypatch.setattr(tg.store, "read_bytes", fails_once)
    async with running_bot(tg, fake), running_worker(tg, generator):
        fake.send(fake.private(ALICE), "/imagine a lantern --steps 2")
        error = await fake.wait_for(lambda: [r for r in caplog.records if r.levelno >= logging.ERROR],
                                    what="the error logged")
        [job] = await tg.service.list_jobs()
    # Logged once, by the adapter's one error hook, and the job is left undelivered.
    assert [(r.name, r.getMessage()) for r in error] == [("easel.telegram",
                                                          f"showing the done event of job {job.id} failed")]
    assert isinstance(error[0].exc_info[1], OSError)
    assert photos(fake, ALICE) == [] and not await delivered(tg, job.id)
    async with running_bot(tg, fake):  # the next start
        await fake.wait_for(lambda: photos(fake, ALICE), what="photo after restart")
        await fake.wait_for(lambda: delivered(tg, job.id), what="marked delivered")
    [status] = [m for m in fake.chat(ALICE) if m.text is not None]
    assert status.text == f"✅ Done · job {job.id} · 1 image below"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == error


async def test_a_burst_of_progress_becomes_one_edit_with_the_newest_text(fake: FakeTelegram) -> None:
    from telegram.ext import Application

    from adapters.telegram_send import ChatPacer, StatusBoard

    pacer = ChatPacer(private_interval_s=1.0, group_interval_s=1.0)
    application = (Application.builder().token(TOKEN).base_url(fake.base_url).base_file_url(fake.base_file_url)
                   .rate_limiter(pacer).build())
    async with application:
        await application.start()
        board = StatusBoard(application, pacer)
        status = await application.bot.send_message(ALICE, "⏳ Queuing…")
        board.show(ALICE, status.message_id, "step 1/50", rank=(1, 1))
        await asyncio.sleep(0.1)  # the edit is waiting for the chat's turn (a second after the message)
        for step in range(2, 51):
            board.show(ALICE, status.message_id, f"step {step}/50", rank=(1, step))
        board.show(ALICE, status.message_id, "queued", rank=(0, 0))  # older news, arriving late: dropped
        await fake.wait_for(lambda: fake.calls_of("editMessageText"), what="an edit")
        await board.settle(ALICE, status.message_id, "✅ Done")
        await application.stop()  # awaits the board's tasks
    [shown] = fake.chat(ALICE)
    assert shown.history == ["⏳ Queuing…", "step 50/50", "✅ Done"]  # the newest text when its turn came


# -- groups and concurrency --------------------------------------------------------------------------


async def test_groups_follow_the_configured_policy_and_ignore_other_bots(tg: Core, fake: FakeTelegram) -> None:
    group, stranger = fake.group(GROUP), fake.group(-100999, "Elsewhere")
    async with running_bot(tg, fake):
        other_bot = fake.send(group, "/imagine@otherbot a cat", user=ALICE)
        unknown = fake.send(group, "/start_game", user=ALICE)  # another bot's command, without @
        elsewhere = fake.send(stranger, "/imagine a cat", user=ALICE)
        for_us = fake.send(group, "/imagine@easel_test_bot a cat --steps 2", user=ALICE)
        await fake.wait_for(lambda: replies_to(fake, -100999, elsewhere) and
                            [m for m in replies_to(fake, GROUP, for_us) if "Queued" in m.shown], what="answers")
    # Answers to the later messages mean the earlier ones were fetched too, and stopping the bot handles
    # every fetched update before it returns: a wrong answer to the other bots' commands would be here now.
    assert replies_to(fake, GROUP, other_bot) == [] and replies_to(fake, GROUP, unknown) == []
    [refusal] = replies_to(fake, -100999, elsewhere)
    assert refusal.shown == ("Easel is not enabled in this chat; its operator can add chat id -100999 to "
                             "telegram.allowed_chats.")
    [job] = await tg.service.list_jobs()
    assert job.user_id == str(ALICE) and job.reply_to["chat_id"] == GROUP


async def test_a_slow_download_holds_up_no_other_chat(tg: Core, fake: FakeTelegram) -> None:
    held = asyncio.Event()
    async with running_bot(tg, fake):
        edit = fake.send(fake.private(ALICE), photo=png_bytes(), caption="/edit winter --steps 2")
        fake.slow_files[edit["photo"][-1]["file_id"]] = held  # before the bot can ask for it: no await yet
        quota = fake.send(fake.private(BOB), "/quota")
        await fake.wait_for(lambda: replies_to(fake, BOB, quota), what="Bob's answer")
        assert fake.chat(ALICE) == []  # Alice's download is still held
        held.set()
        await fake.wait_for(lambda: [m for m in fake.chat(ALICE) if "Queued" in m.shown], what="Alice's job")


async def test_a_flagged_image_is_a_spoilered_photo_in_an_nsfw_chat_and_never_a_file_or_a_photo_elsewhere(
        tg: Core, fake: FakeTelegram, generator, flag_all_checker) -> None:
    tg.settings.telegram.nsfw_chats = [ALICE]
    tg.settings.telegram.send_png_files = True

    async def flagged(chat: int) -> str:
        fake.send(fake.private(chat), "/imagine a statue --seed 5 --steps 2")
        jobs = await fake.wait_for(lambda: tg.service.list_jobs(requester=Requester("telegram", str(chat))),
                                   what="queued")
        while not (await tg.service.get_job(jobs[0].id)).status.is_final:
            await Worker(tg.queue, generator, tg.store, tg.settings, worker_id="test-worker:1",
                         image_checker=flag_all_checker).run(burst=True)
        await fake.wait_for(lambda: delivered(tg, jobs[0].id), what="marked delivered")
        return jobs[0].id

    async with running_bot(tg, fake):
        spoilered = await flagged(ALICE)
        withheld = await flagged(BOB)
    # Where NSFW is allowed: one photo behind Telegram's spoiler, and no lossless file (a document
    # cannot be spoilered).
    assert [m.has_spoiler for m in photos(fake, ALICE)] == [True]
    assert not any(m.document for m in fake.chat(ALICE))
    # Elsewhere: no photo, no file, no Variations button; the status says why and how to appeal.
    assert photos(fake, BOB) == [] and not any(m.document for m in fake.chat(BOB))
    status = next(m for m in fake.chat(BOB) if m.shown.startswith("✅"))
    assert "Image 1 was withheld" in status.shown and f"/appeal {withheld}" in status.shown
    assert not any(m.buttons for m in fake.chat(BOB))
    assert spoilered != withheld


# -- webhook mode ------------------------------------------------------------------------------------

WEBHOOK_URL = "https://easel.example.com/telegram/updates"
WEBHOOK_SECRET = "test_secret-token-42"


async def test_webhook_mode_takes_updates_through_easels_http_server_and_refuses_posts_without_the_secret(
        tg: Core, fake: FakeTelegram, generator) -> None:
    from adapters.cli import configured_adapters
    from adapters.http import HttpAdapter

    tg.settings.telegram = telegram_config(fake, webhook_url=WEBHOOK_URL, webhook_secret=WEBHOOK_SECRET)
    tg.settings.http.port = 0
    # What `easel serve` runs: the bot, and the HTTP server for its webhook (no other platform asks for it).
    bot, http = configured_adapters(tg)
    assert isinstance(bot, TelegramAdapter) and isinstance(http, HttpAdapter)
    stop = asyncio.Event()
    serving = [asyncio.create_task(http.run(stop)), asyncio.create_task(bot.run(stop))]
    try:
        await fake.wait_for(lambda: http.started.is_set() and fake.webhook, what="the server and setWebhook")
        fake.webhook_proxy = f"http://127.0.0.1:{http.port}"  # the TLS proxy at easel.example.com
        forged = {"update_id": 900, "message": {"message_id": 1, "date": 0, "chat": fake.private(BOB),
                                                "from": fake.user(BOB), "text": "/imagine forged --steps 2"}}
        refused = [await fake.post_to_webhook(forged, headers={}),
                   await fake.post_to_webhook(forged, headers={"X-Telegram-Bot-Api-Secret-Token": "guess"})]
        command = fake.send(fake.private(ALICE), "/imagine a lighthouse --steps 2 --seed 3")
        async with running_worker(tg, generator):
            await fake.wait_for(lambda: photos(fake, ALICE), what="the result")
    finally:
        stop.set()
        await asyncio.gather(*serving)
    assert {key: fake.webhook[key] for key in ("url", "secret_token", "allowed_updates")} == {
        "url": WEBHOOK_URL, "secret_token": WEBHOOK_SECRET, "allowed_updates": ["message", "callback_query"]}
    assert fake.calls_of("getUpdates") == []  # never long-polled
    assert refused == [403, 403] and (command_update := fake.webhook_posts[-1])[1] == 200
    assert photos(fake, ALICE)[0].reply_to == command["message_id"] and command_update[0] != forged["update_id"]
    [job] = await tg.service.list_jobs()
    assert job.params.prompt == "a lighthouse" and fake.chat(BOB) == []  # the forged command did nothing


@pytest.mark.parametrize(("telegram", "http", "expected"), [
    ({"webhook_url": "http://bot.example.com/tg", "webhook_secret": "abc"}, {},
     "telegram.webhook_url: must be an https:// URL"),
    ({"webhook_url": "https://bot.example.com:8000/tg", "webhook_secret": "abc"}, {},
     "may use port 443, 80, 88 or 8443 only"),
    ({"webhook_url": "https://bot.example.com", "webhook_secret": "abc"}, {}, "needs a path"),
    ({"webhook_url": "https://bot.example.com/tg"}, {}, "webhook_url needs webhook_secret"),
    ({"webhook_url": "https://bot.example.com/tg", "webhook_secret": "no spaces+please"}, {},
     "webhook_secret must be 1 to 256 characters, each a letter, a digit, _ or -"),
    ({"webhook_url": "https://bot.example.com/tg", "webhook_secret": "abc"}, {"enabled": False},
     "telegram.webhook_url needs Easel's HTTP server"),
])
def test_webhook_settings_are_checked_up_front_without_quoting_the_secret(
        telegram: dict[str, Any], http: dict[str, Any], expected: str) -> None:
    from bot.config import load_settings
    from bot.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        load_settings(None, telegram=telegram, http=http)
    assert expected in refused.value.message and "spaces+please" not in refused.value.message


# -- inside another bot: add_easel ------------------------------------------------------------------

# A bot owner's own python-telegram-bot bot, as in the README, pointed at the fake Bot API.
HOST_BOT = """
import os

from telegram import Update
from telegram.ext import Application, CommandHandler, ContextTypes

from adapters.telegram import add_easel


async def ping(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await update.message.reply_text("pong")


application = (Application.builder().token(os.environ["TELEGRAM_TOKEN"])
               .base_url(os.environ["BOT_API"]).base_file_url(os.environ["BOT_API_FILES"]).build())
application.add_handler(CommandHandler("ping", ping))
add_easel(application)
application.run_polling()
"""


async def test_inside_a_host_bot_run_polling_starts_easel_and_the_hosts_own_command_still_answers(
        core: Core, fake: FakeTelegram, generator, tmp_path: Path) -> None:
    config = tmp_path / "easel.toml"
    config.write_text(f'[storage]\ndata_dir = "{core.settings.storage.data_dir}"\n'
                      f'models_dir = "{core.settings.storage.model_cache}"\n'
                      "[telegram]\nprivate_interval_s = 0.02\n")
    env = {**os.environ, "EASEL_CONFIG": str(config), "TELEGRAM_TOKEN": TOKEN, "BOT_API": fake.base_url,
           "BOT_API_FILES": fake.base_file_url}
    log = tmp_path / "host.log"
    with log.open("w") as output:
        host = await asyncio.create_subprocess_exec(sys.executable, "-c", HOST_BOT, env=env, stdout=output,
                                                    stderr=output, cwd=Path(__file__).parent.parent)
    chat = fake.private(ALICE)
    try:
        # run_polling calls post_init, where Easel starts following job events, before its first poll.
        await fake.wait_for(lambda: host.returncode is not None or fake.calls_of("getUpdates"), what="polling")
        assert host.returncode is None, "the host bot stopped"
        ping = fake.send(chat, "/ping")
        command = fake.send(chat, "/imagine a lighthouse --steps 2 --seed 7")
        await fake.wait_for(lambda: [m for m in fake.chat(ALICE) if m.shown == "pong"] and
                            [m for m in replies_to(fake, ALICE, command) if "Queued" in m.shown], what="answers")
        async with running_worker(core, generator):
            await fake.wait_for(lambda: photos(fake, ALICE), what="the result")
        result = photos(fake, ALICE)[0]
        fake.press(chat, result, result.button("ℹ️"))  # Easel's buttons answer inside the host too
        await fake.wait_for(lambda: [m for m in fake.chat(ALICE) if m.reply_to == result.message_id], what="Info")
    except AssertionError as error:
        raise AssertionError(f"{error}\nthe host bot printed:\n{log.read_text()}") from None
    finally:
        if host.returncode is None:
            host.send_signal(signal.SIGINT)  # run_polling stops, and post_stop stops Easel
        await asyncio.wait_for(host.wait(), 60)
    [job] = await core.service.list_jobs()
    printed = log.read_text()
    assert host.returncode == 0 and "Traceback" not in printed and "ERROR" not in printed, printed
    # The host answered its own command, and Easel left it alone (it answers by replying).
    assert [m.shown for m in fake.chat(ALICE) if m.reply_to is None] == ["pong"]
    assert replies_to(fake, ALICE, ping) == []
    assert photos(fake, ALICE)[0].reply_to == command["message_id"] and "seed 7" in photos(fake, ALICE)[0].caption
    [info] = [m for m in fake.chat(ALICE) if m.reply_to == result.message_id]
    assert info.shown.startswith(f"Job {job.id}: succeeded")
    assert job.delivered_at is not None


# -- prompt syntax: /styles and permutation prompts ---------------------------------------------------


async def test_styles_are_listed_and_each_permutation_job_answers_the_command(
        tg: Core, fake: FakeTelegram, generator) -> None:
    tg.settings.storage.styles_path.write_text("name,prompt,negative_prompt\nnight,{prompt} at night,day\n",
                                               encoding="utf-8")
    chat = fake.private(ALICE)
    async with running_bot(tg, fake), running_worker(tg, generator):
        styles = fake.send(chat, "/styles")
        command = fake.send(chat, "/imagine a {red, green} fox --style night --steps 2 --seed 5")
        await fake.wait_for(lambda: replies_to(fake, ALICE, styles) and len(
            [m for m in replies_to(fake, ALICE, command) if m.photo is not None]) == 2, what="both results")
    [listing] = replies_to(fake, ALICE, styles)
    assert listing.shown.splitlines()[1] == "  night: {prompt} at night  (not: day)"
    jobs = sorted(await tg.service.list_jobs(), key=lambda job: job.params.seed or 0)
    assert [(job.params.prompt, job.params.negative, job.seeds) for job in jobs] == [
        ("a red fox at night", "day", [5]), ("a green fox at night", "day", [6])]
