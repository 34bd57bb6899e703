"""builtin:shapes, the shipped model that draws coloured shapes: its data, its checker, and what it draws
through Easel's real generator (txt2img, img2img, inpaint, seeds)."""

from __future__ import annotations

import json
import random
from itertools import combinations
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from bot.config import ModelConfig, Settings
from bot.domain import SAMPLERS, GenerationParams, JobKind
from bot.errors import GenerationFailed
from generation import train_builtin
from generation.builtin import SHIPPED_MODELS, ensure_builtin
from generation.pipelines import DiffusersGenerator, GenerationTask
from generation.shapes import (
    COLOURS,
    SHAPES,
    Scene,
    all_combinations,
    caption,
    describe,
    draw,
    held_out_combinations,
    random_scene,
    training_combinations,
)


@pytest.fixture(scope="module")
def shapes(models_dir: Path) -> DiffusersGenerator:
    """Easel's generator on the shipped model, loaded once for this file."""
    model = ModelConfig(source="builtin:shapes", default_width=64, default_height=64)
    return DiffusersGenerator({"shapes": model}, device="cpu", dtype="float32", cache_dir=models_dir)


def imagine(generator: DiffusersGenerator, prompt: str, seed: int = 1, **changes: object) -> PIL.Image.Image:
    """One picture at Easel's defaults (20 steps, cfg 7, euler) unless `changes` say otherwise."""
    values: dict[str, object] = {"kind": JobKind.IMAGINE, "prompt": prompt, "width": 64, "height": 64,
                                 "model": "shapes", "seed": seed}
    task_images = {key: changes.pop(key) for key in ("init_image", "mask_image") if key in changes}
    [[image]] = generator.generate([GenerationTask(GenerationParams(**(values | changes)),  # type: ignore[arg-type]
                                                   **task_images)])
    return image


def colour_shares(image: PIL.Image.Image) -> dict[str, float]:
    """The share of pixels nearest to each palette colour."""
    pixels = np.asarray(image, dtype=np.float32)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    nearest = ((pixels[:, :, None] - palette) ** 2).sum(-1).argmin(-1)
    return {name: float((nearest == index).mean()) for index, name in enumerate(COLOURS)}


# --- the data generator and the checker --------------------------------------------------------

def test_the_checker_reads_every_training_picture_as_its_caption_says() -> None:
    rng = random.Random(7)
    scenes = [random_scene(rng, all_combinations()) for _ in range(400)]
    misread = [(scene.caption, describe(draw(scene))) for scene in scenes
               if describe(draw(scene)) != scene.description]
    assert misread == []
    assert {scene.shape for scene in scenes} == set(SHAPES) and len({scene.colour for scene in scenes}) == 8


def test_captions_say_what_is_drawn() -> None:
    scene = Scene("orange", "triangle", "blue", size=30, centre=(20, 40))
    assert scene.caption == "an orange triangle on a blue background"
    image = np.asarray(draw(scene))
    assert tuple(image[2, 2]) == COLOURS["blue"] and tuple(image[38, 20]) == COLOURS["orange"]
    assert tuple(image[40, 50]) == COLOURS["blue"]  # right of the triangle: background


def test_held_out_combinations_are_never_trained_but_all_their_pairs_are() -> None:
    held, trained = held_out_combinations(), training_combinations()
    assert 15 <= len(held) <= 30 and not set(held) & set(trained)
    assert all(random_scene(random.Random(seed)).description in trained for seed in range(200))
    for first, second in combinations(range(3), 2):
        trained_pairs = {(combo[first], combo[second]) for combo in trained}
        assert all((combo[first], combo[second]) in trained_pairs for combo in held)


# --- the shipped model, through Easel's generator ----------------------------------------------

def test_shapes_is_shipped_and_is_the_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ensure_builtin("shapes", tmp_path) == SHIPPED_MODELS["shapes"]
    assert list(tmp_path.iterdir()) == []  # nothing is built or trained at run time
    weights = sum(path.stat().st_size for path in SHIPPED_MODELS["shapes"].rglob("*.safetensors"))
    assert weights < 30 * 2**20
    monkeypatch.delenv("EASEL_MODELS")  # conftest pins tests to builtin:tiny; look at the real defaults
    monkeypatch.delenv("EASEL_GENERATION__DEFAULT_MODEL")
    settings = Settings()
    assert settings.generation.default_model == "shapes"
    assert settings.models["shapes"].source == "builtin:shapes" and "tiny" in settings.models


def test_a_red_circle_on_a_blue_background_is_mostly_red_and_blue(shapes: DiffusersGenerator) -> None:
    for seed in (1, 2):
        image = imagine(shapes, "a red circle on a blue background", seed=seed)
        shares = colour_shares(image)
        assert shares["red"] + shares["blue"] > 0.85, shares
        assert shares["blue"] > shares["red"] > 0.08, shares  # a shape on a background, not a flat fill
        assert describe(image)[0::2] == ("red", "blue")


