"""Upscale: seconds per output megapixel of the Upscale button with an upscale model against the img2img
pass at twice the size it makes without one, on the same model in the same run.

    python -m bench.upscale                            # builtin:tiny on the CPU, a 64x64 picture
    python -m bench.upscale --device cuda --arch sd15  # SD 1.5's architecture on a GPU, 512x512 to 1024x1024

Each row is what the worker computes for an upscale job of a side x side picture to twice its side
(DiffusersGenerator.generate): `[upscale] model = "builtin:upscale-x2"` alone (denoise 0), the same then
its img2img pass at denoise 0.2, both in tiles of 512 output pixels overlapping by 32; and, with no upscale
model, the img2img pass at twice the size over the picture enlarged by Lanczos, at strength 0.35 (an edit
job, as the button makes it then). The rows take turns within each round, so a slow spell of a shared
machine falls on all; the table gives medians.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/upscale.py`: import from the repository root, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import bench  # noqa: F401  (and set up first, as `python -m` does: bench/__init__.py quiets transformers)

import statistics
import time
from collections.abc import Callable

import PIL.Image
import torch

from bench.common import BenchSetup, parse_common, print_table
from bench.outpaint import on_torch, sync
from bot.config import ModelConfig, UpscaleConfig
from bot.domain import GenerationParams, JobKind
from bot.followups import UPSCALE_STRENGTH
from generation.pipelines import DiffusersGenerator, GenerationTask
from generation.shapes import Scene, draw

PROMPT = "a red circle on a blue background"
UPSCALER = "builtin:upscale-x2"
DENOISE = 0.2


def main() -> None:
    args, setup = parse_common(__doc__.splitlines()[0], extra=lambda parser: (
        parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)"),))
    models = {"bench": ModelConfig(source=setup.source)}
    with_model = {denoise: DiffusersGenerator(models, device=setup.device, dtype=setup.dtype,
                                              cache_dir=setup.models_dir,
                                              upscale=UpscaleConfig(model=UPSCALER, denoise=denoise))
                  for denoise in (0.0, DENOISE)}
    without = DiffusersGenerator(models, device=setup.device, dtype=setup.dtype, cache_dir=setup.models_dir)
    picture = draw(Scene("red", "circle", "blue", size=36, centre=(32, 32))).resize((setup.side, setup.side))
    side = 2 * setup.side
    megapixels = side * side / 1e6
    rows: dict[str, Callable[[], float]] = {
        f"{UPSCALER}, no img2img pass": lambda: upscale(with_model[0.0], setup, picture, None),
        f"{UPSCALER}, then img2img at {DENOISE}": lambda: upscale(with_model[DENOISE], setup, picture, DENOISE),
        f"img2img at 2x, strength {UPSCALE_STRENGTH} (no model)": lambda: img2img_at_2x(without, setup, picture),
    }
    for timed in rows.values():  # warm-up: load every pipeline once
        on_torch(timed)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, timed in rows.items():
            times[name].append(on_torch(timed))
    per_megapixel = {name: statistics.median(seconds) / megapixels for name, seconds in times.items()}
    baseline = per_megapixel[list(rows)[-1]]
    print(f"# {setup.arch} ({setup.source}) on {setup.device}, {setup.side}x{setup.side} to {side}x{side}, "
          f"{setup.steps} steps, tiles of 512 overlapping by 32, median of {args.rounds} interleaved rounds, "
          f"torch {torch.__version__}")
    print_table(["", "s per output MP", "ratio to img2img at 2x"],
                [[name, seconds, seconds / baseline] for name, seconds in per_megapixel.items()])
    model_only, with_pass = (per_megapixel[name] / baseline for name in list(rows)[:2])
    print(f"headline: the upscale model alone takes {model_only:.3f}x the time of the img2img pass at 2x, "
          f"{with_pass:.2f}x with its img2img pass at {DENOISE}")


def upscale(generator: DiffusersGenerator, setup: BenchSetup, picture: PIL.Image.Image,
            denoise: float | None) -> float:
    params = GenerationParams(JobKind.UPSCALE, PROMPT, width=2 * picture.width, height=2 * picture.height,
                              steps=setup.steps, model="bench", seed=1, strength=denoise or None)
    start = time.perf_counter()
    generator.generate([GenerationTask(params, init_image=picture)])
    sync(setup)
    return time.perf_counter() - start


def img2img_at_2x(generator: DiffusersGenerator, setup: BenchSetup, picture: PIL.Image.Image) -> float:
    """What the job service and worker do without an upscale model: Lanczos to 2x, then img2img."""
    side = 2 * picture.width
    start = time.perf_counter()
    enlarged = picture.resize((side, side), PIL.Image.Resampling.LANCZOS)
    params = GenerationParams(JobKind.EDIT, PROMPT, width=side, height=side, steps=setup.steps, model="bench",
                              seed=1, strength=UPSCALE_STRENGTH)
    generator.generate([GenerationTask(params, init_image=enlarged)])
    sync(setup)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
