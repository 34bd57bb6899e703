"""Starting a /teach training from each surface: the HTTP API's multipart POST /v1/trainings, the web
chat (several pictures attached at once, in a real browser), a Telegram album with the command as one
caption, the console chat's `/teach NAME FOLDER` (captions from .txt files), and `/quota /teach` there.
The training itself is tested in tests/test_teach.py; here it is queued, with its pictures and
captions, and nothing more.
"""

from __future__ import annotations

import io
from pathlib import Path

from playwright.async_api import expect

from adapters.console import ConsoleChat
from bot.domain import JobKind, JobStatus
from tests.conftest import alice
from tests.http_fixtures import server, settings  # noqa: F401
from tests.test_teach import teaching_pictures, write_folder
from tests.test_telegram import ALICE, fake, replies_to, running_bot, tg  # noqa: F401
from tests.test_web import browser, chromium, open_chat  # noqa: F401


async def test_a_training_is_posted_as_multipart_pictures_with_their_captions(server) -> None:  # noqa: F811
    token = await server.new_key()
    pictures = teaching_pictures(3)
    files = [("picture", (f"{i}.png", picture.data, "image/png")) for i, picture in enumerate(pictures)]
    async with server.client(token) as client:
        # httpx sends fields before files; captions pair with pictures by order, so send them as parts too
        parts = [("name", (None, "zorb")), ("steps", (None, "40"))]
        for file, picture in zip(files, pictures, strict=True):
            parts += [file, ("caption", (None, picture.caption))]
        queued = await client.post("/v1/trainings", files=parts)
        assert queued.status_code == 202, queued.text
        body = queued.json()
        assert body["kind"] == "teach" and body["status"] == "queued" and body["cost_units"] > 0
        assert queued.headers["Location"].endswith(f"/v1/jobs/{body['id']}")
        followed = await client.get(f"/v1/jobs/{body['id']}")
        assert followed.json()["status"] == "queued"

        too_few = await client.post("/v1/trainings", files=[("name", (None, "other")), files[0]])
        unknown = await client.post("/v1/trainings", files=[("name", (None, "other")), ("colour", (None, "x")),
                                                            *files])
        nameless = await client.post("/v1/trainings", files=files)
        as_json = await client.post("/v1/trainings", json={"name": "zorb"})
    training = await server.core.queue.training(body["id"])
    assert [caption for _, caption in training.pictures] == [picture.caption for picture in pictures]
    assert training.steps == 40 and training.name == "zorb"
    assert too_few.status_code == 400 and "/teach needs 3 to 30 pictures" in too_few.json()["message"]
    assert unknown.status_code == 400 and "unexpected field `colour`" in unknown.json()["message"]
    assert nameless.status_code == 400 and "`name` is missing" in nameless.json()["message"]
    assert as_json.status_code == 415


async def test_the_console_chat_teaches_from_a_folder_with_txt_captions(core, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "pics", teaching_pictures(3))
    (folder / "1.txt").unlink()  # a picture without a caption file gets the shared caption
    chat = ConsoleChat(core, out := io.StringIO(), requester=alice())
    await chat.handle("/quota /teach zorb --steps 40")
    assert "/teach 40 steps of 4 pictures at 64x64 costs" in out.getvalue()
    result = await core.teach.submit(chat.requester, *await _teach_command(chat, f"/teach zorb {folder} --steps 40 "
                                                                                "a zorb thing"))
    training = await core.queue.training(result.job.id)
    assert [caption for _, caption in training.pictures] == [
        "a zorb circle on a red background", "a zorb thing", "a zorb triangle on a green background"]
    assert result.job.params.kind is JobKind.TEACH and result.job.status is JobStatus.QUEUED

    await chat.handle(f"/teach zorb {tmp_path / 'missing'}")
    await chat.handle("/teach zorb")
    lines = out.getvalue().splitlines()
    assert lines[-2] == f"error: {tmp_path / 'missing'} is not a folder; /teach takes a folder of pictures (and .txt " \
                        "captions)"
    assert lines[-1].startswith("error: usage: /teach NAME FOLDER")


async def _teach_command(chat: ConsoleChat, line: str):
    """What the console chat hands the teach service for `line` (its folder read as attachments)."""
    from adapters.console import read_training_folder, split_teach_folder

    text, folder = split_teach_folder(line)
    return chat.core.parser.parse(text), read_training_folder(folder)



async def test_the_web_chat_teaches_from_several_attached_pictures(server, browser, tmp_path: Path) -> None:  # noqa: F811
    page = await open_chat(browser, server.url)
    folder = write_folder(tmp_path / "pics", teaching_pictures(3))
    await page.locator("#file").set_input_files([str(path) for path in sorted(folder.glob("*.png"))])
    await expect(page.locator("#log")).to_contain_text("Attached 3 pictures. Type /teach NAME")
    await page.locator("#command").fill("/teach zorb --steps 40 a zorb thing")
    await page.locator("#send").click()
    await expect(page.locator("article.job .prompt")).to_have_text("teach: zorb")
    await expect(page.locator("#log")).to_contain_text("Teaching: ")
    [job] = await server.core.service.list_jobs()
    training = await server.core.queue.training(job.id)
    assert [caption for _, caption in training.pictures] == ["a zorb thing"] * 3  # the shared caption
    assert training.steps == 40 and job.params.kind is JobKind.TEACH
    assert page.errors == []  # type: ignore[attr-defined]


async def test_telegram_teaches_from_an_album_with_the_command_as_one_caption(tg, fake) -> None:  # noqa: F811
    chat = fake.private(ALICE)
    pictures = teaching_pictures(3)
    async with running_bot(tg, fake):
        command = fake.send(chat, photo=pictures[0].data, caption="/teach zorb --steps 40", media_group_id="a1")
        for picture in pictures[1:]:  # the album's other pictures: their captions are their own
            fake.send(chat, photo=picture.data, caption=picture.caption, media_group_id="a1")
        # The status message says it is queued (the job's own queued event may render it first).
        await fake.wait_for(lambda: any("Queued (position 1)" in m.shown for m in fake.chat(ALICE)),
                            what="the training queued")
    [job] = await tg.service.list_jobs()
    training = await tg.queue.training(job.id)
    assert [caption for _, caption in training.pictures] == ["zorb", *(p.caption for p in pictures[1:])]
    assert training.steps == 40 and job.reply_to["status_message_id"]
    assert replies_to(fake, ALICE, command)
