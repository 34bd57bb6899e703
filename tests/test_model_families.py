"""SD 1.x, SD 2.x and SDXL models in the checkpoints folder, as diffusers folders and as single files,
running txt2img, img2img and inpaint through the worker `easel serve` runs.

Each family is a tiny model with random weights built offline from its configuration, the way
diffusers' own tests build theirs (generation/builtin.py: builtin:tiny, tiny-sd2, tiny-sdxl). Single
files are those models written in the original checkpoint layout (tests/ldm_checkpoint.py) and read
back by diffusers' real single-file loader.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image, EulerDiscreteScheduler
from PIL import Image

from bot.bootstrap import open_core
from bot.catalog import BUILTIN_MODELS, ModelCatalog, ModelFamily, detect_folder
from bot.config import ModelConfig, load_settings
from bot.domain import GenerationParams, InputImages, JobKind, JobStatus
from bot.store import read_parameters
from generation.builtin import ensure_builtin
from generation.pipelines import DiffusersGenerator, GenerationTask
from generation.worker import build_worker
from tests.conftest import alice, mask_bytes, png_bytes
from tests.ldm_checkpoint import save_single_file

FAMILIES = {"sd1": "tiny", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}  # family -> its tiny built-in recipe


@pytest.fixture(scope="module")
def folders(models_dir: Path) -> dict[str, Path]:
    """Each family's tiny diffusers folder, built once."""
    return {family: ensure_builtin(recipe, models_dir) for family, recipe in FAMILIES.items()}


def test_the_core_knows_each_built_in_models_family_and_size_without_building_it(folders: dict[str, Path]) -> None:
    shipped = ensure_builtin("shapes", Path("unused"))
    for name, folder in [*((FAMILIES[family], folder) for family, folder in folders.items()), ("shapes", shipped)]:
        detected = detect_folder(folder)  # what the files say once built...
        assert (detected.family, detected.side) == (BUILTIN_MODELS[name].family, (BUILTIN_MODELS[name].side,) * 2)


async def test_every_family_runs_txt2img_img2img_and_inpaint_through_one_worker(
        tmp_path: Path, models_dir: Path, folders: dict[str, Path]) -> None:
    settings = load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir},
                             generation={"device": "cpu", "progress_every_s": 0})
    checkpoints = settings.storage.checkpoints
    checkpoints.mkdir(parents=True)
    for family, folder in folders.items():  # diffusers folders dropped in (linked, to spare the copy)
        (checkpoints / f"{family}_model").symlink_to(folder, target_is_directory=True)
    core = await open_core(settings)
    try:
        assert {model.name: model.family for model in core.catalog.list() if model.origin == "checkpoints"} == \
            {f"{family}_model": ModelFamily(family) for family in FAMILIES}
        jobs = {}
        for family in FAMILIES:
            for kind, inputs in (("imagine", None), ("edit", InputImages(png_bytes())),
                                 ("inpaint", InputImages(png_bytes(), mask_bytes()))):
                command = core.parser.parse(f"/{kind} a red fox --model {family}_model --seed 5 --steps 3")
                jobs[family, kind] = (await core.service.submit(alice(), command, inputs)).job.id

        stats = await build_worker(core).run(burst=True)  # the worker `easel serve` and `easel worker` run

        assert stats.succeeded == 9
        done = {key: await core.service.get_job(job_id) for key, job_id in jobs.items()}
    finally:
        await core.close()
    for (family, kind), job in done.items():
        assert job.status is JobStatus.SUCCEEDED, (family, kind, job.error)
        [image] = job.images
        with Image.open(image.path) as png:
            assert png.size == (64, 64)
        assert f"Model: {family}_model" in read_parameters(image.path)
        if kind == "inpaint":  # the mask's black right half is kept exactly
            with Image.open(image.path) as result:
                assert (np.asarray(result.convert("RGB"))[:, 32:] == (200, 30, 30)).all()
        if kind == "imagine":  # the picture diffusers' own pipeline of that family draws
            plain = _plain_diffusers(folders[family], "a red fox", seed=5, steps=3)
            with Image.open(image.path) as result:
                assert np.abs(np.asarray(result.convert("RGB"), np.int16) - plain).max() <= 1, family


