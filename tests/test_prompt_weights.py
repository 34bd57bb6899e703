"""What the model makes of the prompt syntax: AUTOMATIC1111 weights and long prompts (through prompt
embeddings, generation/prompt_embeds.py) and styles, on the shipped builtin:shapes model, whose
pictures say what they show (generation/shapes.py); and the same encoder on every model family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoPipelineForText2Image

from bot.bootstrap import open_core
from bot.config import ModelConfig, Settings, load_settings
from bot.domain import GenerationParams, JobKind, JobStatus
from generation.builtin import ensure_builtin
from generation.pipelines import DiffusersGenerator, GenerationTask
from generation.prompt_embeds import PromptEncoder
from generation.shapes import COLOURS, describe
from generation.worker import Worker
from tests.conftest import alice

SEEDS = range(4)
# 90 tokens of builtin:shapes' small vocabulary (more than CLIP's 77, so a plain pipeline call would cut it)
# before the words that differ.
LONG_HEAD = "a white square on a blue background, " * 4 + "a white square"


@pytest.fixture(scope="module")
def shapes(models_dir: Path) -> DiffusersGenerator:
    model = ModelConfig(source="builtin:shapes", default_width=64, default_height=64)
    return DiffusersGenerator({"shapes": model}, device="cpu", dtype="float32", cache_dir=models_dir)


@pytest.fixture
def shapes_settings(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings whose one model is builtin:shapes (conftest pins other tests to builtin:tiny)."""
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "shapes")
    monkeypatch.setenv("EASEL_MODELS", '{"shapes": {"source": "builtin:shapes", "default_width": 64, '
                                       '"default_height": 64}}')
    (tmp_path / "data").mkdir()
    return load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir},
                         generation={"progress_every_s": 0})


def imagine(generator: DiffusersGenerator, *prompts: str, seed: int = 1, negative: str = "") -> list[PIL.Image.Image]:
    """One picture per prompt, all in one batch, at Easel's defaults (20 steps, cfg 7)."""
    tasks = [GenerationTask(GenerationParams(JobKind.IMAGINE, prompt, negative=negative, width=64, height=64,
                                             model="shapes", seed=seed)) for prompt in prompts]
    return [images[0] for images in generator.generate(tasks)]


def share(image: PIL.Image.Image, colour: str) -> float:
    """The share of pixels nearest to `colour` among the palette's colours."""
    pixels = np.asarray(image, dtype=np.float32)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    nearest = ((pixels[:, :, None] - palette) ** 2).sum(-1).argmin(-1)
    return float((nearest == list(COLOURS).index(colour)).mean())


# -- weights -------------------------------------------------------------------------------------------


def test_weight_one_is_the_plain_prompt_and_other_weights_change_the_picture(shapes: DiffusersGenerator) -> None:
    # One call each: a batch's rows may differ in the last bit from the same image made alone.
    [plain], [weight_one], [stronger] = (imagine(shapes, prompt) for prompt in (
        "a red circle on a blue background", "a (red:1.0) circle on a blue background",
        "a (red:1.5) circle on a blue background"))
    assert weight_one.tobytes() == plain.tobytes()  # the brackets are syntax, not words the model reads
    assert stronger.tobytes() != plain.tobytes()


def test_more_attention_on_a_colour_paints_more_of_it(shapes: DiffusersGenerator) -> None:
    for seed in SEEDS:
        plain, more, less = imagine(shapes, "a red circle on a blue background",
                                    "a red circle on a (blue:1.5) background",
                                    "a red circle on a [[blue]] background", seed=seed)
        assert describe(more) == describe(plain) == ("red", "circle", "blue")
        assert share(more, "blue") > share(plain, "blue") + 0.02 > share(less, "blue") + 0.02, seed


def test_a_weighted_negative_prompt_is_read_too(shapes: DiffusersGenerator) -> None:
    [plain] = imagine(shapes, "a red circle on a blue background", negative="green")
    [weighted] = imagine(shapes, "a red circle on a blue background", negative="(green:1.0)")
    [stronger] = imagine(shapes, "a red circle on a blue background", negative="(green:1.8)")
    assert weighted.tobytes() == plain.tobytes() and stronger.tobytes() != plain.tobytes()


# -- long prompts ----------------------------------------------------------------------------------------


def test_a_long_prompt_is_read_to_its_end(shapes: DiffusersGenerator) -> None:
    pipe = shapes._pipeline("shapes", JobKind.IMAGINE)
    assert len(pipe.tokenizer(LONG_HEAD)["input_ids"]) > 77  # cut here, the endings below would be lost
    for seed in (1, 2):
        black, yellow = imagine(shapes, f"{LONG_HEAD} on a black background", f"{LONG_HEAD} on a yellow background",
                                seed=seed)
        change = np.abs(np.asarray(black, dtype=np.int16) - np.asarray(yellow, dtype=np.int16))
        assert change.mean() > 5, seed  # not a rounding difference: the picture changed


