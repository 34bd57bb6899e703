"""Stable Diffusion 1.x through diffusers: load models, run batches of jobs, survive out-of-memory.

The worker hands `DiffusersGenerator.generate` a list of tasks that share `params.batch_key()`; they
become ONE diffusers call, with one CPU random generator per image seeded with that image's seed, so
any image can be reproduced alone from its seed.

Example:
    >>> generator = DiffusersGenerator({"tiny": ModelConfig(source="builtin:tiny")}, cache_dir=tmp)
    >>> params = GenerationParams(JobKind.IMAGINE, "a red fox", width=64, height=64, n=2, seed=7)
    >>> [[first, second]] = generator.generate([GenerationTask(params)])
"""

from __future__ import annotations

import functools
import gc
import io
import logging
import os
import platform
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoPipelineForText2Image,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import deprecation_utils

from bot.catalog import (
    BUILTIN_PREFIX,
    PICKLE_SUFFIXES,
    SINGLE_FILE_SUFFIX,
    CatalogModel,
    ModelCatalog,
    ModelFamily,
    looks_like_local_path,
    pickle_refusal,
)
from bot.config import GenerationConfig, ModelConfig, UpscaleConfig
from bot.domain import SAMPLERS, GenerationParams, JobKind
from bot.errors import ConfigError, GenerationFailed, first_line
from bot.extra_networks import ExtraNetworks
from bot.outpaint import feathered_mask
from bot.workers import DeviceReport
from generation.builtin import ensure_builtin
from generation.extra_networks import ModelNetworks
from generation.prompt_embeds import PromptEncoder
from generation.samplers import make_scheduler
from generation.upscale import Upscaler, load_upscaler, run_tiled, tile_starts, upscale_image

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("data") / "models"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# diffusers renamed `torch_dtype` to `dtype` (huggingface/diffusers#14205); releases before that
# ignore `dtype`, and later ones warn about `torch_dtype`.
DTYPE_KEYWORD = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"

# Per latent family (see _latent_family): SD 1.x and 2.x share Stable Diffusion's pipelines.
PIPELINE_CLASSES: dict[str, dict[JobKind, type[DiffusionPipeline]]] = {
    "sd": {JobKind.IMAGINE: StableDiffusionPipeline, JobKind.EDIT: StableDiffusionImg2ImgPipeline,
           JobKind.INPAINT: StableDiffusionInpaintPipeline, JobKind.OUTPAINT: StableDiffusionInpaintPipeline},
    "sdxl": {JobKind.IMAGINE: StableDiffusionXLPipeline, JobKind.EDIT: StableDiffusionXLImg2ImgPipeline,
             JobKind.INPAINT: StableDiffusionXLInpaintPipeline, JobKind.OUTPAINT: StableDiffusionXLInpaintPipeline},
}
# Where diffusers finds the configuration of a single-file checkpoint's parts when `config` is unset.
REFERENCE_MODELS = {ModelFamily.SD1: "stable-diffusion-v1-5/stable-diffusion-v1-5",
                    ModelFamily.SD2: "stabilityai/stable-diffusion-2-1",
                    ModelFamily.SDXL: "stabilityai/stable-diffusion-xl-base-1.0"}

# on_step(step, total) after each denoising step; with previews on, some calls add a third
# argument: one JPEG preview per task.
StepCallback = Callable[..., None]


