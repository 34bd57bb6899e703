"""/teach: a user teaches `builtin:shapes` a new word from eight pictures, in the chat, on the fair queue.

What can be taught: `builtin:shapes`' VAE decodes only its eight flat colours (generation/shapes.py), so a
new colour such as pink cannot be drawn at all (its pictures' latents decode as the nearest of the
eight); a new *word* for something the model can draw is learnable in a few CPU minutes. The pictures
here are orange shapes captioned "a zorb circle on a blue background"...: afterwards "zorb" draws orange
for its owner, and for nobody else until a moderator shares it. (Teaching a new shape, as the shipped
ring and cross LoRAs do, takes about 1000 steps of 32 pictures: too slow for a test.)

The training runs as slices on the same queue as pictures; the tests check what a user sees: the
picture's colours (generation/shapes.py's checker), the order jobs finish in, the files, the charges.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from adapters.console import ConsoleChat
from bot.bootstrap import Core, open_core
from bot.config import Settings, load_settings
from bot.domain import JobStatus, Requester, TeachCommand, TrainingPicture
from bot.errors import InvalidCommand, InvalidImage, NotFound, QuotaExceeded, Refused
from bot.events import EventKind
from bot.grammar import CommandParser
from bot.views import JobView
from generation.shapes import COLOURS, Scene, describe, draw
from generation.worker import build_worker
from tests.conftest import alice, bob, png_bytes

WORD, COLOUR = "zorb", "orange"
SHAPES_MODELS = '{"shapes": {"source": "builtin:shapes", "default_width": 64, "default_height": 64}}'


def moderator() -> Requester:
    return Requester(platform="console", user_id="mod", is_platform_moderator=True)


def teaching_pictures(count: int = 8, word: str = WORD, colour: str = COLOUR) -> list[TrainingPicture]:
    """`count` pictures of `colour` shapes on other colours, captioned with `word` for the colour."""
    rng = random.Random(0)
    backgrounds = [name for name in COLOURS if name != colour]
    pictures = []
    for index in range(count):
        shape, background = ("circle", "square", "triangle")[index % 3], backgrounds[index % len(backgrounds)]
        scene = Scene(colour, shape, background, rng.randint(26, 40), (rng.randint(22, 42), rng.randint(22, 42)))
        buffer = io.BytesIO()
        draw(scene).save(buffer, format="PNG")
        pictures.append(TrainingPicture(buffer.getvalue(), f"a {word} {shape} on a {background} background",
                                        f"{index}.png"))
    return pictures


def write_folder(folder: Path, pictures: list[TrainingPicture]) -> Path:
    """The pictures as a user keeps them for `easel teach`: a PNG and a .txt caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, picture in enumerate(pictures):
        (folder / f"{index}.png").write_bytes(picture.data)
        (folder / f"{index}.txt").write_text(picture.caption + "\n", encoding="utf-8")
    return folder


def shapes_settings(data_dir: Path, models_dir: Path, **teach: object) -> Settings:
    return load_settings(None, storage={"data_dir": data_dir, "models_dir": models_dir},
                         generation={"poll_interval_ms": 50, "progress_every_s": 0, "default_model": "shapes"},
                         models={"shapes": {"source": "builtin:shapes", "default_width": 64, "default_height": 64}},
                         teach={"slice_steps": 20, "samples": 1, **teach})


def colours_of(job: JobView) -> list[str]:
    return [describe(Image.open(image.path)).colour for image in job.images]


async def imagine(core: Core, who: Requester, line: str) -> JobView:
    result = await core.service.submit(who, core.parser.parse(line))
    async for _event in core.bus.watch(result.job.id):
        pass
    return await core.service.get_job(result.job.id)


# -- the whole story once: teach in the console chat while another user generates --------------------------