def test_break_ends_a_chunk_and_both_parts_are_drawn(shapes: DiffusersGenerator) -> None:
    for seed in SEEDS:
        [image] = imagine(shapes, "a white square BREAK on a black background", seed=seed)
        assert describe(image).background == "black", seed


def test_a_batch_of_short_and_long_prompts_draws_each_as_it_draws_alone(shapes: DiffusersGenerator) -> None:
    short, long = "a red circle on a blue background", f"{LONG_HEAD} on a black background"
    together = imagine(shapes, short, long, short)
    for image, prompt in zip(together, (short, long, short), strict=True):
        [alone] = imagine(shapes, prompt)
        # The same picture but for a batch's last-bit noise; padded to the long prompt's two chunks, the
        # short ones would have changed.
        assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(alone, dtype=np.int16)).max() <= 2


# -- styles, end to end -----------------------------------------------------------------------------------


async def test_a_style_changes_the_background_as_its_text_says(shapes_settings: Settings,
                                                                shapes: DiffusersGenerator) -> None:
    shapes_settings.storage.styles_path.write_text("name,prompt,negative_prompt\n"
                                     "night,{prompt} on a black background,\n"
                                     "meadow,{prompt} on a green background,\n", encoding="utf-8")
    core = await open_core(shapes_settings)
    try:
        for style in ("night", "meadow"):
            for seed in (1, 2):
                await core.service.submit(alice(), core.parser.parse(
                    f"/imagine a white square --style {style} --seed {seed}"))  # type: ignore[arg-type]
        await Worker(core.queue, shapes, core.store, core.settings, worker_id="test:1").run(burst=True)
        jobs = await core.service.list_jobs()
        assert len(jobs) == 4 and all(job.status is JobStatus.SUCCEEDED for job in jobs)
        for job in jobs:
            background = "black" if job.params.prompt.endswith("black background") else "green"
            assert job.params.prompt == f"a white square on a {background} background"
            assert describe(PIL.Image.open(job.images[0].path)).background == background
    finally:
        await core.close()


async def test_a_permutation_draws_each_combination(shapes_settings: Settings, shapes: DiffusersGenerator) -> None:
    core = await open_core(shapes_settings)
    try:
        await core.service.submit(alice(), core.parser.parse(  # type: ignore[arg-type]
            "/imagine a {red, yellow} square on a {blue, black} background --seed 3"))
        await Worker(core.queue, shapes, core.store, core.settings, worker_id="test:1").run(burst=True)
        drawn = {describe(PIL.Image.open(job.images[0].path)) for job in await core.service.list_jobs()}
    finally:
        await core.close()
    assert drawn == {("red", "square", "blue"), ("red", "square", "black"), ("yellow", "square", "blue"),
                     ("yellow", "square", "black")}


# -- every family -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["tiny", "tiny-sd2", "tiny-sdxl"])
def test_every_family_reads_weights_and_long_prompts(models_dir: Path, recipe: str) -> None:
    pipe = AutoPipelineForText2Image.from_pretrained(ensure_builtin(recipe, models_dir))
    pipe.set_progress_bar_config(disable=True)
    encoder = PromptEncoder(pipe)
    plain = encoder.encode(["a red fox in the snow"], [""])
    with torch.no_grad():
        expected = pipe.encode_prompt(
            "a red fox in the snow", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt="")
    assert torch.equal(plain["prompt_embeds"], expected[0])  # a plain prompt: the pipeline's own embedding
    assert torch.equal(plain["negative_prompt_embeds"], expected[1])
    if encoder.sdxl:
        assert torch.equal(plain["pooled_prompt_embeds"], expected[2])

    weighted = encoder.encode(["a (red:1.4) fox in the snow"], [""])
    assert not torch.equal(weighted["prompt_embeds"], plain["prompt_embeds"])
    long = "a red fox in the snow, " * 10  # 100 tokens
    assert encoder.chunk_count(long, "") == 2
    both = encoder.encode([long, long + " at night"], ["", "blurry"])
    assert both["prompt_embeds"].shape[:2] == both["negative_prompt_embeds"].shape[:2] == (2, 154)
    images = pipe(**both, num_inference_steps=2, width=64, height=64, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and not np.allclose(images[0], images[1])


def test_long_prompt_embeddings_hold_no_autograd_graph_through_the_call(models_dir: Path) -> None:
    # Padding a long prompt's empty negative computes compel's empty-prompt embedding on first use; with
    # autograd on, every embedding handed to the pipeline would keep a text-encoder graph in memory for
    # the whole generation (on SDXL, both encoders').
    pipe = AutoPipelineForText2Image.from_pretrained(ensure_builtin("tiny", models_dir))
    arguments = PromptEncoder(pipe).encode(["a red fox in the snow, " * 10], [""])
    assert [name for name, embeds in arguments.items() if embeds.requires_grad] == []
