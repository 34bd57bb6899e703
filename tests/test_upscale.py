"""The Upscale button with an [upscale] model: the shipped builtin:upscale-x2 on builtin:shapes pictures, its
tiles, the job it makes (real SQLite, the real worker, the real diffusers img2img pass), the parameters
its result keeps, /sdapi/v1/upscalers, and the errors a bad [upscale] model gives at start."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from adapters.cli import main as easel
from adapters.console import ConsoleChat
from bot.bootstrap import Core, open_core
from bot.config import ModelConfig, Settings, UpscaleConfig, load_settings
from bot.domain import JobKind, JobStatus
from bot.errors import ConfigError, GenerationFailed
from bot.followups import reroll, upscale
from bot.store import PARAMETERS_KEY, parse_a1111_parameters
from bot.views import JobView
from generation.pipelines import DiffusersGenerator
from generation.shapes import COLOURS, Scene, draw
from generation.upscale import load_upscaler, upscale_image
from generation.worker import Worker
from tests import http_fixtures
from tests.conftest import alice

SHAPES = {"shapes": ModelConfig(source="builtin:shapes", default_width=64, default_height=64)}
PROMPT = "a red circle on a blue background"
CIRCLE = Scene("red", "circle", "blue", size=36, centre=(32, 32))

server = http_fixtures.server  # on this module's settings below


@pytest.fixture(scope="module")
def upscaler():
    return load_upscaler("builtin:upscale-x2", torch.device("cpu"))


def blurred_edge_pixels(picture: PIL.Image.Image, scene: Scene) -> int:
    """Pixels between the shape's colour and the background's (more than 10% of the way from either):
    the wider the blur along the shape's edge, the more of them."""
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)
    shape, background = (np.asarray(COLOURS[name], dtype=np.float32) for name in (scene.colour, scene.background))
    across = (pixels - background) @ (shape - background) / ((shape - background) @ (shape - background))
    return int(((across > 0.1) & (across < 0.9)).sum())


def near(pixel: np.ndarray, colour: str, within: int = 12) -> bool:
    return bool(np.abs(pixel.astype(int) - np.asarray(COLOURS[colour])).max() <= within)


# -- the model itself ----------------------------------------------------------------------------------------


def test_the_builtin_upscaler_doubles_a_red_circle_on_blue_keeping_its_colours_and_sharper_than_bicubic(
        upscaler) -> None:
    small = draw(CIRCLE)
    bigger = upscale_image(upscaler, small, (128, 128), tile=512, overlap=32)
    bicubic = small.resize((128, 128), PIL.Image.Resampling.BICUBIC)
    pixels = np.asarray(bigger)
    assert bigger.size == (128, 128)
    assert near(pixels[64, 64], "red") and near(pixels[64, 40], "red")  # the circle's centre, and inside it
    for corner in ((4, 4), (4, 123), (123, 4), (123, 123)):
        assert near(pixels[corner], "blue")
    # Sharper: the edge's blur covers fewer pixels than bicubic's, and the picture is nearer the same
    # circle drawn sharp at 128 pixels than bicubic's, or than nearest neighbour's (sharp, but in steps).
    sharp = draw(CIRCLE, 128)
    nearest = small.resize((128, 128), PIL.Image.Resampling.NEAREST)
    assert blurred_edge_pixels(bigger, CIRCLE) < 0.8 * blurred_edge_pixels(bicubic, CIRCLE)
    error = {name: np.square(np.asarray(image, dtype=np.float32) - np.asarray(sharp, dtype=np.float32)).mean()
             for name, image in (("model", bigger), ("bicubic", bicubic), ("nearest", nearest))}
    assert error["model"] < 0.8 * min(error["bicubic"], error["nearest"]), error