@dataclass
class Taught:
    chat_output: str
    training: JobView
    generated_meanwhile: JobView
    submitted_meanwhile_at: datetime
    progress_payloads: list[dict]
    owner_pictures: JobView  # alice: a zorb circle on a blue background
    owner_by_name: JobView  # alice: <lora:zorb> named
    stranger_pictures: JobView  # bob, the same prompt: the word means nothing to him
    stranger_by_name_error: str
    trained_listing: str
    shared_answer: str
    stranger_after_sharing: JobView
    lora_files: list[Path]


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Taught:
    root = tmp_path_factory.mktemp("teach")
    folder = write_folder(root / "pictures", teaching_pictures())
    settings = shapes_settings(root / "data", models_dir)

    async def story() -> Taught:
        core = await open_core(settings)
        worker = build_worker(core)
        serving = asyncio.create_task(worker.run())
        try:
            out = io.StringIO()
            chat = ConsoleChat(core, out, requester=alice(), output_dir=root / "out")
            teaching = asyncio.create_task(chat.handle(f"/teach {WORD} {folder} --steps 80"))
            jobs: list[JobView] = []
            while not jobs:  # the console chat reads the folder and queues the training
                await asyncio.sleep(0.05)
                jobs = await core.service.list_jobs()
            training_id = jobs[0].id
            async for event in core.bus.watch(training_id):  # once its first slice is done...
                if event.kind is EventKind.PROGRESS and "loss" in event.payload:
                    break
            submitted_at = core.clock()  # ...bob asks for a picture
            meanwhile = asyncio.create_task(imagine(core, bob(), "/imagine a red square on a white background"))
            payloads = [event.payload async for event in core.bus.watch(training_id)
                        if event.kind is EventKind.PROGRESS and "loss" in event.payload]
            training = await teaching
            generated = await meanwhile
            prompt = f"/imagine a {WORD} circle on a blue background --seed 3 --n 3"
            owner = await imagine(core, alice(), prompt)
            by_name = await imagine(core, alice(), f"/imagine a {WORD} circle on a white background <lora:{WORD}> "
                                                   "--seed 3 --n 3")
            stranger = await imagine(core, bob(), prompt)
            try:
                await core.service.submit(bob(), core.parser.parse(f"/imagine a circle <lora:{WORD}>"))
                refused = ""
            except InvalidCommand as error:
                refused = error.message
            listing = await core.moderation.handle(moderator(), core.parser.parse("/mod trained"))
            shared = await core.moderation.handle(moderator(), core.parser.parse(f"/mod share {WORD}"))
            after = await imagine(core, bob(), f"/imagine a {WORD} circle on a blue background <lora:{WORD}> "
                                               "--seed 3 --n 3")
            files = sorted(settings.storage.loras.rglob("*.safetensors"))
            return Taught(out.getvalue(), training, generated, submitted_at, payloads, owner, by_name, stranger,
                          refused, listing, shared, after, files)
        finally:
            worker.stop()
            await asyncio.gather(serving, return_exceptions=True)
            await core.close()

    return asyncio.run(story())


@pytest.mark.timeout(900)
def test_the_taught_word_draws_its_colour_for_its_owner(taught: Taught) -> None:
    assert taught.training.status is JobStatus.SUCCEEDED, taught.chat_output
    assert colours_of(taught.owner_pictures) == [COLOUR] * 3
    assert [describe(Image.open(i.path)).shape for i in taught.owner_pictures.images] == ["circle"] * 3
    assert [describe(Image.open(i.path)).background for i in taught.owner_pictures.images] == ["blue"] * 3
    assert taught.owner_pictures.params.loras == ((f"trained/u1/{WORD}", 1.0),)  # the trigger word called it
    assert taught.owner_by_name.params.loras == ((f"trained/u1/{WORD}", 1.0),)
    assert colours_of(taught.owner_by_name).count(COLOUR) >= 2


def test_the_word_is_its_owners_until_a_moderator_shares_it(taught: Taught) -> None:
    assert taught.stranger_pictures.params.loras == ()
    assert COLOUR not in colours_of(taught.stranger_pictures)  # the same prompt and seeds, without the LoRA
    assert taught.stranger_by_name_error.startswith(f"unknown LoRA '{WORD}'")
    assert f"{WORD}  by console:alice, trigger '{WORD}', rank 4, 8 pictures: succeeded" in taught.trained_listing
    assert taught.shared_answer == f"Shared '{WORD}': everyone can use <lora:{WORD}> now (/loras lists it)."
    assert taught.stranger_after_sharing.params.loras == ((WORD, 1.0),)
    assert colours_of(taught.stranger_after_sharing) == [COLOUR] * 3


