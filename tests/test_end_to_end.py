"""The real path, end to end: chat text → grammar → service → SQLite → queue → worker with the real
builtin:tiny diffusers pipeline → image store → events → what the console user sees."""

from __future__ import annotations

import asyncio
import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapters.console import ConsoleChat
from bot.bootstrap import Core
from bot.domain import JobStatus, Requester
from bot.store import read_parameters
from generation.worker import Worker
from tests.conftest import alice, bob, mask_bytes, png_bytes


def worker_for(core: Core, generator) -> Worker:
    return Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1")


def note_waits_for_change(core: Core) -> asyncio.Event:
    """An event set once anything (the worker, idle or holding back a claim) waits for a change on the bus."""
    waited, wait_for_change = asyncio.Event(), core.bus.wait_for_change

    async def wait_noted(*args, **kwargs) -> None:
        waited.set()
        await wait_for_change(*args, **kwargs)

    core.bus.wait_for_change = wait_noted
    return waited


async def run_chat(core: Core, generator, line: str, who=alice) -> tuple[str, object]:
    """Type one line into a console chat while a burst worker drains the queue."""
    out = io.StringIO()
    chat = ConsoleChat(core, out, requester=who(), progress=False)
    handled = asyncio.create_task(chat.handle(line))
    while not handled.done():
        await worker_for(core, generator).run(burst=True)
        await asyncio.sleep(0.01)
    return out.getvalue(), handled.result()


async def test_imagine_stores_pngs_with_seeds_and_a1111_parameters(core: Core, generator) -> None:
    text, job = await run_chat(core, generator, "/imagine a lighthouse at dusk --no fog --seed 42 --steps 4 --n 2")
    assert job.status is JobStatus.SUCCEEDED
    assert [image.seed for image in job.images] == [42, 43]
    assert "queued (position 1)" in text and "seed 42" in text and "seed 43" in text
    for image in job.images:
        path = Path(image.path)
        assert path.exists() and str(path) in text
        with Image.open(path) as png:
            assert png.size == (64, 64)
        assert read_parameters(path) == (
            "a lighthouse at dusk\nNegative prompt: fog\n"
            f"Steps: 4, Sampler: Euler, CFG scale: 7.0, Seed: {image.seed}, Size: 64x64, Model: tiny")
    assert job.images[0].sha256 != job.images[1].sha256


async def test_the_same_seed_gives_byte_identical_files(core: Core, generator) -> None:
    _, first = await run_chat(core, generator, "/imagine a red fox --seed 7 --steps 3")
    _, second = await run_chat(core, generator, "/imagine a red fox --seed 7 --steps 3", who=bob)
    _, other = await run_chat(core, generator, "/imagine a red fox --seed 8 --steps 3")
    assert Path(first.images[0].path).read_bytes() == Path(second.images[0].path).read_bytes()
    assert first.images[0].sha256 != other.images[0].sha256


async def test_every_event_reaches_the_owner_in_order(core: Core, generator) -> None:
    _, job = await run_chat(core, generator, "/imagine a cat --steps 3")
    kinds = [event.kind async for event in core.bus.watch(job.id)]
    assert kinds == ["queued", "started", "progress", "progress", "progress", "done"]


async def test_cancelling_a_running_job_stops_its_generation_early(core: Core, generator) -> None:
    steps_run: list[int] = []

    class CountingSteps:
        def generate(self, tasks, on_step=None):
            def counted(step, total, *previews):
                steps_run.append(step)
                on_step(step, total, *previews)
            return generator.generate(tasks, counted)

    job = (await core.service.submit(alice(), core.parser.parse("/imagine a cat --steps 50"))).job
    worker = Worker(core.queue, CountingSteps(), core.store, core.settings, worker_id="test-worker:1")
    draining = asyncio.create_task(worker.run(burst=True))
    async for event in core.bus.watch(job.id):
        if event.kind == "progress":
            await core.service.cancel(alice(), job.id)
            break
    await draining
    assert (await core.service.get_job(job.id)).status is JobStatus.CANCELLED
    assert worker.stats.cancelled == 1 and worker.stats.succeeded == 0
    assert max(steps_run) < 50  # the worker dropped the job instead of finishing it


async def test_a_failed_progress_write_costs_a_tick_not_the_image(core: Core, generator, monkeypatch) -> None:
    from sqlalchemy.exc import OperationalError

    async def locked(*args, **kwargs):
        raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))

    monkeypatch.setattr(core.queue, "report_progress", locked)
    _, job = await run_chat(core, generator, "/imagine a cat --steps 3")
    assert job.status is JobStatus.SUCCEEDED and len(job.images) == 1


