"""The output check: is a generated image NSFW? Pluggable, chosen by `safety.image_checker`.

- "diffusers": diffusers' `StableDiffusionSafetyChecker` (a CLIP model compared with concept
  embeddings), the checker Stable Diffusion ships with. Its weights come from `image_checker_source`,
  or the default model's source: a diffusers folder or hub id with `safety_checker/` and
  `feature_extractor/` subfolders, or a folder/hub id holding the checker itself (for example
  "CompVis/stable-diffusion-safety-checker").
- "nudenet": NudeNet's detector (ships its own ONNX weights, runs offline; `pip install nudenet`).
- "none": no output check (the prompt check still runs).

Only the verdict is used: diffusers' checker also blacks out flagged images, and Easel discards that
copy. A flagged image is spoilered or withheld with a reason (bot/queue.py), never silently blackened.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from bot.config import Settings
from bot.errors import ConfigError
from bot.safety import ImageVerdict

log = logging.getLogger("easel.safety")

NUDENET_EXPOSED = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
                   "ANUS_EXPOSED", "BUTTOCKS_EXPOSED")


class ImageChecker(Protocol):
    def check(self, images: list[Image.Image]) -> list[ImageVerdict | None]:
        """One verdict per image: None when it is fine."""
        ...


class NoImageCheck:
    def check(self, images: list[Image.Image]) -> list[ImageVerdict | None]:
        return [None] * len(images)


class DiffusersSafetyChecker:
    """`StableDiffusionSafetyChecker` on the CPU (it is small next to the UNet; keeps GPU memory free)."""

    def __init__(self, source: str, cache_dir: Path | None = None) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        errors = []
        for checker_folder, processor_folder in (("safety_checker", "feature_extractor"), (None, None)):
            try:
                self.checker = StableDiffusionSafetyChecker.from_pretrained(
                    source, subfolder=checker_folder, cache_dir=cache_dir).eval()
                self.processor = CLIPImageProcessor.from_pretrained(source, subfolder=processor_folder,
                                                                    cache_dir=cache_dir)
                return
            except (OSError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise ConfigError(f"safety.image_checker = \"diffusers\" found no safety checker in {source!r} "
                          "(looked for safety_checker/ and feature_extractor/, then the folder itself); set "
                          "safety.image_checker_source, e.g. \"CompVis/stable-diffusion-safety-checker\" "
                          f"({errors[-1]})")

    def check(self, images: list[Image.Image]) -> list[ImageVerdict | None]:
        rgb = [image.convert("RGB") for image in images]
        clip_input = self.processor(rgb, return_tensors="pt").pixel_values.to(self.checker.dtype)
        arrays = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in rgb])
        with torch.no_grad():
            _, flagged = self.checker(images=arrays, clip_input=clip_input)
        return [ImageVerdict("nsfw", "diffusers_safety_checker") if is_nsfw else None for is_nsfw in flagged]


class NudeNetChecker:
    def __init__(self, threshold: float) -> None:
        try:
            from nudenet import NudeDetector
        except ImportError:
            raise ConfigError("safety.image_checker = \"nudenet\" needs the nudenet package: "
                              "pip install nudenet (or choose \"diffusers\" or \"none\")") from None
        self.detector = NudeDetector()
        self.threshold = threshold

    def check(self, images: list[Image.Image]) -> list[ImageVerdict | None]:
        verdicts: list[ImageVerdict | None] = []
        with tempfile.TemporaryDirectory(prefix="easel-nudenet-") as folder:
            for index, image in enumerate(images):
                path = Path(folder) / f"{index}.png"
                image.convert("RGB").save(path)
                found = [d["class"] for d in self.detector.detect(str(path))
                         if d["class"] in NUDENET_EXPOSED and d["score"] >= self.threshold]
                verdicts.append(ImageVerdict("nsfw", f"nudenet:{found[0]}") if found else None)
        return verdicts


def build_image_checker(settings: Settings) -> ImageChecker:
    """The checker `safety.image_checker` names, loaded now so a bad setting stops the worker at start."""
    config = settings.safety
    if config.image_checker == "none":
        return NoImageCheck()
    if config.image_checker == "nudenet":
        return NudeNetChecker(config.nudenet_threshold)
    source = config.image_checker_source or settings.models[settings.generation.default_model].source
    if source.startswith("builtin:") or source.endswith((".safetensors", ".ckpt")):
        raise ConfigError(f"safety.image_checker = \"diffusers\" needs safety.image_checker_source: the default "
                          f"model's source {source!r} has no safety checker; e.g. "
                          "\"CompVis/stable-diffusion-safety-checker\" or a local copy of it")
    log.info("loading the diffusers safety checker from %s", source)
    return DiffusersSafetyChecker(source, cache_dir=None)