def test_the_training_ends_with_a_comparison_without_and_with_the_word(taught: Taught) -> None:
    without, with_word = taught.training.images
    assert describe(Image.open(with_word.path)).colour == COLOUR
    assert without.seed == with_word.seed and without.sha256 != with_word.sha256  # same prompt and seed
    assert "Image 1: without it; image 2: with it (same prompt and seed)." in taught.chat_output


def test_progress_says_step_loss_and_time_left_with_a_sample(taught: Taught) -> None:
    assert [payload["step"] for payload in taught.progress_payloads] == [20, 40, 60]
    assert all(payload["loss"] > 0 and payload["eta_s"] > 0 for payload in taught.progress_payloads)
    assert sum("sample" in payload for payload in taught.progress_payloads) == 1  # teach.samples = 1
    lines = [line for line in taught.chat_output.splitlines() if ", loss " in line]
    assert len(lines) == 3 and "step 20/80" in lines[0] and "left" in lines[0]
    [sample_line] = [line for line in lines if "sample: " in line]
    sample = Path(sample_line.split("sample: ")[1])
    assert Image.open(sample).size == (64, 64)


def test_a_picture_asked_for_during_training_is_done_before_the_training(taught: Taught) -> None:
    assert taught.generated_meanwhile.status is JobStatus.SUCCEEDED
    assert taught.submitted_meanwhile_at < taught.training.finished_at
    assert taught.generated_meanwhile.finished_at < taught.training.finished_at
    assert describe(Image.open(taught.generated_meanwhile.images[0].path))[::2] == ("red", "white")


def test_the_lora_is_a_file_the_lora_loader_reads(taught: Taught) -> None:
    from bot.extra_networks import read_safetensors_header

    names = [path.name for path in taught.lora_files]
    assert names == [f"{WORD}.safetensors", f"{WORD}.safetensors"]  # the owner's, and the shared copy
    header = read_safetensors_header(taught.lora_files[0])
    assert header["__metadata__"]["ss_sd_model_name"] == "builtin:shapes"
    assert any(name.endswith("attn2_to_k.lora_down.weight") for name in header)


# -- an embedding: the same word taught as new input vectors, the model itself unchanged --------------------


@pytest.fixture
def shapes_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """builtin:shapes as the default model: the environment wins over load_settings' arguments, and
    tests/conftest.py makes builtin:tiny the default there for every test."""
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "shapes")
    monkeypatch.setenv("EASEL_MODELS", SHAPES_MODELS)