async def test_edit_runs_img2img_from_the_attached_image(core: Core, generator, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes(96, 64, (20, 40, 220)))
    text, job = await run_chat(core, generator, f"/edit {photo} make it winter --strength 0.6 --steps 5 --seed 1")
    assert job.status is JobStatus.SUCCEEDED, text
    assert job.params.strength == 0.6
    assert (job.images[0].width, job.images[0].height) == (job.params.width, job.params.height)
    assert job.params.width > job.params.height  # the photo's aspect ratio is kept


async def test_inpaint_repaints_white_mask_pixels_and_keeps_the_rest(core: Core, generator, tmp_path: Path) -> None:
    photo, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    photo.write_bytes(png_bytes(64, 64, (30, 160, 60)))
    mask.write_bytes(mask_bytes(64, 64))  # left half white
    text, job = await run_chat(core, generator, f"/inpaint {photo} {mask} a red door --steps 5 --seed 3")
    assert job.status is JobStatus.SUCCEEDED, text
    result = np.asarray(Image.open(job.images[0].path).convert("RGB"), dtype=np.float32)
    original = np.asarray(Image.open(photo).convert("RGB"), dtype=np.float32)
    kept = np.abs(result[:, 40:] - original[:, 40:]).mean()
    repainted = np.abs(result[:, :24] - original[:, :24]).mean()
    assert kept < repainted / 2


async def test_a_job_that_fails_tells_why_and_the_worker_goes_on(core: Core, generator, tmp_path: Path) -> None:
    from bot.config import ModelConfig
    from generation.builtin import ensure_builtin
    from generation.pipelines import DiffusersGenerator

    # A folder whose configuration reads as a model, with its UNet's weights lost: only loading it fails.
    missing = tmp_path / "half-copied-model"
    shutil.copytree(ensure_builtin("tiny", core.settings.storage.model_cache), missing)
    for weights in (missing / "unet").glob("*.safetensors"):
        weights.unlink()
    models = {**core.settings.models, "gone": ModelConfig(source=str(missing), default_width=64,
                                                        default_height=64)}
    core.settings.models = models
    core.parser = type(core.parser).from_settings(core.settings)
    generator = DiffusersGenerator(models, device="cpu", dtype="float32",
                                   cache_dir=core.settings.storage.model_cache)
    text, failed = await run_chat(core, generator, "/imagine a cat --model gone --steps 2")
    assert failed.status is JobStatus.FAILED
    assert str(missing) in failed.error and "failed:" in text
    _, fine = await run_chat(core, generator, "/imagine a cat --steps 2")
    assert fine.status is JobStatus.SUCCEEDED


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"\x00" * 16))


def _noise_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("line", "files", "expected"), [
    ("/imagine a cat --sed 4", {}, "unknown flag --sed (did you mean --seed?)"),
    ("/imagine a cat --steps 500", {}, "--steps must be a whole number from 1 to 50 (got 500)"),
    ("/edit {image} winter", {"image": b"just some text\n"}, "not a PNG, JPEG"),
    ("/inpaint {image} {mask} door", {"image": png_bytes(64, 64), "mask": mask_bytes(128, 64)}, "aspect ratio"),
    ("/edit {image} winter", {"image": _noise_png()[:2000]}, "damaged or incomplete"),
    ("/edit {image} winter", {"image": _png_header_only(30000, 30000)}, "too many pixels"),
])
async def test_bad_input_gets_one_line_and_the_chat_keeps_serving(
        core: Core, generator, tmp_path: Path, line: str, files: dict[str, bytes], expected: str) -> None:
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.png"
        paths[name].write_bytes(data)
    text, job = await run_chat(core, generator, line.format(**paths))
    assert job is None
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert await core.service.list_jobs() == []
    _, fine = await run_chat(core, generator, "/imagine a cat --steps 2")
    assert fine.status is JobStatus.SUCCEEDED


async def test_progress_events_carry_live_previews_when_switched_on(core: Core, models_dir: Path) -> None:
    import base64

    from generation.pipelines import DiffusersGenerator

    core.settings.generation.previews = True
    core.settings.generation.preview_every_steps = 2
    generator = DiffusersGenerator(core.settings.models, device="cpu", dtype="float32", cache_dir=models_dir,
                                   options=core.settings.generation)
    _, job = await run_chat(core, generator, "/imagine a cat --steps 6")
    progress = [event.payload async for event in core.bus.watch(job.id) if event.kind == "progress"]
    previews = [p["preview"] for p in progress if "preview" in p]
    assert [p["step"] for p in progress if "preview" in p] == [2, 4]
    for preview in previews:
        assert preview.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1]))) as picture:
            assert picture.size == (16, 16)


