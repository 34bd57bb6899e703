"""/outpaint: paint more around a picture. Its grammar, the canvas it lays out, and what the shipped
builtin:shapes model paints in the new border, typed into a real console chat (real SQLite, the real
worker) and through the `easel outpaint` command."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from adapters.console import ConsoleChat
from bot.bootstrap import Core, open_core
from bot.config import LimitsConfig, ModelConfig, Settings, load_settings
from bot.domain import JobKind, JobStatus, OutpaintMargins
from bot.errors import InvalidCommand
from bot.followups import reroll
from bot.grammar import CommandParser
from bot.outpaint import feather_px, feathered_mask, outpaint_canvas, outpaint_layout
from bot.views import JobView
from generation.pipelines import DiffusersGenerator
from generation.shapes import COLOURS, Scene, draw
from generation.worker import Worker
from tests.conftest import alice

SHAPES = {"shapes": ModelConfig(source="builtin:shapes", default_width=64, default_height=64)}
PROMPT = "a red circle on a blue background"


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


async def chat(core: Core, generator: DiffusersGenerator, line: str) -> tuple[str, JobView | None]:
    """Type one line into a console chat while a burst worker drains the queue."""
    out = io.StringIO()
    handled = asyncio.create_task(ConsoleChat(core, out, requester=alice(), progress=False).handle(line))
    while not handled.done():
        await Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1").run(burst=True)
        await asyncio.sleep(0.01)
    return out.getvalue(), handled.result()


def red_circle_on_blue(path: Path) -> PIL.Image.Image:
    picture = draw(Scene("red", "circle", "blue", size=36, centre=(32, 32)))
    picture.save(path)
    return picture


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """The palette name nearest to each pixel."""
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    nearest = ((pixels.astype(np.float32)[..., None, :] - palette) ** 2).sum(-1).argmin(-1)
    return np.asarray(list(COLOURS))[nearest]


def result_of(job: JobView | None) -> np.ndarray:
    assert job is not None and job.status is JobStatus.SUCCEEDED, job
    with PIL.Image.open(job.images[0].path) as image:
        return np.asarray(image.convert("RGB"))


# -- what the model paints ----------------------------------------------------------------------------------


async def test_zoom_2_doubles_each_side_in_the_background_colour_with_the_circle_in_the_middle(
        shapes_core: Core, shapes: DiffusersGenerator, tmp_path: Path) -> None:
    picture = np.asarray(red_circle_on_blue(tmp_path / "circle.png"))
    text, job = await chat(shapes_core, shapes, f"/outpaint {tmp_path / 'circle.png'} {PROMPT} --zoom 2 --seed 1")
    result = result_of(job)
    assert result.shape == (128, 128, 3) and job.params.kind is JobKind.OUTPAINT
    # The old picture is kept pixel for pixel, in the middle: the circle has not moved.
    assert np.array_equal(result[32:96, 32:96], picture)
    assert tuple(result[64, 64]) == COLOURS["red"]
    border = np.ones((128, 128), dtype=bool)
    border[32:96, 32:96] = False
    colours = nearest_colours(result[border])
    assert (colours == "blue").mean() > 0.97, dict(zip(*np.unique(colours, return_counts=True), strict=True))
    assert "Job " in text and str(job.images[0].path) in text


async def test_a_re_roll_paints_the_same_canvas_again_with_a_new_seed(
        shapes_core: Core, shapes: DiffusersGenerator, tmp_path: Path) -> None:
    picture = np.asarray(red_circle_on_blue(tmp_path / "circle.png"))
    _, job = await chat(shapes_core, shapes, f"/outpaint {tmp_path / 'circle.png'} {PROMPT} --up 32 --seed 4")
    assert job is not None
    again = (await reroll(shapes_core.service, alice(), job.id)).job
    await Worker(shapes_core.queue, shapes, shapes_core.store, shapes_core.settings, worker_id="w:1").run(burst=True)
    again = await shapes_core.service.get_job(again.id)
    result = result_of(again)
    assert again.params.kind is JobKind.OUTPAINT and again.params.seed != job.params.seed
    assert (again.init_image_sha, again.mask_image_sha) == (job.init_image_sha, job.mask_image_sha)
    assert result.shape == (96, 64, 3) and np.array_equal(result[32:], picture)


async def test_left_32_widens_only_the_left(shapes_core: Core, shapes: DiffusersGenerator, tmp_path: Path) -> None:
    picture = np.asarray(red_circle_on_blue(tmp_path / "circle.png"))
    _, job = await chat(shapes_core, shapes, f"/outpaint {tmp_path / 'circle.png'} {PROMPT} --left 32 --seed 2")
    result = result_of(job)
    assert result.shape == (64, 96, 3)
    assert np.array_equal(result[:, 32:], picture)  # the picture, unmoved, on the right
    assert (nearest_colours(result[:, :32]) == "blue").mean() > 0.97


async def test_without_a_prompt_an_easel_result_is_outpainted_with_its_own_prompt(
        shapes_core: Core, shapes: DiffusersGenerator, tmp_path: Path) -> None:
    _, original = await chat(shapes_core, shapes, f"/imagine {PROMPT} --no green --seed 3")
    assert original is not None and original.status is JobStatus.SUCCEEDED
    _, job = await chat(shapes_core, shapes, f"/outpaint {original.images[0].path} --up 16 --seed 3")
    assert job is not None and job.status is JobStatus.SUCCEEDED
    assert (job.params.prompt, job.params.negative) == (PROMPT, "green")
    assert result_of(job).shape == (80, 64, 3)

    red_circle_on_blue(tmp_path / "mine.png")  # not an Easel result: nothing to take the prompt from
    text, job = await chat(shapes_core, shapes, f"/outpaint {tmp_path / 'mine.png'} --up 16")
    assert job is None and "error: /outpaint needs a prompt for this picture" in text


def test_easel_outpaint_writes_the_wider_picture(tmp_path: Path, models_dir: Path) -> None:
    """`easel outpaint IMAGE "PROMPT [flags]" -o OUT`, as a user runs it (on builtin:tiny, the fastest)."""
    PIL.Image.new("RGB", (64, 64), (30, 90, 200)).save(tmp_path / "in.png")
    env = {**os.environ, "EASEL_STORAGE__DATA_DIR": str(tmp_path / "data"),
           "EASEL_STORAGE__MODELS_DIR": str(models_dir), "EASEL_GENERATION__PROGRESS_EVERY_S": "0"}
    result = subprocess.run([sys.executable, "-m", "adapters.cli", "outpaint", str(tmp_path / "in.png"),
                             "a lake --right 64 --steps 4 --seed 5", "-o", str(tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [written] = sorted((tmp_path / "out").glob("*.png"))
    assert str(written) in result.stdout
    with PIL.Image.open(written) as image:
        assert image.size == (128, 64)
        assert image.getpixel((10, 10)) == (30, 90, 200)  # the picture, kept, on the left


# -- the canvas --------------------------------------------------------------------------------------------


def test_zoom_over_the_size_limits_shrinks_the_picture_to_fit_and_keeps_it_centred() -> None:
    limits = LimitsConfig(max_side=1024, max_pixels=1024 * 1024)
    layout = outpaint_layout(768, 512, OutpaintMargins(zoom=2), limits)
    # 1536x1024 would be over the limits: the canvas fits them, and the picture stays 1/2 of each side.
    assert layout.canvas == (1024, 680) and layout.picture == (510, 340)
    assert layout.offset == (257, 170)


def test_sides_over_the_size_limits_are_refused_saying_what_fits() -> None:
    with pytest.raises(InvalidCommand, match=r"makes this 768x512 picture 1280x512; the limit is 1024 pixels a side"):
        outpaint_layout(768, 512, OutpaintMargins(left=512), LimitsConfig(max_side=1024))


def test_the_new_border_starts_from_the_pictures_edges_and_fades_in() -> None:
    picture = PIL.Image.new("RGB", (64, 64), (0, 0, 255))
    picture.paste((255, 255, 0), (0, 0, 64, 8))  # a yellow top edge
    canvas, mask = outpaint_canvas(picture, outpaint_layout(64, 64, OutpaintMargins(up=32, left=32), LimitsConfig()))
    pixels, shown = np.asarray(canvas), np.asarray(feathered_mask(mask))
    assert canvas.size == (96, 96) and np.array_equal(pixels[32:, 32:], np.asarray(picture))
    assert pixels[2, 80, 0] > 200 and pixels[2, 80, 2] < 60  # above the yellow edge: yellow, carried up
    assert pixels[80, 2, 2] > 200 and pixels[80, 2, 0] < 60  # left of the blue: blue
    assert (shown[32:, 32:] == 0).all()  # the picture is kept exactly
    ramp = shown[60, 32 - feather_px(96, 96):32][::-1]  # from the seam outwards
    assert ramp[0] < 64 and (np.diff(ramp.astype(int)) >= 0).all() and shown[60, 0] == 255


# -- the grammar --------------------------------------------------------------------------------------------


@pytest.fixture
def parser() -> CommandParser:
    return CommandParser(LimitsConfig(), SHAPES, "shapes", "euler")


@pytest.mark.parametrize(("text", "error"), [
    ("/outpaint a sky", "/outpaint needs --zoom X (1.1 to 4"),
    ("/outpaint a sky --zoom 5", "--zoom must be a number from 1.1 to 4 (got 5)"),
    ("/outpaint a sky --zoom 2 --left 64", "give --zoom or --left, not both"),
    ("/outpaint a sky --left 30", "--left must be a multiple of 8 pixels (got 30); try --left 32"),
    ("/outpaint a sky --left 0", "adds nothing with every side at 0"),
    ("/outpaint a sky --zoom 2 --size 128x128", "leave out --size and --ar"),
    ("/imagine a sky --zoom 2", "--zoom is for /outpaint"),
    ("/edit a sky --down 64", "--down is for /outpaint"),
])
def test_outpaint_flags_are_checked_before_anything_is_queued(parser: CommandParser, text: str, error: str) -> None:
    with pytest.raises(InvalidCommand, match=None) as raised:
        parser.parse(text)
    assert error in raised.value.message


def test_outpaint_parses_its_sides_and_its_own_default_strength(parser: CommandParser) -> None:
    command = parser.parse("/outpaint --left 32 --up 64")
    assert command.params.kind is JobKind.OUTPAINT and command.params.prompt == ""  # the picture's own, later
    assert command.outpaint == OutpaintMargins(left=32, up=64)
    assert command.params.strength == LimitsConfig().default_outpaint_strength
    assert parser.parse("/outpaint a lake --zoom 1.5 --strength 0.9").outpaint == OutpaintMargins(zoom=1.5)
    assert "/outpaint" in parser.help_text() and "--zoom X" in parser.help_text()