@pytest.mark.timeout(900)
def test_an_embedding_word_draws_its_colour_for_its_owner_only(tmp_path: Path, models_dir: Path,
                                                               shapes_by_default: None) -> None:
    """`--kind embedding`: the word becomes two new input vectors of the text encoder (textual inversion,
    generation/train_extras.py's recipe), saved as AUTOMATIC1111's `emb_params`; the owner's word is
    written as the private word the worker loads it under, and means nothing to anyone else."""
    settings = shapes_settings(tmp_path / "data", models_dir)

    async def story() -> dict:
        core = await open_core(settings)
        worker = build_worker(core)
        serving = asyncio.create_task(worker.run())
        try:
            chat = ConsoleChat(core, out := io.StringIO(), requester=alice())
            await chat.handle(f"/quota /teach {WORD} --kind embedding --steps 300")
            result = await core.teach.submit(alice(), TeachCommand(WORD, kind="embedding", steps=300),
                                             teaching_pictures())
            async for _event in core.bus.watch(result.job.id):
                pass
            seen = {"dry_run": out.getvalue(), "training": await core.service.get_job(result.job.id)}
            prompt = f"/imagine a {WORD} circle on a blue background --seed 3 --n 3"
            seen["owner"], seen["stranger"] = await imagine(core, alice(), prompt), await imagine(core, bob(), prompt)
            try:
                await core.service.submit(bob(), core.parser.parse(f"/imagine a trained-u1-{WORD} circle"))
                seen["refused"] = ""
            except InvalidCommand as error:
                seen["refused"] = error.message
            seen["listing"] = await core.moderation.handle(moderator(), core.parser.parse("/mod trained"))
            seen["shared"] = await core.moderation.handle(moderator(), core.parser.parse(f"/mod share {WORD}"))
            seen["stranger_after_sharing"] = await imagine(core, bob(), prompt)
            return seen
        finally:
            worker.stop()
            await asyncio.gather(serving, return_exceptions=True)
            await core.close()

    seen = asyncio.run(story())
    assert "/teach 300 steps of 4 pictures at 64x64 costs 2.81 units" in seen["dry_run"]
    assert seen["training"].status is JobStatus.SUCCEEDED
    assert colours_of(seen["owner"]) == [COLOUR] * 3
    assert [describe(Image.open(i.path))[1:] for i in seen["owner"].images] == [("circle", "blue")] * 3
    assert seen["owner"].params.loras == ()  # the model's weights are untouched: only the word's vectors are new
    assert COLOUR not in colours_of(seen["stranger"])
    assert seen["refused"].startswith(f"'trained-u1-{WORD}' is a word Easel keeps for itself")
    assert f"{WORD}  by console:alice, trigger '{WORD}', an embedding, 8 pictures: succeeded" in seen["listing"]
    assert seen["shared"] == f"Shared '{WORD}': everyone can use the word {WORD} now (/loras lists it)."
    assert colours_of(seen["stranger_after_sharing"]) == [COLOUR] * 3
    without, with_word = seen["training"].images  # the closing comparison
    assert describe(Image.open(with_word.path)).colour == COLOUR
    assert without.seed == with_word.seed and without.sha256 != with_word.sha256  # same prompt and seed
    trained = settings.storage.embeddings / "trained" / "u1" / f"{WORD}.safetensors"
    with safe_open(trained, "pt") as file:  # AUTOMATIC1111's layout: one tensor, a row per vector
        assert list(file.keys()) == ["emb_params"] and file.get_tensor("emb_params").shape[0] == 2
    assert (settings.storage.embeddings / f"{WORD}.safetensors").read_bytes() == trained.read_bytes()
    assert list(settings.storage.loras.rglob("*.safetensors")) == []


# -- SIGKILL in the middle, then `easel worker --burst` ------------------------------------------------------


def easel_env(data_dir: Path, models_dir: Path) -> dict[str, str]:
    return {**os.environ, "EASEL_STORAGE__DATA_DIR": str(data_dir), "EASEL_STORAGE__MODELS_DIR": str(models_dir),
            "EASEL_GENERATION__PROGRESS_EVERY_S": "0", "EASEL_GENERATION__POLL_INTERVAL_MS": "50",
            "EASEL_GENERATION__DEFAULT_MODEL": "shapes", "EASEL_MODELS": SHAPES_MODELS,
            "EASEL_TEACH__SLICE_STEPS": "5", "EASEL_TEACH__SAMPLES": "0"}


