"""/animate: a clip whose frames each move and redraw the one before. What the shipped builtin:shapes
model makes of it through a real console chat (real SQLite, the real worker, the MP4 decoded back with
PyAV), a worker killed mid-clip and its successor resuming, and the grammar, cost and limits."""

from __future__ import annotations

import asyncio
import io
import itertools
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import av
import numpy as np
import PIL.Image
import PIL.ImageSequence
import pytest

from adapters.console import ConsoleChat, split_attachments
from bot.animation import CLIP_NAME, camera_move, frames_done, keyframes, prompt_at
from bot.bootstrap import Core, open_core
from bot.config import LimitsConfig, ModelConfig, Settings, load_settings
from bot.domain import GenerationParams, InputImages, JobKind, JobStatus, Motion, Requester
from bot.errors import InvalidCommand
from bot.grammar import CommandParser
from bot.policy import describe_quota
from bot.views import JobView
from generation.animation import gif_bytes
from generation.pipelines import DiffusersGenerator
from generation.shapes import COLOURS, Scene, draw
from generation.worker import Worker
from tests.conftest import alice

SHAPES = {"shapes": ModelConfig(source="builtin:shapes", default_width=64, default_height=64)}


@pytest.fixture(scope="module")
def shapes(models_dir: Path) -> DiffusersGenerator:
    return DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=models_dir)


@pytest.fixture
async def shapes_core(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Core]:
    """The core with builtin:shapes as its one model (conftest pins other tests to builtin:tiny)."""
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "shapes")
    monkeypatch.setenv("EASEL_MODELS", '{"shapes": {"source": "builtin:shapes", "default_width": 64, '
                                       '"default_height": 64}}')
    settings: Settings = load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir},
                                       generation={"progress_every_s": 0, "poll_interval_ms": 50})
    core = await open_core(settings)
    try:
        yield core
    finally:
        await core.close()


async def chat(core: Core, generator: DiffusersGenerator, line: str, out_dir: Path) -> tuple[str, JobView | None]:
    """Type one line into a console chat (results copied to `out_dir`) while a burst worker drains the queue."""
    out = io.StringIO()
    handled = asyncio.create_task(ConsoleChat(core, out, requester=alice(), output_dir=out_dir,
                                              progress=False).handle(line))
    while not handled.done():
        await Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1").run(burst=True)
        await asyncio.sleep(0.01)
    return out.getvalue(), handled.result()


