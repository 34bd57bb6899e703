"""The models users may choose: the `[models.*]` tables and whatever lies in `<data_dir>/checkpoints/`.

Each model gets a name, a family (SD 1.x, SD 2.x or SDXL), a default size and default settings,
found without torch: from a diffusers folder's `model_index.json` and `unet/config.json`, or from a
single-file checkpoint's safetensors header (the names and shapes of its weights, never the weights).
The folder is scanned again when the list is asked for and when a name is not known yet, so a
checkpoint dropped in appears without a restart.

Example:
    catalog = ModelCatalog.from_settings(settings)
    model = catalog.get("dreamshaper_8")    # checkpoints/dreamshaper_8.safetensors
    model.family, model.width, model.cfg    # ModelFamily.SD1, 512, 7.0
    print(describe_models(catalog.list(), catalog.default_name))   # the /models answer
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from bot.config import LimitsConfig, ModelConfig, Settings
from bot.errors import first_line

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
SINGLE_FILE_SUFFIX = ".safetensors"
# Python's pickle format: loading one runs whatever code its author put in it.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_SCAN_DEPTH = 3  # checkpoints/sdxl/anime/x.safetensors is found; deeper trees are not walked


class ModelFamily(StrEnum):
    """The model architectures Easel runs, as `family` in `[models.*]` and GET /v1/models write them."""

    SD1 = "sd1"  # Stable Diffusion 1.x and its fine-tunes: CLIP ViT-L text encoder, 512x512
    SD2 = "sd2"  # Stable Diffusion 2.x: OpenCLIP ViT-H text encoder, 768x768 (2.x-base: 512)
    SDXL = "sdxl"  # SDXL: two text encoders and size conditioning, 1024x1024

    @property
    def label(self) -> str:
        return {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[self.value]

    @property
    def native_side(self) -> int:
        """The side its base models were trained at, for a checkpoint whose files do not say."""
        return {"sd1": 512, "sd2": 768, "sdxl": 1024}[self.value]


@dataclass(frozen=True)
class BuiltinModel:
    family: ModelFamily
    side: int
    description: str
    cfg: float | None = None  # the guidance it draws best at, when not Easel's default


# What each `builtin:NAME` recipe (generation/builtin.py) is, so the core knows without building it.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "shapes": BuiltinModel(ModelFamily.SD1, 64, "draws one flat shape (circle, square or triangle) in one of "
                           "eight colours on another, e.g. \"a red circle on a blue background\"", cfg=3.0),
    "tiny": BuiltinModel(ModelFamily.SD1, 64, "untrained, draws noise: for testing Easel itself"),
    "tiny-sd2": BuiltinModel(ModelFamily.SD2, 64, "untrained SD 2.x-shaped model, draws noise: for tests"),
    "tiny-sdxl": BuiltinModel(ModelFamily.SDXL, 64, "untrained SDXL-shaped model, draws noise: for tests"),
    "sd15-random": BuiltinModel(ModelFamily.SD1, 512, "SD 1.5's full architecture with random weights: "
                                "for benchmarks"),
}


@dataclass(frozen=True)
class CatalogModel:
    """One model as users see it, with every default resolved (its own, else Easel's)."""

    name: str
    source: str  # what the worker loads: "builtin:NAME", a diffusers folder, a .safetensors file, a hub id
    family: ModelFamily | None  # None: not known until loaded (a hub id not downloaded yet)
    width: int
    height: int
    steps: int
    cfg: float
    sampler: str
    negative: str = ""
    description: str = ""
    config: str = ""  # single-file checkpoints: the diffusers folder or hub id describing its parts
    origin: str = "config"  # "config": a [models.*] table; "checkpoints": found in the checkpoints folder
    file: str = ""  # checkpoints: its path inside the folder, as /models shows it
    problem: str | None = None  # why it cannot be used (a pickle file, a missing file...); None: usable

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def family_label(self) -> str:
        return self.family.label if self.family is not None else "family unknown until first loaded"

    def defaults_text(self) -> str:
        """`64x64, 20 steps, cfg 3, euler`, plus the default negative prompt when there is one."""
        text = f"{self.width}x{self.height}, {self.steps} steps, cfg {self.cfg:g}, {self.sampler}"
        return text + (f", negative \"{self.negative}\"" if self.negative else "")


@dataclass(frozen=True)
class Detected:
    """What a model's files say about it."""

    family: ModelFamily | None = None
    side: tuple[int, int] | None = None  # native width, height; None: the family's
    problem: str | None = None


@dataclass
class _Found:
    """A model file or folder in the checkpoints folder."""

    name: str
    path: Path
    relative: str
    pickle: bool = False


def pickle_refusal(path: str | Path) -> str:
    """Why a pickle checkpoint is refused, and how to get a file Easel loads."""
    path = Path(path)
    return (f"{path.name} is a pickle checkpoint ({path.suffix}), and loading one can run any code hidden in "
            f"it, so Easel does not; download the model's .safetensors version, or convert this file with "
            f"`easel convert-checkpoint {path}` (it reads tensors only and runs no code)")


def model_name_of(stem: str) -> str:
    """The name a checkpoint file goes by: its stem, with spaces as underscores so --model takes it."""
    return re.sub(r"\s+", "_", stem.strip())


class ModelCatalog:
    """The configured models and the checkpoints folder, re-scanned when asked for the list or for a
    name it does not know. Safe to share between the event loop and the worker's thread."""

    def __init__(self, models: Mapping[str, ModelConfig], *, checkpoints_dir: Path | None = None,
                 limits: LimitsConfig | None = None, default_sampler: str = "euler",
                 default_model: str | None = None) -> None:
        self.configured = dict(models)
        self.checkpoints_dir = checkpoints_dir
        self.limits = limits or LimitsConfig()
        self.default_sampler = default_sampler.lower()
        self.default_name = default_model or next(iter(self.configured), "")
        self._lock = threading.Lock()
        self._detected: dict[tuple[str, int, int], Detected] = {}  # by (path, size, mtime): headers read once
        self._models: dict[str, CatalogModel] = {}
        self.rescan()

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelCatalog:
        return cls(settings.models, checkpoints_dir=settings.storage.checkpoints, limits=settings.limits,
                   default_sampler=settings.generation.default_sampler,
                   default_model=settings.generation.default_model)

    # -- asking ------------------------------------------------------------------------------------

    def list(self) -> list[CatalogModel]:
        """Every model, configured ones first, then the checkpoints by name; scans the folder first."""
        self.rescan()
        return list(self._models.values())

    def get(self, name: str) -> CatalogModel | None:
        """The model called `name` (any case), scanning the folder again when it is not known yet or could
        not be used (a converted copy may have come since)."""
        model = self._lookup(name)
        if (model is None or not model.usable) and self.checkpoints_dir is not None:
            self.rescan()
            model = self._lookup(name)
        return model

    @property
    def default(self) -> CatalogModel:
        model = self.get(self.default_name)
        if model is None:
            raise ValueError(f"the default model {self.default_name!r} is not in the catalog")
        return model

    def describe(self) -> str:
        """The /models answer, after a fresh look at the checkpoints folder."""
        return describe_models(self.list(), self.default_name)

    def family_of(self, name: str) -> ModelFamily | None:
        """The family of model `name` (None when unknown), for checking that a LoRA or embedding fits it."""
        model = self.get(name)
        return model.family if model is not None else None

    def _lookup(self, name: str) -> CatalogModel | None:
        with self._lock:
            return self._models.get(name.lower())

    # -- scanning ----------------------------------------------------------------------------------

    def rescan(self) -> None:
        """Read the checkpoints folder again (only new or changed files are opened)."""
        found = self._scan_folder()
        models: dict[str, CatalogModel] = {}
        for name, config in self.configured.items():
            models[name.lower()] = self._configured(name, config, found.pop(name.lower(), None))
        for key, item in sorted(found.items()):
            models[key] = self._checkpoint(item)
        with self._lock:
            self._models = models

    def _scan_folder(self) -> dict[str, _Found]:
        """The checkpoints folder's models by lower-cased name; a usable file wins over a pickle of the
        same name (the converted copy next to its original)."""
        found: dict[str, _Found] = {}
        if self.checkpoints_dir is None or not self.checkpoints_dir.is_dir():
            return found
        for item in _walk(self.checkpoints_dir, self.checkpoints_dir, MAX_SCAN_DEPTH):
            key = item.name.lower()
            earlier = found.get(key)
            if earlier is None or (earlier.pickle and not item.pickle):
                found[key] = item
            elif not item.pickle:
                log.warning("two checkpoints are named %s: %s and %s; using the first, rename the other",
                            item.name, earlier.relative, item.relative)
        return found

    def _configured(self, name: str, config: ModelConfig, found: _Found | None) -> CatalogModel:
        """A [models.NAME] table; without `source`, the checkpoint of that name gives the files."""
        source, origin, relative = config.source, "config", ""
        if not source and found is not None:
            source, origin, relative = str(found.path), "checkpoints", found.relative
        detected = self._detect(source, config.config, name)
        family = ModelFamily(config.family) if config.family else detected.family
        builtin = BUILTIN_MODELS.get(source.removeprefix(BUILTIN_PREFIX)) if source.startswith(BUILTIN_PREFIX) \
            else None
        width, height = self._size(config.default_width, config.default_height, detected, family)
        return CatalogModel(
            name=name, source=source, family=family, width=width, height=height,
            steps=config.default_steps or self.limits.default_steps,
            cfg=_first(config.default_cfg, builtin.cfg if builtin else None, self.limits.default_cfg),
            sampler=(config.default_sampler or self.default_sampler).lower(),
            negative=config.default_negative,
            description=config.description or (builtin.description if builtin else ""),
            config=config.config, origin=origin, file=relative, problem=detected.problem,
        )

    def _checkpoint(self, item: _Found) -> CatalogModel:
        """A checkpoint with no [models.*] table: Easel's defaults at its own size."""
        detected = Detected(problem=pickle_refusal(item.path)) if item.pickle else self._detect(str(item.path))
        width, height = self._size(None, None, detected, detected.family)
        return CatalogModel(name=item.name, source=str(item.path), family=detected.family, width=width,
                            height=height, steps=self.limits.default_steps, cfg=self.limits.default_cfg,
                            sampler=self.default_sampler, origin="checkpoints", file=item.relative,
                            problem=detected.problem)

    def _size(self, width: int | None, height: int | None, detected: Detected,
              family: ModelFamily | None) -> tuple[int, int]:
        """The configured size, else the model's own, fitted into the limits (a 1024x1024 SDXL on a
        server whose limits.max_pixels is smaller gets the largest square that fits)."""
        from bot.grammar import fit_size  # the grammar imports this module

        side = family.native_side if family is not None else 512
        native = detected.side or (side, side)
        width, height = width or native[0], height or native[1]
        return fit_size(width, height, width * height, self.limits)

    def _detect(self, source: str, config: str = "", name: str = "") -> Detected:
        """What the files of `source` say; cached per file version, so a scan opens only new files."""
        if not source:
            return Detected(problem=f"models.{name} has no source and the checkpoints folder has no {name}: "
                                    f"put {name}.safetensors (or a diffusers folder {name}/) there, or set its "
                                    "source")
        if source.startswith(BUILTIN_PREFIX):
            builtin = BUILTIN_MODELS.get(source.removeprefix(BUILTIN_PREFIX))
            if builtin is None:
                return Detected(problem=f"model source {source!r} is unknown; the built-in models are: "
                                        f"{', '.join(BUILTIN_PREFIX + known for known in BUILTIN_MODELS)}")
            return Detected(builtin.family, (builtin.side, builtin.side))
        path = Path(source).expanduser()
        if source.lower().endswith(PICKLE_SUFFIXES):
            return Detected(problem=pickle_refusal(path))
        if not path.exists():
            if source.lower().endswith(SINGLE_FILE_SUFFIX):
                return Detected(problem=f"model file {source} does not exist; fix the model's `source` in the "
                                        "[models.*] table of the configuration")
            if looks_like_local_path(source):
                return Detected(problem=f"model folder {source} does not exist; fix the model's `source` in the "
                                        "[models.*] table of the configuration")
            return _detect_hub(source)
        try:
            stat = (path / "model_index.json" if path.is_dir() else path).stat()
        except OSError:
            stat = None
        key = (f"{path}|{config}", stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1)
        with self._lock:
            cached = self._detected.get(key)
        if cached is None:
            cached = detect_folder(path) if path.is_dir() else detect_single_file(path, config)
            with self._lock:
                self._detected[key] = cached
        return cached


def _walk(folder: Path, root: Path, depth: int) -> Iterator[_Found]:
    """Diffusers folders and checkpoint files under `folder`; other folders are looked into."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):  # hidden: a download in progress, editor files
            continue
        relative = entry.relative_to(root).as_posix()
        suffix = entry.suffix.lower()
        if entry.is_dir():
            if (entry / "model_index.json").is_file():
                yield _Found(model_name_of(entry.name), entry, relative + "/")
            elif depth > 1:
                yield from _walk(entry, root, depth - 1)
        elif suffix == SINGLE_FILE_SUFFIX:
            yield _Found(model_name_of(entry.stem), entry, relative)
        elif suffix in PICKLE_SUFFIXES:
            yield _Found(model_name_of(entry.stem), entry, relative, pickle=True)


# -- what files say ----------------------------------------------------------------------------------

# Key prefixes of the text encoders in original (CompVis / AUTOMATIC1111) single-file checkpoints.
_SDXL_TEXT = "conditioner.embedders.1."  # SDXL base: CLIP ViT-L is embedders.0, OpenCLIP ViT-bigG embedders.1
_SDXL_REFINER_TEXT = "conditioner.embedders.0.model."  # the refiner has only OpenCLIP ViT-bigG
_SD2_TEXT = "cond_stage_model.model."  # OpenCLIP ViT-H
_SD1_TEXT = "cond_stage_model.transformer."  # CLIP ViT-L
_UNET = "model.diffusion_model."
_UNET_FIRST_CONV = _UNET + "input_blocks.0.0.weight"  # (channels, 4 or 9 inputs, 3, 3)
_UNET_CROSS_ATTENTION = re.compile(re.escape(_UNET)
                                   + r"input_blocks\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight")
_TEXT_WIDTH_FAMILY = {768: ModelFamily.SD1, 1024: ModelFamily.SD2, 2048: ModelFamily.SDXL}
_SUPPORTED = "Easel runs Stable Diffusion 1.x, 2.x and SDXL checkpoints"


def detect_single_file(path: Path, config: str = "") -> Detected:
    """A .safetensors checkpoint's family from the names (and a few shapes) in its header.

    Also tells a LoRA, an embedding or a VAE put in the wrong folder from a model. With `config` (a
    local diffusers folder describing the checkpoint), the size is that folder's.
    """
    from safetensors import safe_open  # the Rust reader: no torch, and only the header is read

    try:
        with safe_open(str(path), framework="numpy") as checkpoint:
            keys = set(checkpoint.keys())
            metadata = checkpoint.metadata() or {}

            def shape(key: str) -> list[int]:
                return list(checkpoint.get_slice(key).get_shape())

            detected = _family_from_keys(keys, shape)
    except Exception as error:  # safetensors raises its own error types for a bad header
        return Detected(problem=f"{path.name} is not a readable .safetensors file ({first_line(error)})")
    if detected.problem is not None or detected.family is None:
        return detected
    side = _resolution(metadata.get("modelspec.resolution", ""))
    if config and Path(config).expanduser().is_dir():
        side = detect_folder(Path(config).expanduser()).side or side
    return Detected(detected.family, side)


def _family_from_keys(keys: set[str], shape: Any) -> Detected:
    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if any("lora_down" in key or "lora_up" in key or "lora_A" in key or key.startswith("lora_") for key in keys):
        return Detected(problem="this is a LoRA, not a model: LoRAs go in the loras folder (storage.lora_dir) "
                                "and are used with <lora:NAME:WEIGHT>")
    if "emb_params" in keys or "string_to_param" in keys or keys <= {"clip_l", "clip_g"}:
        return Detected(problem="this is a textual-inversion embedding, not a model: embeddings go in the "
                                "embeddings folder (storage.embeddings_dir)")
    if not has(_UNET):
        if has("encoder.") and has("decoder."):
            return Detected(problem=f"this is a VAE alone, not a whole model; {_SUPPORTED}")
        return Detected(problem=f"this holds no Stable Diffusion UNet weights; {_SUPPORTED}")
    if _UNET_FIRST_CONV in keys and shape(_UNET_FIRST_CONV)[1] != 4:
        return Detected(problem="this is an inpainting-only checkpoint (its UNet takes extra mask channels); use "
                                "its base model: Easel inpaints with every model")
    if has(_SDXL_TEXT):
        return Detected(ModelFamily.SDXL)
    if has(_SDXL_REFINER_TEXT):
        return Detected(problem=f"this is an SDXL refiner, which only refines another model's pictures; {_SUPPORTED}")
    if has(_SD2_TEXT):
        return Detected(ModelFamily.SD2)
    if has(_SD1_TEXT):
        return Detected(ModelFamily.SD1)
    if _UNET + "label_emb.0.0.weight" in keys:
        return Detected(ModelFamily.SDXL)
    for key in sorted(keys):  # no text encoder in the file: the width of what the UNet attends to
        if _UNET_CROSS_ATTENTION.fullmatch(key) and shape(key)[-1] in _TEXT_WIDTH_FAMILY:
            return Detected(_TEXT_WIDTH_FAMILY[shape(key)[-1]])
    return Detected(problem=f"its weights match none of the families Easel knows; {_SUPPORTED}")


def detect_folder(folder: Path) -> Detected:
    """A diffusers folder's family and native size, from model_index.json and the UNet's and VAE's configs."""
    index = _read_json(folder / "model_index.json")
    if index is None:
        return Detected(problem=f"{folder.name}/model_index.json is missing or not JSON; a diffusers folder "
                                "has one (save it with save_pretrained)")
    pipeline = str(index.get("_class_name", ""))
    unet = _read_json(folder / "unet" / "config.json") or {}
    vae = _read_json(folder / "vae" / "config.json") or {}
    if not pipeline.startswith("StableDiffusion") or "Upscale" in pipeline or "Depth" in pipeline \
            or "InstructPix2Pix" in pipeline or "LatentUpscale" in pipeline:
        return Detected(problem=f"this is a {pipeline or 'diffusers'} model; {_SUPPORTED}")
    if unet.get("in_channels", 4) != 4:
        return Detected(problem="this is an inpainting-only model (its UNet takes extra mask channels); use its "
                                "base model: Easel inpaints with every model")
    if "XL" in pipeline:
        if (index.get("text_encoder") or [None])[0] is None:
            return Detected(problem=f"this is an SDXL refiner, which only refines another model's pictures; "
                                    f"{_SUPPORTED}")
        family = ModelFamily.SDXL
    elif unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024:
        family = ModelFamily.SD2  # 2.x's transformer blocks project linearly; 1.x's use 1x1 convolutions
    else:
        family = ModelFamily.SD1
    side = None
    if isinstance(unet.get("sample_size"), int) and vae.get("block_out_channels"):
        scale = 2 ** (len(vae["block_out_channels"]) - 1)  # the VAE halves the picture per block but the last
        side = (unet["sample_size"] * scale, unet["sample_size"] * scale)
    return Detected(family, side)


def _detect_hub(repo_id: str) -> Detected:
    """A hub id's family from the Hugging Face cache, when it was downloaded before (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        index = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # not a valid repo id: the worker's load will say so
        return Detected()
    if not isinstance(index, str):
        return Detected()
    folder = Path(index).parent
    for config in ("unet/config.json", "vae/config.json"):
        cached = try_to_load_from_cache(repo_id, config)
        if isinstance(cached, str) and not (folder / config).exists():
            folder = Path(cached).parent.parent  # every file of one revision lives in one snapshot folder
    return detect_folder(folder)


def _resolution(text: str) -> tuple[int, int] | None:
    """modelspec.resolution, "1024x1024", as some trainers write it into the header."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    return (int(match[1]), int(match[2])) if match else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def looks_like_local_path(source: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else with a path shape is meant to be local."""
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1


def _first(*values: float | None) -> float:
    return next(value for value in values if value is not None)


# -- the /models answer ------------------------------------------------------------------------------


def describe_models(models: list[CatalogModel], default_name: str) -> str:
    """The /models answer: each model with its family, size, defaults and what it is for."""
    usable = [model for model in models if model.usable]
    lines = [f"Models (pick one with --model NAME; default {default_name}):"]
    for model in usable:
        mark = " (default)" if model.name.lower() == default_name.lower() else ""
        lines.append(f"  {model.name}{mark}  {model.family_label}; defaults {model.defaults_text()}")
        if model.description:
            lines.append(f"      {model.description}")
    refused = [model for model in models if not model.usable]
    if refused:
        lines.append("Not usable:")
        lines.extend(f"  {model.file or model.name}: {model.problem}" for model in refused)
    return "\n".join(lines)