def _plain_diffusers(folder: Path, prompt: str, seed: int, steps: int) -> np.ndarray:
    pipe = AutoPipelineForText2Image.from_pretrained(folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=7.0, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image.convert("RGB"), np.int16)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_single_file_checkpoint_draws_what_its_diffusers_folder_draws(
        tmp_path: Path, models_dir: Path, folders: dict[str, Path], family: str) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    save_single_file(folders[family], checkpoints / "single.safetensors", family)
    (checkpoints / "folder").symlink_to(folders[family], target_is_directory=True)
    # A [models.*] table without a source gives the checkpoint of its name settings: here, where to
    # find its parts' configuration offline (else the family's reference model on the hub).
    catalog = ModelCatalog({"single": ModelConfig(config=str(folders[family]))}, checkpoints_dir=checkpoints)
    assert catalog.get("single").family is ModelFamily(family)  # read from the file's header
    generator = DiffusersGenerator(catalog, device="cpu", dtype="float32", cache_dir=models_dir)
    pictures = {}
    for model in ("single", "folder"):
        for kind in (JobKind.IMAGINE, JobKind.EDIT, JobKind.INPAINT):
            params = GenerationParams(kind, "a lighthouse", width=64, height=64, steps=3, model=model, seed=11,
                                      strength=None if kind is JobKind.IMAGINE else 0.8)
            task = GenerationTask(params, init_image=None if kind is JobKind.IMAGINE else Image.new("RGB", (64, 64)),
                                  mask_image=Image.new("L", (64, 64), 255) if kind is JobKind.INPAINT else None)
            [[image]] = generator.generate([task])
            pictures[model, kind] = np.asarray(image)
    for kind in (JobKind.IMAGINE, JobKind.EDIT, JobKind.INPAINT):
        assert np.array_equal(pictures["single", kind], pictures["folder", kind]), kind


def test_a_single_file_without_its_configuration_offline_fails_saying_what_to_set(tmp_path: Path,
                                                                                   models_dir: Path,
                                                                                   folders: dict[str, Path]) -> None:
    data = tmp_path / "data"
    (data / "checkpoints").mkdir(parents=True)
    save_single_file(folders["sd2"], data / "checkpoints" / "loose.safetensors", "sd2")
    env = {**os.environ, "EASEL_STORAGE__DATA_DIR": str(data), "EASEL_STORAGE__MODELS_DIR": str(models_dir),
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # no hub, and nothing cached from it
    result = subprocess.run([sys.executable, "-m", "adapters.cli", "imagine", "a cat --model loose --steps 2",
                             "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert ("could not load loose.safetensors: a single-file SD 2.x checkpoint is described by the configuration "
            "files of stabilityai/stable-diffusion-2-1 on the Hugging Face hub") in result.stdout + result.stderr
    assert "set `config` in the model's [models.*] table to a local diffusers folder" in result.stdout + result.stderr


def test_convert_checkpoint_rewrites_a_pickle_as_safetensors_without_running_it(
        tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    from adapters.cli import main

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    weights = load_file(str(save_single_file(folders["sd1"], tmp_path / "weights.safetensors", "sd1")))
    torch.save({"state_dict": weights, "global_step": 1200}, checkpoints / "oldie.ckpt")  # as training saves it
    marker = tmp_path / "ran"
    torch.save({"state_dict": weights, "callback": _RunsCode(str(marker))}, checkpoints / "trap.ckpt")
    catalog = ModelCatalog({}, checkpoints_dir=checkpoints)
    assert not catalog.get("oldie").usable

    assert main(["convert-checkpoint", str(checkpoints / "oldie.ckpt")]) == 0
    assert main(["convert-checkpoint", str(checkpoints / "trap.ckpt")]) == 2

    said = capsys.readouterr()
    assert f"wrote {checkpoints / 'oldie.safetensors'}" in said.out
    assert "error: trap.ckpt holds more than plain weights" in said.err and "nothing in it ran" in said.err
    assert not marker.exists() and not (checkpoints / "trap.safetensors").exists()
    converted = load_file(str(checkpoints / "oldie.safetensors"))
    assert converted.keys() == weights.keys() and all(torch.equal(converted[k], weights[k]) for k in weights)
    oldie = catalog.get("oldie")  # the converted copy stands in for the pickle of the same name
    assert oldie.usable and oldie.family is ModelFamily.SD1 and oldie.file == "oldie.safetensors"


class _RunsCode:
    """What a malicious pickle holds: unpickling it would call os.system."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))