@pytest.mark.timeout(900)
def test_a_training_killed_mid_way_finishes_with_the_same_lora(tmp_path: Path, models_dir: Path) -> None:
    """`easel teach` uninterrupted, and `easel teach` SIGKILLed after its first checkpoint then finished by
    `easel worker --burst`, write the same bytes: the resumed slices start from the checkpointed LoRA
    weights, optimizer moments, schedule and random generator, and compute bit for bit what the first
    run did (same machine, same thread count); the file's header is written in sorted order, since
    safetensors' own order of its metadata changes from process to process."""
    folder = write_folder(tmp_path / "pictures", teaching_pictures(4))
    # Four slices of 5 steps: the kill comes within one poll of the first checkpoint, three slices before
    # the last.
    command = [sys.executable, "-m", "adapters.cli", "teach", "kept", str(folder), "--steps", "20",
               "-o", str(tmp_path / "out")]
    whole = subprocess.run(command, env=easel_env(tmp_path / "whole", models_dir), capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert "step 5/20" in whole.stdout and "step 15/20" in whole.stdout

    env = easel_env(tmp_path / "killed", models_dir)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_files = tmp_path / "killed" / "images" / "jobs"  # the folder store's files of each job

    async def first_slice_done() -> None:
        while not (job_files.is_dir() and any(job_files.glob("*/checkpoint.pt"))):
            assert process.poll() is None, process.communicate()
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(first_slice_done(), timeout=400))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    finished = subprocess.run([sys.executable, "-m", "adapters.cli", "worker", "--burst"], env=env,
                              capture_output=True, text=True, timeout=600)
    assert "1 job(s) done" in finished.stdout, finished.stdout + finished.stderr
    kept = Path("loras/trained/u1/kept.safetensors")
    assert (tmp_path / "killed" / kept).read_bytes() == (tmp_path / "whole" / kept).read_bytes()


# -- checks before any step, quota, and the queue's order (no torch) ---------------------------------------


@pytest.fixture
def teach_core_settings(data_dir: Path, models_dir: Path) -> Settings:
    return shapes_settings(data_dir, models_dir)


@pytest.fixture
async def shapes_core(teach_core_settings: Settings):
    core = await open_core(teach_core_settings)
    try:
        yield core
    finally:
        await core.close()


@pytest.mark.parametrize(("command", "pictures", "message"), [
    (TeachCommand("zorb"), teaching_pictures(2), "/teach needs 3 to 30 pictures (teach.max_pictures); got 2"),
    (TeachCommand("zorb"), teaching_pictures(31), "/teach needs 3 to 30 pictures (teach.max_pictures); got 31"),
    (TeachCommand("no way"), teaching_pictures(3), "a trained word's name is 1 to 32 letters, digits, - or _"),
    (TeachCommand("zorb", steps=5), teaching_pictures(3), "--steps must be 10 to 2000 (teach.max_steps); got 5"),
    (TeachCommand("zorb", rank=0), teaching_pictures(3), "--rank must be 1 to 64 (teach.max_rank); got 0"),
    (TeachCommand("zorb", kind="hypernet"), teaching_pictures(3), "--kind 'hypernet' cannot be trained here"),
    (TeachCommand("zorb"), [*teaching_pictures(2), TrainingPicture(png_bytes(2100, 64), "", "wide.png")],
     "picture 3 (wide.png) is 2100x64; each side may be at most 2048 pixels (teach.max_picture_side)"),
    (TeachCommand("zorb"), [*teaching_pictures(2), TrainingPicture(b"not a picture", "", "notes.txt")],
     "the picture 3 (notes.txt) is not a PNG, JPEG, WebP, GIF or BMP file"),
])
async def test_what_cannot_be_taught_is_refused_in_one_line_before_anything_is_queued(
        shapes_core: Core, command: TeachCommand, pictures: list[TrainingPicture], message: str) -> None:
    with pytest.raises((InvalidCommand, InvalidImage)) as raised:
        await shapes_core.teach.submit(alice(), command, pictures)
    assert "\n" not in raised.value.message and message in raised.value.message
    assert await shapes_core.service.list_jobs() == []


async def test_total_pixels_have_a_limit(tmp_path: Path, models_dir: Path) -> None:
    core = await open_core(shapes_settings(tmp_path / "data", models_dir, max_total_pixels=3 * 64 * 64 - 1))
    try:
        with pytest.raises(InvalidImage, match=r"more than 12287 pixels together \(teach.max_total_pixels\) at "
                                               r"picture 3"):
            await core.teach.submit(alice(), TeachCommand("zorb"), teaching_pictures(3))
    finally:
        await core.close()