@dataclass
class GenerationTask:
    """One job handed to the generator. Image i of the job uses seed `params.seed + i`."""

    params: GenerationParams
    init_image: PIL.Image.Image | None = None  # edit, inpaint, outpaint: RGB, already params.width x height
    mask_image: PIL.Image.Image | None = None  # inpaint, outpaint: mode "L", white = repaint


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Turn `generation.device` and `generation.dtype` into torch values.

    "auto" means CUDA when present, else CPU; the "auto" dtype is float16 on CUDA and float32 elsewhere.
    """
    # 1. Device
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"generation.device = {device!r} is not a device; use auto, cpu, cuda, "
                          f"cuda:1 or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"generation.device = {device!r} but torch sees no CUDA device; use auto or cpu")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"generation.device = {device!r} but there are only "
                          f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"generation.device = {device!r} but MPS is not available here; use auto or cpu")

    # 2. Dtype
    if dtype == "auto":
        return resolved, torch.float16 if resolved.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"generation.dtype = {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return resolved, DTYPES[dtype]


def load_pipeline(
    source: str, device: torch.device | str, dtype: torch.dtype, cache_dir: Path, offload: bool = False, *,
    family: ModelFamily | None = None, config: str = "",
) -> DiffusionPipeline:
    """Load a Stable Diffusion 1.x, 2.x or SDXL model onto `device`: its text-to-image pipeline.

    `source` is "builtin:NAME" (built under `cache_dir` on first use), a local diffusers folder, a
    single-file .safetensors checkpoint, or a Hugging Face hub id (downloaded into the usual Hugging
    Face cache). A single file is read by the pipeline of its `family` (bot/catalog.py reads it from
    the file's header), its parts described by `config` (a diffusers folder or hub id of the same
    family; empty: the family's reference model on the hub, whose few small configuration files are
    fetched once and cached). Pickle checkpoints (.ckpt, .pt) are refused: loading one runs code.
    Raises GenerationFailed, naming the source, when it cannot be loaded.
    """
    # 1. Find the weights
    path = Path(source).expanduser()
    by_dtype = {DTYPE_KEYWORD: dtype}
    try:
        if source.startswith(BUILTIN_PREFIX):
            folder = ensure_builtin(source.removeprefix(BUILTIN_PREFIX), Path(cache_dir))
            pipe = AutoPipelineForText2Image.from_pretrained(folder, **by_dtype)
        elif source.lower().endswith(PICKLE_SUFFIXES):
            raise GenerationFailed(pickle_refusal(source))
        elif source.lower().endswith(SINGLE_FILE_SUFFIX):
            if not path.is_file():
                raise GenerationFailed(f"model file {source} does not exist; fix the model's `source` "
                                       f"in the [models.*] table of the configuration")
            pipe = _load_single_file(path, family or ModelFamily.SD1, config, dtype)
        elif path.is_dir() or looks_like_local_path(source):
            if not path.is_dir():
                raise GenerationFailed(f"model folder {source} does not exist; fix the model's `source` "
                                       f"in the [models.*] table of the configuration")
            pipe = AutoPipelineForText2Image.from_pretrained(path, **by_dtype)
        else:
            pipe = AutoPipelineForText2Image.from_pretrained(source, **by_dtype)
    except (OSError, ValueError) as error:  # missing files, no network, not a Stable Diffusion model
        raise GenerationFailed(f"could not load model {source!r}: {first_line(error)}") from error
    if not isinstance(pipe, StableDiffusionPipeline | StableDiffusionXLPipeline):
        raise GenerationFailed(f"model {source!r} is a {type(pipe).__name__}; Easel runs Stable Diffusion 1.x, "
                               "2.x and SDXL models")

    # 2. Place it: on the device, or (CPU offload, for small GPUs) moved there part by part when used
    if offload and torch.device(device).type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_single_file(path: Path, family: ModelFamily, config: str, dtype: torch.dtype) -> DiffusionPipeline:
    """diffusers' own single-file loader: it renames the original (CompVis) weights to its parts."""
    pipeline_class = StableDiffusionXLPipeline if family is ModelFamily.SDXL else StableDiffusionPipeline
    try:
        return pipeline_class.from_single_file(str(path), config=config or REFERENCE_MODELS[family],
                                               **{DTYPE_KEYWORD: dtype})
    except OSError as error:
        if config:
            raise
        raise GenerationFailed(
            f"could not load {path.name}: a single-file {family.label} checkpoint is described by the "
            f"configuration files of {REFERENCE_MODELS[family]} on the Hugging Face hub, fetched once and then "
            f"cached, and they could not be had ({first_line(error)}); connect once, or set `config` in the "
            "model's [models.*] table to a local diffusers folder of the same family") from error