def test_tiles_blend_into_the_picture_one_pass_makes(upscaler) -> None:
    # Two scenes side by side, cut to a size no tile layout divides evenly: 120x56.
    pair = np.concatenate([np.asarray(draw(CIRCLE)), np.asarray(draw(Scene("yellow", "triangle", "purple", 30,
                                                                           (28, 34))))], axis=1)
    picture = PIL.Image.fromarray(np.ascontiguousarray(pair[:56, :120]))
    whole = np.asarray(upscale_image(upscaler, picture, (240, 112), tile=2048, overlap=0), dtype=int)
    tiled = np.asarray(upscale_image(upscaler, picture, (240, 112), tile=64, overlap=16), dtype=int)
    assert tiled.shape == whole.shape == (112, 240, 3)
    assert np.abs(tiled - whole).max() <= 1  # rounding alone, seams included


# -- the button, end to end ----------------------------------------------------------------------------------


@pytest.fixture
async def shapes_core(request: pytest.FixtureRequest, tmp_path: Path, models_dir: Path,
                      monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Core]:
    """builtin:shapes as the one model and builtin:upscale-x2 as the upscale model, with the img2img pass's
    strength the test's parameter (0: none) and 64-pixel tiles, so a 128-pixel result takes several."""
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "shapes")
    monkeypatch.setenv("EASEL_MODELS", '{"shapes": {"source": "builtin:shapes", "default_width": 64, '
                                       '"default_height": 64}}')
    settings: Settings = load_settings(
        None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir},
        generation={"progress_every_s": 0, "poll_interval_ms": 50},
        upscale={"model": "builtin:upscale-x2", "denoise": getattr(request, "param", 0.0), "tile": 64,
                 "tile_overlap": 16})
    core = await open_core(settings)
    try:
        yield core
    finally:
        await core.close()


def generator_of(core: Core, models_dir: Path) -> DiffusersGenerator:
    return DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=models_dir,
                              upscale=core.settings.upscale)


async def imagine(core: Core, generator: DiffusersGenerator, line: str) -> JobView:
    out = io.StringIO()
    handled = asyncio.create_task(ConsoleChat(core, out, requester=alice(), progress=False).handle(line))
    while not handled.done():
        await Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1").run(burst=True)
        await asyncio.sleep(0.01)
    job = handled.result()
    assert job is not None and job.status is JobStatus.SUCCEEDED, out.getvalue()
    return job


async def finished(core: Core, generator: DiffusersGenerator, job_id: str) -> JobView:
    await Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1").run(burst=True)
    job = await core.service.get_job(job_id)
    assert job.status is JobStatus.SUCCEEDED, job.error
    return job


def picture_of(job: JobView) -> PIL.Image.Image:
    with PIL.Image.open(job.images[0].path) as image:
        image.load()
        return image