async def test_names_are_unique_per_owner(shapes_core: Core) -> None:
    await shapes_core.teach.submit(alice(), TeachCommand("zorb"), teaching_pictures(3))
    with pytest.raises(InvalidCommand, match="you already have a trained word called 'zorb'; pick another name"):
        await shapes_core.teach.submit(alice(), TeachCommand("ZORB"), teaching_pictures(3))
    await shapes_core.teach.submit(bob(), TeachCommand("zorb"), teaching_pictures(3))  # another owner's


async def test_a_caption_the_prompt_check_refuses_refuses_the_training(shapes_core: Core) -> None:
    pictures = teaching_pictures(3)
    pictures[1] = TrainingPicture(pictures[1].data, "a nude circle")  # NSFW, and this place is not
    with pytest.raises(Refused) as raised:
        await shapes_core.teach.submit(alice(), TeachCommand("zorb"), pictures)
    assert raised.value.message.startswith("A caption or the name") and "sexual" in raised.value.message
    assert await shapes_core.service.list_jobs() == []


async def test_quota_prices_a_training_by_its_steps_and_a_failed_one_keeps_only_the_steps_it_ran(
        shapes_core: Core) -> None:
    chat = ConsoleChat(shapes_core, out := io.StringIO(), requester=alice())
    await chat.handle("/quota /teach zorb --steps 200")
    # 200 steps x 4 pictures x 3 (forward and backward) at 64x64, over 512x512 x 20 steps per unit
    assert "/teach 200 steps of 4 pictures at 64x64 costs 1.88 units" in out.getvalue()
    result = await shapes_core.teach.submit(alice(), TeachCommand("zorb", steps=200), teaching_pictures(3))
    assert result.cost == pytest.approx(1.875)
    queue = shapes_core.queue
    [claimed] = await queue.claim_batch("w:1", 4, train=True)
    assert await queue.requeue_slice(claimed.id, "w:1", step=50, loss=0.2, eta_s=30.0)
    [claimed] = await queue.claim_batch("w:1", 4, train=True)
    assert claimed.progress_step == 50  # the next slice goes on from the checkpoint's step
    await queue.fail(claimed.id, "the model went away", worker_id="w:1")
    job = await shapes_core.service.get_job(claimed.id)
    assert job.cost_milli == 469  # a quarter of 1875, rounded up: the steps it ran
    quota = await shapes_core.service.quota(alice())
    assert quota.used == pytest.approx(0.469)


async def test_a_big_training_is_refused_by_the_daily_quota_up_front(shapes_core: Core) -> None:
    shapes_core.settings.teach.max_steps = 100_000
    with pytest.raises(QuotaExceeded, match=r"this job needs 937.5\b|fewer --steps"):
        await shapes_core.teach.submit(alice(), TeachCommand("zorb", steps=100_000), teaching_pictures(3))


async def test_slices_interleave_with_generation_on_the_fair_queue(shapes_core: Core) -> None:
    """alice's training, then bob's picture and alice's own picture: after each slice both pictures go
    first (bob's: he was served longer ago; alice's: her pictures go before her training)."""
    queue, parser = shapes_core.queue, shapes_core.parser
    training = (await shapes_core.teach.submit(alice(), TeachCommand("zorb", steps=40), teaching_pictures(3))).job
    [first] = await queue.claim_batch("w:1", 1, train=True)
    assert first.id == training.id
    bobs = (await shapes_core.service.submit(bob(), parser.parse("/imagine a red circle"))).job
    alices = (await shapes_core.service.submit(alice(), parser.parse("/imagine a blue circle"))).job
    assert await queue.requeue_slice(training.id, "w:1", step=20, loss=0.3, eta_s=10.0)
    order = [batch[0].id for batch in [await queue.claim_batch("w:1", 1, train=True) for _ in range(3)]]
    assert order == [bobs.id, alices.id, training.id]


async def test_a_worker_that_does_not_train_leaves_trainings_to_others(shapes_core: Core) -> None:
    await shapes_core.teach.submit(alice(), TeachCommand("zorb"), teaching_pictures(3))
    assert await shapes_core.queue.claim_batch("w:1", 4, train=False) == []
    assert len(await shapes_core.queue.claim_batch("w:2", 4, train=True)) == 1