class DiffusersGenerator:
    """Runs batches of generation tasks on one device; models are loaded on first use and kept.

    One call runs at a time (a lock guards the cached pipelines and their schedulers), which is what
    one accelerator can do anyway. txt2img, img2img and inpaint share one set of weights per model.
    """

    def __init__(
        self,
        models: Mapping[str, ModelConfig] | ModelCatalog,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: Path = DEFAULT_CACHE_DIR,
        options: GenerationConfig | None = None,
        networks: ExtraNetworks | None = None,
        upscale: UpscaleConfig | None = None,
    ) -> None:
        """`networks`: the installed LoRAs and embeddings (none when left out); `upscale`: the Upscale
        button's model and tiles (no model when left out)."""
        self.catalog = models if isinstance(models, ModelCatalog) else ModelCatalog(models)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.cache_dir = Path(cache_dir)
        self.options = options or GenerationConfig()
        self.compile_sizes = [_parse_size(size) for size in self.options.compile_sizes]
        self._pipelines: dict[tuple[str, JobKind], DiffusionPipeline] = {}
        self._scheduler_configs: dict[str, Mapping[str, Any]] = {}  # as each model was saved
        self._weights_bytes: OrderedDict[str, int] = OrderedDict()  # loaded models, least recent first
        self.networks = networks or ExtraNetworks(None, None)
        self._loaded_networks: dict[str, ModelNetworks] = {}  # each loaded model's LoRAs and embeddings
        self.upscale = upscale or UpscaleConfig()
        # Loaded now (it is small): a file that is not an upscale model stops the worker at start, not a job.
        self._upscaler: Upscaler | None = load_upscaler(self.upscale.model, self.device) if self.upscale.model \
            else None
        self._lock = threading.Lock()

    def warm(self, model_name: str) -> None:
        """Load `model_name` now, so the first job does not wait for it."""
        self._check_model(model_name)
        with self._lock:
            self._pipeline(model_name, JobKind.IMAGINE)
        # torch.compile traces on first use of each shape: pay that now, not in a user's first job. A batch
        # of several images is a second shape, traced with its batch size left free: after it, no batch up
        # to max_batch compiles again (without it, the first such batch did, for half a minute on a CPU).
        for width, height in self.compile_sizes if self.options.compile else []:
            for images in sorted({1, self.options.max_batch}):
                params = GenerationParams(JobKind.IMAGINE, "warm-up", width=width, height=height, steps=2,
                                          model=model_name, seed=0, n=images)
                self.generate([GenerationTask(params)])

    def generate(
        self, tasks: list[GenerationTask], on_step: StepCallback | None = None
    ) -> list[list[PIL.Image.Image]]:
        """Run `tasks` as one diffusers call and return, per task, its `params.n` RGB images.

        `on_step(step, total)` is called after each denoising step; `total` is the number of steps
        actually run: fewer than `steps` for edit and inpaint with strength < 1, more for samplers
        that take extra model calls (heun runs 2 * steps - 1, pndm steps + 1). Inpaint results keep
        the input's pixels outside the mask. If the device runs out of memory, the tasks are retried
        once, one call per task (progress then restarts for each); if one task alone still does not
        fit, GenerationFailed says what to lower.
        """
        # 1. Check inputs
        self._check_tasks(tasks)
        params = tasks[0].params

        with self._lock:
            # 2. Pipeline for this model and kind (loaded on first use), with its LoRAs and embeddings
            if params.kind is JobKind.UPSCALE:
                return [self._upscale(task, on_step) for task in tasks]
            pipe = self._pipeline(params.model, params.kind)
            self._prepare_networks(params)

            # 3. All tasks in one call
            try:
                return self._run(pipe, tasks, on_step)
            except RuntimeError as error:
                if not _is_out_of_memory(error):
                    raise
            # Out of the `except` block, the error's frames (holding the batch's tensors) are released.
            _free_memory(self.device)
            logger.warning("out of memory with %d images at %dx%d; retrying one task at a time",
                           sum(task.params.n for task in tasks), params.width, params.height)

            # 4. Out of memory: one call per task
            results: list[list[PIL.Image.Image]] = []
            for task in tasks:
                results.extend(self._run_alone(pipe, task, on_step))
            return results

    def _upscale(self, task: GenerationTask, on_step: StepCallback | None) -> list[PIL.Image.Image]:
        """An upscale job: its picture enlarged by the [upscale] model (Lanczos when none is set), then an
        img2img pass at its strength, if any, in tiles of [upscale] tile pixels blended across their overlap."""
        params, config = task.params, self.upscale
        assert task.init_image is not None  # _check_tasks
        size = (params.width, params.height)
        if self._upscaler is not None:
            enlarged = upscale_image(self._upscaler, task.init_image, size, tile=config.tile,
                                     overlap=config.tile_overlap)
        else:
            enlarged = task.init_image.convert("RGB").resize(size, PIL.Image.Resampling.LANCZOS)
        if params.strength is None:
            if on_step is not None:
                on_step(1, 1)
            return [enlarged]
        return [self._img2img_in_tiles(task, enlarged, on_step)]

    def _img2img_in_tiles(self, task: GenerationTask, picture: PIL.Image.Image,
                          on_step: StepCallback | None) -> PIL.Image.Image:
        """The img2img pass after an upscale: each tile a diffusers call of its own with the job's prompt and
        seed, so the memory needed is one tile's whatever the picture's size."""
        config = self.upscale
        width, height = picture.size
        tile_size = (min(config.tile, width), min(config.tile, height))
        tile_params = replace(task.params, kind=JobKind.EDIT, width=tile_size[0], height=tile_size[1], n=1)
        pipe = self._pipeline(tile_params.model, JobKind.EDIT)
        self._prepare_networks(tile_params)
        tiles = len(tile_starts(width, config.tile, config.tile_overlap)) * len(
            tile_starts(height, config.tile, config.tile_overlap))
        done = 0

        def repaint(part: np.ndarray) -> np.ndarray:
            nonlocal done
            crop = PIL.Image.fromarray((part * 255).round().astype(np.uint8), "RGB")
            progress = None
            if on_step is not None:
                first = done
                progress = lambda step, total, *_previews: on_step(first * total + step, tiles * total)  # noqa: E731
            [[image]] = self._run(pipe, [GenerationTask(tile_params, init_image=crop)], progress)
            done += 1
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255

        pixels = np.asarray(picture, dtype=np.float32) / 255
        blended = run_tiled(pixels, 1, config.tile, config.tile_overlap, repaint)
        return PIL.Image.fromarray((blended.clip(0, 1) * 255).round().astype(np.uint8), "RGB")

    def _run_alone(
        self, pipe: DiffusionPipeline, task: GenerationTask, on_step: StepCallback | None
    ) -> list[list[PIL.Image.Image]]:
        try:
            return self._run(pipe, [task], on_step)
        except RuntimeError as error:
            if not _is_out_of_memory(error):
                raise
        _free_memory(self.device)
        params = task.params
        raise GenerationFailed(f"ran out of memory at {params.width}x{params.height} with {params.n} "
                               f"image(s); lower --size or --n")

    def _run(
        self, pipe: DiffusionPipeline, tasks: list[GenerationTask], on_step: StepCallback | None
    ) -> list[list[PIL.Image.Image]]:
        """One diffusers call: prompts, negatives and images repeated per image, one generator each.

        Prompts become embeddings the AUTOMATIC1111 way (weights, long prompts: generation/prompt_embeds.py);
        prompts of different lengths in 75-token chunks run as separate calls."""
        encoder = PromptEncoder(pipe, self.device)
        chunk_counts = [encoder.chunk_count(task.params.prompt, task.params.negative) for task in tasks]
        if len(set(chunk_counts)) > 1:
            return self._run_by_chunk_count(pipe, tasks, chunk_counts, on_step)
        params = tasks[0].params
        per_image = [task for task in tasks for _ in range(task.params.n)]
        seeds = [seed for task in tasks for seed in task.params.image_seeds()]
        arguments: dict[str, Any] = {
            **encoder.encode([task.params.prompt for task in per_image], [task.params.negative for task in per_image]),
            "num_inference_steps": params.steps,
            "guidance_scale": params.cfg,
            # CPU generators: the same seed gives the same starting noise on every device.
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            "output_type": "pil",
        }
        if params.kind is not JobKind.EDIT:  # img2img takes the size of its image
            arguments |= {"width": params.width, "height": params.height}
        if params.kind.takes_image:
            arguments["image"] = [task.init_image for task in per_image]
            if params.strength is not None:
                arguments["strength"] = params.strength
        if params.kind.takes_mask:
            arguments["mask_image"] = [task.mask_image for task in per_image]
        if on_step is not None:
            first_images = [sum(task.params.n for task in tasks[:i]) for i in range(len(tasks))]
            every = self.options.preview_every_steps if self.options.previews else 0
            arguments["callback_on_step_end"] = _step_reporter(on_step, every, first_images,
                                                               _latent_family(pipe))

        # A fresh scheduler per call: schedulers keep per-call state.
        pipe.scheduler = make_scheduler(params.sampler, self._scheduler_configs[params.model])
        with torch.inference_mode():
            images = pipe(**arguments).images

        if params.kind.takes_mask:
            # Keep the unmasked pixels exactly as they were: blending latents alone still sends them
            # through the VAE, which shifts colours and detail on real models (and, on builtin:tiny,
            # replaces them). This is the composite diffusers' inpainting guide recommends. An outpaint's
            # new border fades in from the picture's edge (bot/outpaint.py) instead of starting at a line.
            def shown(mask: PIL.Image.Image) -> PIL.Image.Image:
                return feathered_mask(mask) if params.kind is JobKind.OUTPAINT else mask.convert("L")

            images = [PIL.Image.composite(image.convert("RGB"), task.init_image.convert("RGB"), shown(task.mask_image))
                      for image, task in zip(images, per_image, strict=True)]

        results, start = [], 0
        for task in tasks:
            results.append([image.convert("RGB") for image in images[start : start + task.params.n]])
            start += task.params.n
        return results

    def _run_by_chunk_count(self, pipe: DiffusionPipeline, tasks: list[GenerationTask], chunk_counts: list[int],
                            on_step: StepCallback | None) -> list[list[PIL.Image.Image]]:
        """One call per prompt length. Padding the shorter prompts with empty chunks instead would make
        an image depend on its batch mates; this way every image can be made again alone from its seed."""
        results: dict[int, list[PIL.Image.Image]] = {}
        # A call's previews list only its own tasks: progress goes on, previews wait for a whole batch.
        progress = (lambda step, total, *_previews: on_step(step, total)) if on_step else None
        for count in dict.fromkeys(chunk_counts):
            indices = [i for i, each in enumerate(chunk_counts) if each == count]
            for i, images in zip(indices, self._run(pipe, [tasks[i] for i in indices], progress), strict=True):
                results[i] = images
        return [results[i] for i in range(len(tasks))]

    def _pipeline(self, model_name: str, kind: JobKind) -> DiffusionPipeline:
        """The cached pipeline for a model and job kind; the kinds share one set of weights."""
        if (model_name, JobKind.IMAGINE) not in self._pipelines:
            model = self._model(model_name)
            base = load_pipeline(model.source, self.device, self.dtype, self.cache_dir,
                                 offload=self.options.cpu_offload, family=model.family, config=model.config)
            self._apply_switches(base)
            self._pipelines[model_name, JobKind.IMAGINE] = base
            self._scheduler_configs[model_name] = base.scheduler.config
            self._weights_bytes[model_name] = _weights_bytes(base)
            self._loaded_networks[model_name] = ModelNetworks(model_name, base, self.networks)
            self._evict_beyond_budget(keep=model_name)
        self._weights_bytes.move_to_end(model_name)
        if (model_name, kind) not in self._pipelines:
            base = self._pipelines[model_name, JobKind.IMAGINE]
            # The dtype matters: from_pipe casts the (shared) modules to float32 when it is left out.
            derived = PIPELINE_CLASSES[_latent_family(base)][kind].from_pipe(base, **{DTYPE_KEYWORD: self.dtype})
            derived.set_progress_bar_config(disable=True)
            self._pipelines[model_name, kind] = derived
        return self._pipelines[model_name, kind]

    def _apply_switches(self, pipe: DiffusionPipeline) -> None:
        """The speed switches of [generation], each off by default (see config.example.toml)."""
        if self.options.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if self.options.vae_tiling:
            pipe.vae.enable_tiling()
        if self.options.compile:
            pipe.unet = torch.compile(pipe.unet)

    def _prepare_networks(self, params: GenerationParams) -> None:
        """Load new embeddings and this batch's LoRAs into the model, and switch to exactly its LoRAs."""
        loaded = self._loaded_networks[params.model]
        loaded.sync_embeddings()
        in_use = loaded.activate(params.loras)
        self._evict_beyond_budget(keep=params.model, keep_adapters=set(in_use))

    def _loaded_bytes(self) -> int:
        return sum(self._weights_bytes.values()) + sum(n.adapter_bytes for n in self._loaded_networks.values())

    def _evict_beyond_budget(self, keep: str, keep_adapters: set[str] | None = None) -> None:
        """Unload least recently used LoRAs, then models, until the loaded weights fit `memory_budget_mb`.

        LoRAs go first: reloading one costs a file read, reloading a model much more.
        """
        budget = self.options.memory_budget_mb * 2**20
        keep_adapters = keep_adapters or set()
        while budget and self._loaded_bytes() > budget:
            spare = [(loaded, adapter) for name in self._weights_bytes  # least recently used model first
                     for loaded in [self._loaded_networks[name]] for adapter in loaded.adapters
                     if not (name == keep and adapter in keep_adapters)]
            if spare:
                loaded, adapter = spare[0]
                logger.info("unloading LoRA %s of model %s to stay within generation.memory_budget_mb", adapter,
                            loaded.model_name)
                loaded.unload(adapter)
                continue
            if len(self._weights_bytes) <= 1:
                return
            oldest = next(name for name in self._weights_bytes if name != keep)
            logger.info("unloading model %s to stay within generation.memory_budget_mb", oldest)
            del self._weights_bytes[oldest]
            del self._loaded_networks[oldest]
            for key in [key for key in self._pipelines if key[0] == oldest]:
                del self._pipelines[key]
            _free_memory(self.device)

    @property
    def loaded_models(self) -> list[str]:
        """Loaded model names, least recently used first."""
        return list(self._weights_bytes)

    @property
    def loaded_loras(self) -> list[str]:
        """The names of the LoRAs loaded into any model."""
        return sorted({name for loaded in self._loaded_networks.values() for name in loaded.lora_names.values()})

    def device_report(self) -> DeviceReport:
        """This generator's device, its name and memory (the worker registry's `easel workers` columns)."""
        return device_report(self.device)

    def _check_model(self, model_name: str) -> None:
        self._model(model_name)

    def _model(self, model_name: str) -> CatalogModel:
        """The catalog's model (a checkpoint added since the last look is found too), if it can be loaded."""
        model = self.catalog.get(model_name)
        if model is None:
            raise ValueError(f"model {model_name!r} is not configured; the models are "
                             f"{', '.join(sorted(m.name for m in self.catalog.list()))}")
        if model.problem is not None:
            raise GenerationFailed(f"model {model.name} cannot be used: {model.problem}")
        return model

    def _check_tasks(self, tasks: list[GenerationTask]) -> None:
        if not tasks:
            raise ValueError("`tasks` must hold at least one task")
        params = tasks[0].params
        for task in tasks[1:]:
            if task.params.batch_key() != params.batch_key():
                raise ValueError(f"tasks in one call must share params.batch_key(), but "
                                 f"{task.params.batch_key()} differs from {params.batch_key()}")
        self._check_model(params.model)
        if params.sampler not in SAMPLERS:
            raise ValueError(f"`sampler` must be one of {', '.join(SAMPLERS)}, but is {params.sampler!r}")
        if params.width % 8 or params.height % 8:
            raise ValueError(f"`width` and `height` have to be divisible by 8 but are "
                             f"{params.width} and {params.height}")
        for task in tasks:
            _check_task(task)