def decoded(video: Path | bytes) -> list[np.ndarray]:
    """Every frame of a video file (or its bytes), as RGB arrays."""
    with av.open(io.BytesIO(video) if isinstance(video, bytes) else str(video)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        return [frame.to_ndarray(format="rgb24").astype(np.int16) for frame in container.decode(video=0)]


def share(frame: np.ndarray, colour: str) -> float:
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    nearest = ((frame.astype(np.float32)[..., None, :] - palette) ** 2).sum(-1).argmin(-1)
    return float((nearest == list(COLOURS).index(colour)).mean())


# -- what the model makes ------------------------------------------------------------------------------------


async def test_twelve_frames_decode_to_twelve_that_drift_a_little_at_a_time(
        shapes_core: Core, shapes: DiffusersGenerator, tmp_path: Path) -> None:
    text, job = await chat(shapes_core, shapes, "/animate a red circle on a blue background --frames 12 --fps 6 "
                                                "--zoom 1.04 --pan 1,0 --steps 10 --seed 3", tmp_path / "out")
    assert job is not None and job.status is JobStatus.SUCCEEDED, text
    [video] = (tmp_path / "out").glob("*.mp4")
    [gif] = (tmp_path / "out").glob("*.gif")
    assert f"video  {video}  (12 frames at 6 fps" in text and f"gif    {gif}" in text
    frames = decoded(video)
    with PIL.Image.open(gif) as animation:  # the same clip, as a GIF that loops, for image viewers
        assert (animation.n_frames, animation.size, animation.info["loop"]) == (12, (64, 64), 0)
        gif_frames = [np.asarray(frame.convert("RGB"), dtype=np.int16)
                      for frame in PIL.ImageSequence.Iterator(animation)]
        assert animation.info["duration"] == 170  # 1/6 s, in GIF's hundredths
    assert all(np.abs(ours - theirs).mean() < 8 for ours, theirs in zip(gif_frames, frames, strict=True))
    assert len(frames) == 12 and frames[0].shape == (64, 64, 3)
    steps = [float(np.abs(after - before).mean()) for before, after in itertools.pairwise(frames)]
    whole_way = float(np.abs(frames[-1] - frames[0]).mean())
    assert all(0.5 < step < 25 for step in steps), steps  # every frame moves, none jumps
    assert whole_way > 2 * max(steps), (whole_way, steps)  # and they add up to a journey
    assert share(frames[0], "red") + share(frames[0], "blue") > 0.85  # the prompt, drawn
    assert share(frames[-1], "red") > share(frames[0], "red")  # the camera moved in on the circle


async def test_keyframes_change_the_subject_over_time(shapes_core: Core, shapes: DiffusersGenerator,
                                                      tmp_path: Path) -> None:
    _, job = await chat(shapes_core, shapes, "/animate 0: a red circle on a blue background | 4: a yellow square on "
                                             "a green background --frames 12 --strength 0.6 --steps 10 --seed 5",
                        tmp_path / "out")
    assert job is not None and job.status is JobStatus.SUCCEEDED
    frames = decoded(shapes_core.store.read_job_file(job.id, CLIP_NAME))
    assert share(frames[0], "blue") > 0.4 and share(frames[0], "green") < 0.1
    assert share(frames[-1], "green") > 0.4 and share(frames[-1], "blue") < 0.1


def test_a_killed_animation_resumes_at_its_last_frame_and_ends_with_all_frames(tmp_path: Path,
                                                                               models_dir: Path) -> None:
    env = {**os.environ, "EASEL_STORAGE__DATA_DIR": str(tmp_path / "data"),
           "EASEL_STORAGE__MODELS_DIR": str(models_dir), "EASEL_GENERATION__PROGRESS_EVERY_S": "0"}
    frames = 8
    clip = f"a slow clip --frames {frames} --size 128x128 --steps 20 --seed 2"
    process = subprocess.Popen([sys.executable, "-m", "adapters.cli", "animate", clip, "-o", str(tmp_path / "out")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "data" / "images" / "jobs"  # the folder store's job files
    deadline = time.monotonic() + 240
    kept: list[Path] = []
    while len(kept) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
        kept = sorted(folder.glob("*/frame-????.png")) if folder.exists() else []
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = sorted(folder.glob("*/frame-????.png"))
    assert 3 <= len(kept) < frames, f"{len(kept)} frames when killed"
    before = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in kept}

    # A worker on the same host takes the dead one's job back and finishes it from where it stopped.
    resumed = subprocess.run([sys.executable, "-m", "adapters.cli", "worker", "--burst"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    job_id = kept[0].parent.name
    stored = sorted((folder / job_id).glob("frame-????.png"))
    assert [path.name for path in stored] == [f"frame-{i:04d}.png" for i in range(frames)]
    # The frames made before the kill were not made again: the successor started after the last one.
    assert {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in stored[:len(kept)]} == before
    assert len(decoded(folder / job_id / CLIP_NAME)) == frames
    listing = subprocess.run([sys.executable, "-m", "adapters.cli", "job", job_id], env=env, capture_output=True,
                             text=True, timeout=120).stdout
    assert f"Job {job_id}: succeeded" in listing and "attempts  2" in listing


async def test_a_flagged_frame_withholds_the_whole_clip(core: Core, generator, flag_all_checker,
                                                        tmp_path: Path) -> None:
    out = io.StringIO()
    console = ConsoleChat(core, out, requester=alice(), output_dir=tmp_path / "out", progress=False)
    result = await console.submit(core.parser.parse("/animate a cat --frames 3 --steps 4 --seed 1"), InputImages())
    await Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1",
                 image_checker=flag_all_checker).run(burst=True)
    job = await console.follow(result.job)
    assert job.status is JobStatus.SUCCEEDED and core.deliveries.of_job(job).images == ()
    assert "withheld" in out.getvalue() and "video" not in out.getvalue()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # nothing handed over


async def test_a_cancelled_clip_loses_its_frames_and_a_finished_or_waiting_one_keeps_them(core: Core,
                                                                                       generator) -> None:
    line = core.parser.parse("/animate a fox --frames 4 --steps 4")
    finished, cancelled, waiting = [(await core.service.submit(alice(), line)).job for _ in range(3)]
    for job in (finished, cancelled, waiting):  # what a worker stored before each stopped
        core.store.put_job_file(job.id, "frame-0000.png", b"a frame")
    [claimed] = await core.queue.claim_batch("test-worker:1", 1)
    assert claimed.id == finished.id and await core.queue.complete(finished.id, [], worker_id="test-worker:1")
    await core.service.cancel(alice(), cancelled.id)
    await Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:2")._upkeep(prune=True)
    assert core.store.job_file_names(cancelled.id) == []  # nobody will resume or serve it
    assert core.store.job_file_names(finished.id) == core.store.job_file_names(waiting.id) == ["frame-0000.png"]


# -- the camera, the words, the cost -------------------------------------------------------------------------


def test_a_gif_too_large_for_its_bound_is_made_smaller_not_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    # Noise is GIF's worst case: about a byte a pixel. The bound is lowered from its 8 MiB so that the same
    # halving shows on 128-pixel frames (the 512-pixel clip it was made for takes seconds to encode twice).
    noise = np.random.default_rng(0).integers(0, 256, (12, 128, 128, 3), dtype=np.uint8)
    frames = [PIL.Image.fromarray(frame) for frame in noise]
    monkeypatch.setattr("generation.animation.GIF_MAX_BYTES", 100_000)  # 12 x 128 x 128 is over, 12 x 64 x 64 fits
    gif = gif_bytes(frames, fps=8)
    assert gif is not None and len(gif) <= 100_000
    with PIL.Image.open(io.BytesIO(gif)) as animation:
        assert animation.n_frames == 12 and animation.size == (64, 64)  # halved once, every frame kept
    monkeypatch.setattr("generation.animation.GIF_MAX_BYTES", 10_000)  # over even at 64 pixels a side
    assert gif_bytes(frames, fps=8) is None


def test_the_camera_moves_the_frame_and_fills_what_comes_in_from_its_edges() -> None:
    from PIL import Image

    frame = Image.new("RGB", (64, 64), (0, 0, 255))
    frame.paste((255, 0, 0), (24, 24, 40, 40))
    panned = np.asarray(camera_move(frame, Motion(pan=(8.0, 0.0))))
    assert tuple(panned[32, 36]) == (255, 0, 0) and tuple(panned[32, 28]) == (0, 0, 255)  # 8 px right
    assert tuple(panned[32, 2]) == (0, 0, 255)  # the left edge carried in, not black
    zoomed = np.asarray(camera_move(frame, Motion(zoom=1.25)))
    assert (zoomed == (255, 0, 0)).all(-1).sum() > (np.asarray(frame) == (255, 0, 0)).all(-1).sum()
    turned = np.asarray(camera_move(frame, Motion(rotate=10.0)))
    assert tuple(turned[0, 0]) == (0, 0, 255)  # the uncovered corner is not black


def test_progress_says_which_frame_an_animation_is_at() -> None:
    params = GenerationParams(JobKind.ANIMATE, "a fox", steps=20, strength=0.35, motion=Motion(frames=12))
    # 20 steps make frame 1; each further frame takes 20 x 0.35 = 7; the clip is 97 steps.
    assert [frames_done(params, step) for step in (0, 19, 20, 26, 27, 90, 97)] == [0, 0, 1, 1, 2, 11, 12]


def test_keyframes_are_read_in_order_and_checked() -> None:
    frames = keyframes("0: a forest | 12: a city")
    assert [prompt_at(frames, i) for i in (0, 11, 12, 30)] == ["a forest", "a forest", "a city", "a city"]
    assert keyframes("a 16:9 castle | tall") == [(0, "a 16:9 castle | tall")]  # not keyframed: one prompt
    with pytest.raises(InvalidCommand, match="after keyframe 12"):
        keyframes("0: a forest | 12: a city | 6: a lake")
    with pytest.raises(InvalidCommand, match="FRAME: PROMPT parts"):
        keyframes("0: a forest | a city")


@pytest.fixture
def parser() -> CommandParser:
    return CommandParser(LimitsConfig(), SHAPES, "shapes", "euler")


@pytest.mark.parametrize(("text", "error"), [
    ("/animate a fox --frames 100", "--frames must be a whole number from 2 to 48 (got 100)"),
    ("/animate a fox --fps 60", "--fps must be a whole number from 1 to 24 (got 60)"),
    ("/animate a fox --zoom 2", "--zoom must be a number from 0.8 to 1.25 (got 2)"),
    ("/animate a fox --pan 3", "--pan must be DX,DY"),
    ("/animate a fox --rotate 90", "--rotate must be a number from -15 to 15 (got 90)"),
    ("/animate a fox --n 2", "/animate makes one clip; leave out --n"),
    ("/animate a fox --size 1024x1024", "/animate frames may have at most 262144 pixels"),
    ("/animate 0: a fox | 12: a hen", "keyframe 12 is past the clip's last frame, 11 (--frames 12)"),
    ("/imagine a fox --frames 12", "--frames is for /animate; /imagine leaves it out"),
])
def test_animate_flags_are_checked_before_anything_is_queued(parser: CommandParser, text: str, error: str) -> None:
    with pytest.raises(InvalidCommand) as raised:
        parser.parse(text)
    assert error in raised.value.message


async def test_an_animation_costs_its_frames(core: Core) -> None:
    clip = core.parser.parse("/animate a fox --frames 12 --steps 20 --strength 0.35")
    still = core.parser.parse("/imagine a fox --steps 20")
    console = Requester(platform="console", user_id="alice")
    # A unit is 512x512 at 20 steps; the clip runs frame 0's 20 steps, then 20 x 0.35 = 7 for each of 11 more.
    unit = 512 * 512 * 20
    assert (await core.service.quota(console, clip)).cost == math.ceil(64 * 64 * (20 + 11 * 7) * 1000 / unit) / 1000
    assert (await core.service.quota(console, still)).cost == math.ceil(64 * 64 * 20 * 1000 / unit) / 1000
    assert "/animate 64x64, 12 frames, 97 steps in all" in describe_quota(await core.service.quota(console, clip))
    assert clip.params.kind is JobKind.ANIMATE and clip.params.motion == Motion(frames=12, fps=8)


def test_easel_animate_with_an_image_starts_the_clip_from_that_picture(tmp_path: Path, models_dir: Path) -> None:
    start = draw(Scene("yellow", "square", "green", 30, (32, 32)), 64)
    start.save(tmp_path / "start.png")
    env = {**os.environ, "EASEL_STORAGE__DATA_DIR": str(tmp_path / "data"),
           "EASEL_STORAGE__MODELS_DIR": str(models_dir),
           "EASEL_MODELS": '{"shapes": {"source": "builtin:shapes", "default_width": 64, "default_height": 64}}',
           "EASEL_GENERATION__DEFAULT_MODEL": "shapes"}
    made = subprocess.run([sys.executable, "-m", "adapters.cli", "animate", "--image", str(tmp_path / "start.png"),
                           "a yellow square on a green background --frames 3 --steps 4 --seed 1",
                           "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    [folder] = (tmp_path / "data" / "images" / "jobs").iterdir()
    first = np.asarray(PIL.Image.open(folder / "frame-0000.png").convert("RGB"))
    assert np.array_equal(first, np.asarray(start))  # the picture itself opens the clip
    assert len(decoded(folder / CLIP_NAME)) == 3 and "video" in made.stdout


def test_the_console_takes_a_picture_file_for_animate_when_the_first_word_names_one() -> None:
    assert split_attachments("/animate start.png a yellow square --frames 3") == \
        ("/animate a yellow square --frames 3", ["start.png"])
    assert split_attachments("/animate a yellow square --frames 3") == ("/animate a yellow square --frames 3", [])