def test_other_prompts_draw_other_pictures(shapes: DiffusersGenerator) -> None:
    image = imagine(shapes, "a yellow square on a black background", seed=1)
    shares = colour_shares(image)
    assert shares["yellow"] + shares["black"] > 0.85 and shares["red"] + shares["blue"] < 0.05, shares


def test_most_held_out_combinations_come_out_right(shapes: DiffusersGenerator) -> None:
    # Combinations the model never saw in training, written the way a user would ask for them.
    wanted = held_out_combinations()[::3]
    right = 0
    for seed, combo in enumerate(wanted):
        right += describe(imagine(shapes, caption(*combo), seed=seed)) == combo
    assert right >= 0.6 * len(wanted), f"{right} of {len(wanted)}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_draws_the_prompt(shapes: DiffusersGenerator, sampler: str) -> None:
    image = imagine(shapes, "a red circle on a blue background", sampler=sampler)
    assert describe(image)[0::2] == ("red", "blue")


def test_the_same_seed_reproduces_byte_for_byte(shapes: DiffusersGenerator) -> None:
    first = imagine(shapes, "a green triangle on a white background", seed=42)
    again = imagine(shapes, "a green triangle on a white background", seed=42)
    other = imagine(shapes, "a green triangle on a white background", seed=43)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_img2img_at_low_strength_keeps_the_background(shapes: DiffusersGenerator) -> None:
    start = draw(Scene("yellow", "square", "green", size=30, centre=(32, 32)))
    prompt = "a red circle on a blue background"
    for seed in (1, 2):
        gentle = imagine(shapes, prompt, seed=seed, kind=JobKind.EDIT, strength=0.15, init_image=start)
        assert describe(gentle).background == "green"
        border = np.ones((64, 64), dtype=bool)
        border[4:-4, 4:-4] = False
        assert np.abs(np.asarray(gentle, np.int16) - np.asarray(start, np.int16))[border].mean() < 30
    redrawn = imagine(shapes, prompt, kind=JobKind.EDIT, strength=1.0, init_image=start)
    assert describe(redrawn)[0::2] == ("red", "blue")  # full strength follows the prompt instead


def test_img2img_recolours_the_shape_it_is_given(shapes: DiffusersGenerator) -> None:
    start = draw(Scene("yellow", "square", "green", size=30, centre=(32, 32)))
    recoloured = imagine(shapes, "a red square on a green background", kind=JobKind.EDIT, strength=0.3,
                         init_image=start)
    assert describe(recoloured) == ("red", "square", "green")


def test_inpainting_the_left_half_repaints_it_and_keeps_the_right_half(shapes: DiffusersGenerator) -> None:
    start = draw(Scene("yellow", "circle", "blue", size=24, centre=(46, 32)))
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    image = imagine(shapes, "a red square on a blue background", kind=JobKind.INPAINT, strength=1.0,
                    init_image=start, mask_image=mask)
    pixels, before = np.asarray(image, np.int16), np.asarray(start, np.int16)
    assert np.abs(pixels[:, 32:] - before[:, 32:]).max() <= 2
    left = colour_shares(image.crop((0, 0, 32, 64)))
    assert left["blue"] + left["red"] > 0.8, left  # the prompt's colours, continuing the background
    assert left["yellow"] < 0.05, left


def test_a_missing_shipped_model_says_how_to_get_it_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SHIPPED_MODELS, "shapes", tmp_path / "gone")
    with pytest.raises(GenerationFailed, match=r"python -m generation\.train_builtin --out .*gone"):
        ensure_builtin("shapes", tmp_path)


# --- the training script -----------------------------------------------------------------------

def test_training_is_reproducible_and_writes_a_model_easel_loads(tmp_path: Path) -> None:
    # A few steps of the real recipe: the same seeds give the same bytes, and the folder is a
    # Stable Diffusion pipeline that Easel's generator runs like any other model.
    for name in ("first", "second"):
        train_builtin.train(tmp_path / name, vae_steps=2, unet_steps=2, images=8, batch=2)
    weights = sorted(path.relative_to(tmp_path / "first") for path in (tmp_path / "first").rglob("*.safetensors"))
    assert [path.parts[0] for path in weights] == ["text_encoder", "unet", "vae"]
    for path in weights:
        assert (tmp_path / "first" / path).read_bytes() == (tmp_path / "second" / path).read_bytes()
    log = json.loads((tmp_path / "first" / "training_log.json").read_text())
    assert set(log["seconds"]) >= {"vae", "unet", "total"} and log["settings"]["unet_steps"] == 2

    model = ModelConfig(source=str(tmp_path / "first"), default_width=64, default_height=64)
    generator = DiffusersGenerator({"shapes": model}, device="cpu", dtype="float32", cache_dir=tmp_path)
    image = imagine(generator, "a red circle on a blue background", steps=2)
    assert image.size == (64, 64)