def _check_task(task: GenerationTask) -> None:
    params = task.params
    if params.seed is None:
        raise ValueError("`params.seed` must be set; the job service assigns one before queuing")
    if params.n < 1:
        raise ValueError(f"`params.n` must be at least 1 but is {params.n}")
    size = (params.width, params.height)
    wants_image = params.kind.takes_image
    if wants_image and task.init_image is None:
        raise ValueError(f"a {params.kind} task needs `init_image`")
    if not wants_image and task.init_image is not None:
        raise ValueError(f"`init_image` is only for edit, inpaint and outpaint tasks, not {params.kind}")
    if task.init_image is not None and task.init_image.size != size and params.kind is not JobKind.UPSCALE:
        raise ValueError(f"`init_image` must be {size[0]}x{size[1]} like the params, but is "
                         f"{task.init_image.size[0]}x{task.init_image.size[1]}")
    wants_mask = params.kind.takes_mask
    if wants_mask and task.mask_image is None:
        raise ValueError(f"a {params.kind} task needs `mask_image`")
    if not wants_mask and task.mask_image is not None:
        raise ValueError(f"`mask_image` is only for inpaint and outpaint tasks, not {params.kind}")
    if task.mask_image is not None and task.mask_image.size != size:
        raise ValueError(f"`mask_image` must be {size[0]}x{size[1]} like the params, but is "
                         f"{task.mask_image.size[0]}x{task.mask_image.size[1]}")