async def test_the_upscale_button_runs_the_model_on_the_picture_and_keeps_hires_parameters(
        shapes_core: Core, models_dir: Path, upscaler) -> None:
    generator = generator_of(shapes_core, models_dir)
    original = await imagine(shapes_core, generator, f"/imagine {PROMPT} --seed 3")
    submitted = await upscale(shapes_core.service, alice(), original.id, 0)
    job = await finished(shapes_core, generator, submitted.job.id)

    result = picture_of(job)
    assert job.params.kind is JobKind.UPSCALE and result.size == (128, 128) and job.params.strength is None
    # The model enlarged the picture as it was made (stored at its own size), and nothing else touched it.
    assert shapes_core.store.open_image(job.init_image_sha).size == (64, 64)
    expected = upscale_image(upscaler, picture_of(original), (128, 128), tile=512, overlap=32)
    assert np.abs(np.asarray(result, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    fields = parse_a1111_parameters(result.info[PARAMETERS_KEY])
    assert (fields["Hires upscale"], fields["Hires upscaler"]) == ("2", "builtin:upscale-x2")
    assert (fields["Size-1"], fields["Seed"], fields["Prompt"]) == ("128", str(original.images[0].seed), PROMPT)

    # A re-roll upscales the same stored picture again.
    again = await finished(shapes_core, generator, (await reroll(shapes_core.service, alice(), job.id)).job.id)
    assert again.params.kind is JobKind.UPSCALE and again.init_image_sha == job.init_image_sha
    assert picture_of(again).size == (128, 128)


@pytest.mark.parametrize("shapes_core", [0.3], indirect=True)
async def test_with_denoise_an_img2img_pass_in_tiles_redraws_the_upscale_in_the_same_colours(
        shapes_core: Core, models_dir: Path, upscaler) -> None:
    generator = generator_of(shapes_core, models_dir)
    original = await imagine(shapes_core, generator, f"/imagine {PROMPT} --seed 3")
    job = await finished(shapes_core, generator, (await upscale(shapes_core.service, alice(), original.id, 0)).job.id)

    result = np.asarray(picture_of(job), dtype=int)
    model_only = np.asarray(upscale_image(upscaler, picture_of(original), (128, 128), tile=512, overlap=32), dtype=int)
    assert job.params.kind is JobKind.UPSCALE and job.params.strength == 0.3 and result.shape == (128, 128, 3)
    assert np.abs(result - model_only).mean() > 1  # redrawn...
    palette = np.asarray(list(COLOURS.values()))
    nearest = [np.abs(pixels[..., None, :] - palette).sum(-1).argmin(-1) for pixels in (result, model_only)]
    assert (nearest[0] == nearest[1]).mean() > 0.95  # ...in the same colours, the circle where it was


# -- configuration and /sdapi/v1/upscalers --------------------------------------------------------------------


def test_a_bad_upscale_model_is_a_one_line_error_when_the_configuration_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "realesr-general-x4v3.safetensors"
    for model, says in ((str(missing), f"model file {missing} does not exist; fix the path or use builtin:upscale-x2"),
                        ("builtin:upscale-x3", "'builtin:upscale-x3' is not a built-in upscale model"),
                        (str(tmp_path / "4x.pth"), "4x.pth is a pickle checkpoint (.pth)"),
                        (str(tmp_path / "4x.onnx"), "is neither builtin:upscale-x2 nor a .safetensors file")):
        with pytest.raises(ConfigError, match="upscale: .*" + says.replace("(", r"\(").replace(")", r"\)")[:40]):
            load_settings(None, upscale={"model": model})
    with pytest.raises(ConfigError, match="tile_overlap = 256 must be less than half of tile = 512"):
        load_settings(None, upscale={"tile_overlap": 256})

    config = tmp_path / "easel.toml"
    config.write_text(f'[upscale]\nmodel = "{missing}"\n', encoding="utf-8")
    assert easel(["config", "check", str(config)]) == 2
    problem = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  ")]
    assert problem == [f"  upscale: model file {missing} does not exist; fix the path or use builtin:upscale-x2"]


def test_a_file_that_is_not_an_upscale_model_stops_the_worker_at_start(tmp_path: Path, models_dir: Path) -> None:
    other = tmp_path / "not-esrgan.safetensors"
    save_file({"conv_first.weight": torch.zeros(64, 3, 3, 3)}, other)
    with pytest.raises(GenerationFailed) as error:
        DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=models_dir,
                           upscale=UpscaleConfig(model=str(other)))
    assert "\n" not in error.value.message
    assert error.value.message.startswith(f"upscale model {other} is not a Real-ESRGAN compact (SRVGGNetCompact)")


@pytest.fixture
def settings(tmp_path: Path, models_dir: Path) -> Settings:
    return load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir},
                         http={"port": 0}, upscale={"model": "builtin:upscale-x2"})


async def test_sdapi_upscalers_lists_the_configured_upscale_model(server) -> None:
    async with server.client(await server.new_key()) as client:
        listed = (await client.get("/sdapi/v1/upscalers")).json()
    assert listed == [{"name": "builtin:upscale-x2", "model_name": "SRVGGNetCompact", "model_path": None,
                       "model_url": None, "scale": 2}]
