"""generation/: the built-in model, samplers and the diffusers generator, on the real builtin:tiny."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from bot.config import ModelConfig
from bot.domain import SAMPLERS, GenerationParams, JobKind
from bot.errors import ConfigError, GenerationFailed
from generation.builtin import ensure_builtin
from generation.pipelines import (
    DiffusersGenerator,
    GenerationTask,
    load_pipeline,
    resolve_device_dtype,
)
from generation.samplers import SCHEDULERS, make_scheduler


def params(**changes: object) -> GenerationParams:
    values: dict[str, object] = {"kind": JobKind.IMAGINE, "prompt": "a red fox in the snow", "width": 64,
                                 "height": 64, "steps": 4, "seed": 5}
    return GenerationParams(**(values | changes))  # type: ignore[arg-type]


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def gradient(width: int = 64, height: int = 64) -> PIL.Image.Image:
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 128)], axis=-1)
    return PIL.Image.fromarray(rgb.astype(np.uint8))


def centre_mask(width: int = 64, height: int = 64) -> PIL.Image.Image:
    mask = PIL.Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


# --- txt2img, seeds, batching ------------------------------------------------------------------

def test_txt2img_returns_n_rgb_images_of_the_requested_size(generator: DiffusersGenerator) -> None:
    [images] = generator.generate([GenerationTask(params(width=96, height=64, n=2))])
    assert [(image.mode, image.size) for image in images] == [("RGB", (96, 64))] * 2


def test_same_seed_gives_identical_pixels_and_another_seed_does_not(generator: DiffusersGenerator) -> None:
    [[first]] = generator.generate([GenerationTask(params(seed=11))])
    [[again]] = generator.generate([GenerationTask(params(seed=11))])
    [[other]] = generator.generate([GenerationTask(params(seed=12))])
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 10


def test_image_k_of_a_batch_matches_its_seed_run_alone(generator: DiffusersGenerator) -> None:
    # Each image draws its noise from its own generator, so the batch and the lone run start from the
    # same latents. They are not bit-exact on CPU: batched kernels round differently (about 1e-6 on
    # the 0..1 scale), which flips a handful of 8-bit values by one level.
    [batch, fox] = generator.generate([GenerationTask(params(seed=20, n=2)),
                                       GenerationTask(params(seed=30, prompt="a blue cat", negative="fog"))])
    [[alone]] = generator.generate([GenerationTask(params(seed=21))])
    [[fox_alone]] = generator.generate([GenerationTask(params(seed=30, prompt="a blue cat", negative="fog"))])
    for together, single in ((batch[1], alone), (fox[0], fox_alone)):
        difference = np.abs(pixels(together) - pixels(single))
        assert difference.max() <= 2 and difference.mean() < 0.01


def test_on_step_reports_every_step(generator: DiffusersGenerator) -> None:
    steps: list[tuple[int, int]] = []
    generator.generate([GenerationTask(params(steps=5))], on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(step, 5) for step in range(1, 6)]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs(generator: DiffusersGenerator, sampler: str) -> None:
    [[image]] = generator.generate([GenerationTask(params(sampler=sampler, steps=3))])
    assert image.size == (64, 64) and pixels(image).std() > 5  # a picture, not a NaN-black square


# --- img2img and inpaint -----------------------------------------------------------------------

def test_img2img_runs_only_the_steps_strength_asks_for(generator: DiffusersGenerator) -> None:
    steps: list[tuple[int, int]] = []
    task = GenerationTask(params(kind=JobKind.EDIT, strength=0.5, steps=8, n=2), init_image=gradient())
    [images] = generator.generate([task], on_step=lambda step, total: steps.append((step, total)))
    assert [image.size for image in images] == [(64, 64)] * 2
    assert steps == [(step, 4) for step in range(1, 5)]


def test_inpaint_repaints_the_mask_and_keeps_every_other_pixel(generator: DiffusersGenerator) -> None:
    init, mask = gradient(), centre_mask()
    tasks = [GenerationTask(params(kind=JobKind.INPAINT, strength=1.0, seed=seed), init_image=init,
                            mask_image=mask) for seed in (1, 2)]
    [[first], [second]] = generator.generate(tasks)
    inside = np.asarray(mask) > 0
    assert first.size == (64, 64)
    assert np.array_equal(pixels(first)[~inside], pixels(init)[~inside])
    assert np.abs(pixels(first) - pixels(init))[inside].mean() > 10
    assert np.abs(pixels(first) - pixels(second))[inside].mean() > 10  # the seed decides the repaint


def test_the_job_kinds_share_one_set_of_weights(generator: DiffusersGenerator) -> None:
    generator.warm("tiny")
    generator.generate([GenerationTask(params(kind=JobKind.EDIT, strength=0.5), init_image=gradient())])
    base = generator._pipeline("tiny", JobKind.IMAGINE)
    edit = generator._pipeline("tiny", JobKind.EDIT)
    assert edit.unet is base.unet and edit.vae is base.vae and edit.text_encoder is base.text_encoder
    assert base.unet.dtype == torch.float32


# --- errors ------------------------------------------------------------------------------------

def test_tasks_with_different_batch_keys_are_refused(generator: DiffusersGenerator) -> None:
    with pytest.raises(ValueError, match="batch_key"):
        generator.generate([GenerationTask(params(steps=4)), GenerationTask(params(steps=5))])


@pytest.mark.parametrize(("task", "message"), [
    (GenerationTask(params(seed=None)), "seed"),
    (GenerationTask(params(kind=JobKind.EDIT)), "needs `init_image`"),
    (GenerationTask(params(kind=JobKind.EDIT), init_image=gradient(32, 32)), "must be 64x64"),
    (GenerationTask(params(kind=JobKind.INPAINT), init_image=gradient()), "needs `mask_image`"),
    (GenerationTask(params(model="huge")), "not configured"),
    (GenerationTask(params(width=60)), "divisible by 8"),
])
def test_bad_tasks_are_refused_before_any_work(generator: DiffusersGenerator, task: GenerationTask,
                                               message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generator.generate([task])


@pytest.mark.parametrize(("source", "says"), [
    ("{tmp}/no-such-model", "model folder {tmp}/no-such-model does not exist"),
    ("{tmp}/weights.safetensors", "model file {tmp}/weights.safetensors does not exist"),
    ("builtin:huge", "'builtin:huge' is unknown; the built-in models are: builtin:tiny"),
])
def test_a_missing_model_gives_a_clear_error(tmp_path: Path, source: str, says: str) -> None:
    source = source.format(tmp=tmp_path)
    with pytest.raises(GenerationFailed, match=re.escape(says.format(tmp=tmp_path))):
        load_pipeline(source, "cpu", torch.float32, tmp_path)
    generator = DiffusersGenerator({"gone": ModelConfig(source=source)}, device="cpu", cache_dir=tmp_path)
    with pytest.raises(GenerationFailed, match=r"does not exist|is unknown"):
        generator.generate([GenerationTask(params(model="gone"))])


def test_out_of_memory_retries_one_task_at_a_time(generator: DiffusersGenerator,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = generator._run
    calls: list[int] = []

    def run_small_only(pipe, tasks, on_step):  # type: ignore[no-untyped-def]
        calls.append(len(tasks))
        if len(tasks) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(pipe, tasks, on_step)

    monkeypatch.setattr(generator, "_run", run_small_only)
    results = generator.generate([GenerationTask(params(seed=1)), GenerationTask(params(seed=2, n=2))])
    assert calls == [2, 1, 1] and [len(images) for images in results] == [1, 2]


def test_out_of_memory_alone_says_what_to_lower(generator: DiffusersGenerator,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def always_out_of_memory(pipe, tasks, on_step):  # type: ignore[no-untyped-def]
        raise RuntimeError("MPS backend out of memory")

    monkeypatch.setattr(generator, "_run", always_out_of_memory)
    with pytest.raises(GenerationFailed, match=r"out of memory at 64x64 with 3 image.*lower --size or --n"):
        generator.generate([GenerationTask(params(n=3))])


def test_device_and_dtype_are_resolved_or_refused_with_the_key_to_fix() -> None:
    assert resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match=re.escape("generation.device = 'gpu7'")):
        resolve_device_dtype("gpu7", "auto")
    if not torch.cuda.is_available():
        assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device_dtype("cuda", "auto")


# --- the built-in model and the samplers -------------------------------------------------------

def test_builtin_builds_are_reproducible_and_reused(tmp_path: Path) -> None:
    first, second = ensure_builtin("tiny", tmp_path / "a"), ensure_builtin("tiny", tmp_path / "b")
    weights = sorted(path.relative_to(first) for path in first.rglob("*.safetensors"))
    assert len(weights) == 3
    for relative in weights:
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
    built_at = (first / "model_index.json").stat().st_mtime_ns
    assert ensure_builtin("tiny", tmp_path / "a") == first
    assert (first / "model_index.json").stat().st_mtime_ns == built_at


def test_concurrent_builds_leave_one_whole_folder(tmp_path: Path) -> None:
    folders: list[Path] = []
    threads = [threading.Thread(target=lambda: folders.append(ensure_builtin("tiny", tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(folders)) == 1 and [path.name for path in tmp_path.iterdir()] == [folders[0].name]
    assert (folders[0] / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_builtin_tokenizer_knows_common_words(generator: DiffusersGenerator) -> None:
    tokenizer = generator._pipeline("tiny", JobKind.IMAGINE).tokenizer
    ids = tokenizer("a portrait of a cat, highly detailed").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) < 15  # merges: far fewer tokens than the 36 characters
    assert tokenizer.model_max_length == 77


def test_every_sampler_name_has_a_scheduler(generator: DiffusersGenerator) -> None:
    config = generator._scheduler_configs["tiny"]
    assert set(SCHEDULERS) == set(SAMPLERS)
    assert isinstance(make_scheduler("euler_a", config), EulerAncestralDiscreteScheduler)
    karras = make_scheduler("dpmpp_2m_karras", config)
    assert isinstance(karras, DPMSolverMultistepScheduler) and karras.config.use_karras_sigmas
    assert make_scheduler("euler", config) is not make_scheduler("euler", config)
    with pytest.raises(ValueError, match="`sampler` must be one of euler, euler_a"):
        make_scheduler("k_euler", config)




# --- throughput switches: previews, model eviction ---------------------------------------------

def _generator_with(models_dir: Path, models: dict[str, ModelConfig] | None = None,
                    **options: object) -> DiffusersGenerator:
    from bot.config import GenerationConfig

    models = models or {"tiny": ModelConfig(source="builtin:tiny", default_width=64, default_height=64)}
    return DiffusersGenerator(models, device="cpu", dtype="float32", cache_dir=models_dir,
                              options=GenerationConfig(**options))


def test_previews_come_with_progress_every_few_steps_one_per_job(models_dir: Path) -> None:
    generator = _generator_with(models_dir, previews=True, preview_every_steps=2)
    calls: list[tuple] = []
    tasks = [GenerationTask(params(steps=6, n=2)), GenerationTask(params(steps=6, seed=9))]
    generator.generate(tasks, lambda step, total, previews=None: calls.append((step, total, previews)))
    assert [step for step, _, _ in calls] == [1, 2, 3, 4, 5, 6]
    with_previews = [(step, previews) for step, _, previews in calls if previews is not None]
    assert [step for step, _ in with_previews] == [2, 4]  # never on the last step: the image itself comes
    for _, previews in with_previews:
        assert len(previews) == 2  # one per job, not per image
        for jpeg in previews:
            with PIL.Image.open(io.BytesIO(jpeg)) as preview:
                assert preview.format == "JPEG" and preview.size == (16, 16)  # the 16x16 latents


def test_previews_are_off_by_default(generator: DiffusersGenerator) -> None:
    calls: list[tuple] = []
    generator.generate([GenerationTask(params(steps=6))], lambda *args: calls.append(args))
    assert all(len(args) == 2 for args in calls)


def test_a_memory_budget_unloads_the_least_recently_used_model(models_dir: Path) -> None:
    tiny = ModelConfig(source="builtin:tiny", default_width=64, default_height=64)
    generator = _generator_with(models_dir, {"a": tiny, "b": tiny}, memory_budget_mb=1)
    [[first]] = generator.generate([GenerationTask(params(model="a"))])
    generator.generate([GenerationTask(params(model="b"))])
    assert generator.loaded_models == ["b"]  # two copies do not fit in 1 MiB: "a" was unloaded
    [[again]] = generator.generate([GenerationTask(params(model="a"))])  # loaded again on demand
    assert generator.loaded_models == ["a"]
    assert np.array_equal(pixels(first), pixels(again))


def test_without_a_budget_every_model_stays_loaded(models_dir: Path) -> None:
    tiny = ModelConfig(source="builtin:tiny", default_width=64, default_height=64)
    generator = _generator_with(models_dir, {"a": tiny, "b": tiny})
    for name in ("a", "b", "a"):
        generator.generate([GenerationTask(params(model=name, steps=2))])
    assert generator.loaded_models == ["b", "a"]


def test_memory_format_and_tiling_switches_still_draw_the_same_picture(generator: DiffusersGenerator,
                                                                      models_dir: Path) -> None:
    switched = _generator_with(models_dir, channels_last=True, vae_tiling=True)
    [[plain]] = generator.generate([GenerationTask(params())])
    [[other]] = switched.generate([GenerationTask(params())])
    assert np.abs(pixels(plain) - pixels(other)).max() <= 2


def test_bad_compile_sizes_are_refused_naming_the_key(models_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"generation\.compile_sizes holds '512'"):
        _generator_with(models_dir, compile_sizes=["512"])


def test_after_the_warm_up_a_compiled_unet_serves_every_batch_size_without_compiling(
        models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With generation.compile, the worker's warm-up compiles what its jobs will need: the first batch of
    several images at a warmed size must not stop for another compile (half a minute on a CPU)."""
    from torch._dynamo.utils import counters

    # Dynamo decides what to trace and when to trace again; the backend only turns each trace into code.
    # The eager backend does that at once, so the test pays for the traces and not for inductor's C++.
    compile_unet = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **_: compile_unet(module, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    try:
        generator = _generator_with(models_dir, compile=True, compile_sizes=["64x64"], max_batch=4)
        generator.warm("tiny")
        compiled = counters["stats"]["unique_graphs"]
        assert compiled >= 1  # the warm-up compiled the UNet
        two_jobs = [GenerationTask(params(n=2, steps=2)), GenerationTask(params(n=2, steps=2, seed=9))]
        for batch in (two_jobs, [GenerationTask(params(n=3, steps=2))], [GenerationTask(params(steps=2))]):
            results = generator.generate(batch)
            assert [len(images) for images in results] == [task.params.n for task in batch]
        assert counters["stats"]["unique_graphs"] == compiled
    finally:
        torch._dynamo.reset()  # no compiled UNet outlives the test