def _step_reporter(on_step: StepCallback, preview_every: int, first_images: list[int],
                   family: str) -> Callable[..., dict[str, Any]]:
    """diffusers' step-end callback: report progress, and every `preview_every` steps (0 = never)
    a preview of each task's first image."""

    def callback(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
        done, total = step + 1, pipe.num_timesteps
        if preview_every and (done % preview_every == 0) and done < total and "latents" in tensors:
            latents = tensors["latents"]
            on_step(done, total, [latents_to_preview(latents[i], family) for i in first_images])
        else:
            on_step(done, total)
        return {}  # change nothing

    return callback


# Linear maps from the 4 latent channels to RGB (from ComfyUI's latent formats): a recognisable
# preview for the price of a matrix product, with no VAE decode and no extra weights.
LATENT_RGB_FACTORS: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd": ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
    "sdxl": ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
              [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
}


def _latent_family(pipe: DiffusionPipeline) -> str:
    """SDXL UNets take extra "text_time" conditioning; SD 1.x and 2.x share one latent space."""
    return "sdxl" if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time" else "sd"


def latents_to_preview(latents: torch.Tensor, family: str = "sd") -> bytes:
    """A small JPEG of one image's latents (channels, height, width), projected linearly to RGB."""
    factors, bias = LATENT_RGB_FACTORS[family]
    rgb = torch.einsum("chw,cr->hwr", latents.detach().float().cpu(), torch.tensor(factors))
    rgb = ((rgb + torch.tensor(bias) + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def _weights_bytes(pipe: DiffusionPipeline) -> int:
    return sum(p.numel() * p.element_size() for name, component in pipe.components.items()
               if isinstance(component, torch.nn.Module) for p in component.parameters())


def _parse_size(size: str) -> tuple[int, int]:
    width, _, height = size.lower().partition("x")
    if not (width.isdigit() and height.isdigit()) or int(width) % 8 or int(height) % 8:
        raise ConfigError(f"generation.compile_sizes holds {size!r}; write sizes as WxH in multiples "
                          f"of 8, e.g. \"512x512\"")
    return int(width), int(height)


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def device_report(device: torch.device) -> DeviceReport:
    """The device's name and memory: what this process holds of a GPU's, or its resident size on a CPU."""
    mb = 2**20
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return DeviceReport(device=str(device), name=properties.name,
                            memory_used_mb=int(torch.cuda.memory_reserved(device) // mb),
                            memory_total_mb=int(properties.total_memory // mb))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return DeviceReport(device=str(device), name=_cpu_name(), memory_used_mb=_resident_bytes() // mb,
                        memory_total_mb=int(total // mb))


@functools.cache  # read at every registry report; the CPU does not change while the process runs
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _resident_bytes() -> int:
    """This process's resident memory (Linux); its peak elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