async def test_a_killed_workers_slice_goes_back_to_the_queue_with_its_step(shapes_core: Core) -> None:
    await shapes_core.teach.submit(alice(), TeachCommand("zorb", steps=40), teaching_pictures(3))
    queue = shapes_core.queue
    [job] = await queue.claim_batch("w:1", 1, train=True)
    assert await queue.requeue_slice(job.id, "w:1", step=20, loss=0.3, eta_s=10.0)
    await queue.claim_batch("host-gone:1", 1, train=True)
    report = await queue.requeue_abandoned(is_dead=lambda worker: worker == "host-gone:1")
    assert report.requeued == [job.id]
    assert (await shapes_core.service.get_job(job.id)).progress_step == 20


def test_the_grammar_reads_teach_and_its_moderation() -> None:
    parser = CommandParser.from_settings(Settings())
    assert parser.parse("/teach mascot --steps 300 --rank 8 --trigger mzk a photo of mzk") == TeachCommand(
        "mascot", steps=300, rank=8, trigger="mzk", caption="a photo of mzk")
    with pytest.raises(InvalidCommand, match=r"unknown flag --stps .*did you mean --steps"):
        parser.parse("/teach mascot --stps 3")
    with pytest.raises(InvalidCommand, match="--steps takes a whole number"):
        parser.parse("/teach mascot --steps many")
    with pytest.raises(InvalidCommand, match="/teach needs a name first"):
        parser.parse("/teach --steps 3")
    with pytest.raises(InvalidCommand, match="holds no /"):
        parser.parse("/imagine a circle <lora:trained/u1/zorb>")  # nobody names another's file


async def test_a_moderator_lists_and_deletes_a_trained_word(shapes_core: Core) -> None:
    result = await shapes_core.teach.submit(alice(), TeachCommand("zorb", steps=10), teaching_pictures(3))
    [job] = await shapes_core.queue.claim_batch("w:1", 1, train=True)
    path = shapes_core.settings.storage.loras / "trained" / "u1" / "zorb.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a LoRA")  # what the worker writes before it completes the job, here and in the store
    shapes_core.store.put_lora("trained/u1/zorb", b"a LoRA")
    assert await shapes_core.queue.complete(job.id, [], worker_id="w:1")
    moderation, parser = shapes_core.moderation, shapes_core.parser
    with pytest.raises(Refused, match="/mod is for moderators"):
        await moderation.handle(bob(), parser.parse("/mod trained delete zorb"))
    listing = await moderation.handle(moderator(), parser.parse("/mod trained"))
    assert "zorb  by console:alice, trigger 'zorb', rank 4, 3 pictures: succeeded" in listing
    answer = await moderation.handle(moderator(), parser.parse("/mod trained delete zorb console:alice"))
    assert answer == "Deleted the trained word 'zorb'." and not path.exists()
    with pytest.raises(NotFound):
        shapes_core.store.read_lora("trained/u1/zorb")
    assert await moderation.handle(moderator(), parser.parse("/mod trained")) == "Nobody has trained a word yet."
    await shapes_core.teach.submit(alice(), TeachCommand("zorb"), teaching_pictures(3))  # the name is free again
    assert result.job.id != (await shapes_core.service.list_jobs())[0].id


async def test_a_training_cancelled_between_slices_leaves_no_checkpoint(shapes_core: Core) -> None:
    cancelled = (await shapes_core.teach.submit(alice(), TeachCommand("zorb"), teaching_pictures(3))).job
    going_on = (await shapes_core.teach.submit(bob(), TeachCommand("zorb"), teaching_pictures(3))).job
    worker = build_worker(shapes_core)
    for job in (cancelled, going_on):  # as a slice leaves them
        shapes_core.store.put_job_file(job.id, "checkpoint.pt", b"state")
    await shapes_core.service.cancel(alice(), cancelled.id)
    await worker._upkeep(prune=True)
    assert not worker.trainer.has_checkpoint(cancelled.id) and worker.trainer.has_checkpoint(going_on.id)