async def test_people_who_submit_at_the_same_moment_share_the_first_batch(core: Core, generator,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No batch wait is set: the worker waits only for submissions already under way, and four people
    pressing enter together get one diffusers call, not the first alone and the rest a batch later."""
    import generation.worker

    # An allowance far longer than the test, for a slow machine: the batch filling ends the wait, not a clock.
    monkeypatch.setattr(generation.worker, "SUBMISSIONS_WAIT_S", 60)
    core.settings.generation.max_batch = 4
    idle = note_waits_for_change(core)
    worker = worker_for(core, generator)
    serving = asyncio.create_task(worker.run())
    await asyncio.wait_for(idle.wait(), timeout=30)  # the worker waits for work: the first commit wakes it
    people = [Requester(platform="console", user_id=name) for name in ("ann", "ben", "cat", "dan")]
    submitted = await asyncio.gather(*(core.service.submit(person, core.parser.parse(f"/imagine a {thing} --steps 2"))
                                       for person, thing in zip(people, ("cat", "dog", "fox", "owl"), strict=True)))
    for result in submitted:
        async for _event in core.bus.watch(result.job.id):
            pass
    worker.stop()
    await serving
    jobs = [await core.service.get_job(result.job.id) for result in submitted]
    assert [job.status for job in jobs] == [JobStatus.SUCCEEDED] * 4
    assert [job.batch_size for job in jobs] == [4] * 4
    assert worker.stats.batches == 1


async def test_a_short_batch_wait_gathers_a_job_submitted_just_after(core: Core, generator) -> None:
    # A wait far longer than the test, ended by the second job filling the batch: nothing hangs on timing.
    core.settings.generation.batch_wait_ms = 60_000
    core.settings.generation.max_batch = 2
    first = await core.service.submit(alice(), core.parser.parse("/imagine a cat --steps 2"))
    waiting = note_waits_for_change(core)  # set as the worker holds back its claim, for a fuller batch
    draining = asyncio.create_task(worker_for(core, generator).run(burst=True))
    await asyncio.wait_for(waiting.wait(), timeout=30)
    second = await core.service.submit(bob(), core.parser.parse("/imagine a dog --steps 2"))
    await draining
    jobs = [await core.service.get_job(result.job.id) for result in (first, second)]
    assert [job.status for job in jobs] == [JobStatus.SUCCEEDED] * 2
    assert [job.batch_size for job in jobs] == [2, 2]  # one diffusers call for both users


async def test_a_batch_is_completed_together_and_one_bad_completion_costs_only_its_job(
        core: Core, generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker completes a batch's jobs in one unit of work; if that fails because of one job, it
    completes each alone: the others keep their pictures and the one job fails with a message."""
    core.settings.generation.max_batch = 3
    people = [Requester(platform="console", user_id=name) for name in ("ann", "ben", "cat")]
    submitted = [await core.service.submit(person, core.parser.parse(f"/imagine a {thing} --steps 2"))
                 for person, thing in zip(people, ("cat", "dog", "fox"), strict=True)]
    bad_id, image_rows = submitted[1].job.id, core.queue._image_rows
    completions = []

    async def one_bad_row(uow, job, finished, now) -> list[dict]:
        completions.append(job.id)
        if job.id == bad_id:
            raise ValueError("a row the database refused")
        return await image_rows(uow, job, finished, now)

    monkeypatch.setattr(core.queue, "_image_rows", one_bad_row)
    worker = worker_for(core, generator)
    await worker.run(burst=True)
    jobs = [await core.service.get_job(result.job.id) for result in submitted]
    assert worker.stats.batches == 1 and [job.batch_size for job in jobs] == [3] * 3
    assert completions[:2] == [submitted[0].job.id, bad_id]  # together first, stopped at the bad one
    assert [job.status for job in jobs] == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SUCCEEDED]
    assert len(jobs[0].images) == len(jobs[2].images) == 1 and not jobs[1].images
    assert "internal error (ValueError)" in jobs[1].error
    assert worker.stats.succeeded == 2 and worker.stats.failed == 1
