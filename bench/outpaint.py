"""Outpaint and animation frames: Easel's time per outpaint and per animation frame against plain
diffusers' inpaint and img2img on the same model in the same run.

    python -m bench.outpaint                            # builtin:tiny on the CPU
    python -m bench.outpaint --device cuda --arch sd15  # SD 1.5's architecture on a GPU

Outpaint: `--zoom 2` of a side x side picture, so a canvas twice as wide and high. Easel's row is what
its job service and worker compute: the canvas laid out and pre-filled from the picture's edges
(bot/outpaint.py), the generator's inpaint call, and the feathered composite. The plain row is
diffusers' StableDiffusionInpaintPipeline called on the same canvas and mask, with the same steps,
strength, sampler and seed. Animation: a clip of `--frames` frames through generation/animation.py
(the camera move, then img2img at strength 0.35, one call per frame), timed per frame after the first;
the plain row is StableDiffusionImg2ImgPipeline called on each moved frame in turn. Easel and plain
diffusers take turns within each round, so a slow spell of a shared machine falls on both; the table
gives medians.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/outpaint.py`: import from the repository root, not from bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import bench  # noqa: F401  (and set up first, as `python -m` does: bench/__init__.py quiets transformers)

import statistics
import time
from collections.abc import Callable

import PIL.Image
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

from bench.common import BenchSetup, parse_common, print_table
from bot.animation import camera_move
from bot.config import LimitsConfig, ModelConfig
from bot.domain import GenerationParams, JobKind, Motion, OutpaintMargins
from bot.outpaint import outpaint_canvas, outpaint_layout
from generation.animation import animate
from generation.builtin import ensure_builtin
from generation.pipelines import DTYPE_KEYWORD, DiffusersGenerator, GenerationTask
from generation.samplers import make_scheduler
from generation.shapes import Scene, draw
from generation.worker import TORCH_THREAD

PROMPT = "a red circle on a blue background"
OUTPAINT_STRENGTH = 0.6  # limits.default_outpaint_strength
FRAME_STRENGTH = 0.35  # limits.default_animate_strength
MOTION_ZOOM, MOTION_PAN = 1.04, (1.0, 0.0)


def main() -> None:
    args, setup = parse_common(__doc__.splitlines()[0], extra=lambda parser: (
        parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)"),
        parser.add_argument("--frames", type=int, default=6, help="frames per clip (default 6)")))
    generator = DiffusersGenerator({"bench": ModelConfig(source=setup.source)}, device=setup.device,
                                   dtype=setup.dtype, cache_dir=setup.models_dir)
    picture = draw(Scene("red", "circle", "blue", size=24, centre=(32, 32))).resize((setup.side, setup.side))
    limits = LimitsConfig(max_side=4 * setup.side, max_pixels=16 * setup.side * setup.side)
    motion = Motion(frames=args.frames, zoom=MOTION_ZOOM, pan=MOTION_PAN)
    plain = PlainDiffusers(setup)
    rows = {
        "outpaint --zoom 2": (lambda: easel_outpaint(generator, setup, picture, limits),
                              lambda: plain.inpaint(picture, limits)),
        "animation frame": (lambda: easel_frames(generator, setup, picture, motion) / (motion.frames - 1),
                            lambda: plain.frames(picture, motion) / (motion.frames - 1)),
    }
    for easel, baseline in rows.values():  # warm-up: load every pipeline once
        on_torch(easel), on_torch(baseline)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in rows}
    for _ in range(args.rounds):
        for name, (easel, baseline) in rows.items():
            times[name][0].append(on_torch(easel))
            times[name][1].append(on_torch(baseline))
    medians = {name: (statistics.median(easel), statistics.median(baseline))
               for name, (easel, baseline) in times.items()}
    print(f"# {setup.arch} ({setup.source}) on {setup.device}, {setup.side}x{setup.side} picture, {setup.steps} steps, "
          f"outpaint strength {OUTPAINT_STRENGTH}, {motion.frames}-frame clip at strength {FRAME_STRENGTH}, median "
          f"of {args.rounds} interleaved rounds, torch {torch.__version__}")
    print_table(["", "Easel s", "plain diffusers s", "time ratio"],
                [[name, easel, baseline, easel / baseline] for name, (easel, baseline) in medians.items()])
    outpaint, frame = (medians[name][0] / medians[name][1] for name in rows)
    print(f"headline: {outpaint:.2f}x plain diffusers' inpaint per outpaint, {frame:.2f}x its img2img per animation "
          "frame (target at most 1.1x)")


def easel_outpaint(generator: DiffusersGenerator, setup: BenchSetup, picture: PIL.Image.Image,
                   limits: LimitsConfig) -> float:
    start = time.perf_counter()
    layout = outpaint_layout(picture.width, picture.height, OutpaintMargins(zoom=2), limits)
    canvas, mask = outpaint_canvas(picture, layout)
    params = GenerationParams(JobKind.OUTPAINT, PROMPT, width=layout.canvas[0], height=layout.canvas[1],
                              steps=setup.steps, model="bench", seed=1, strength=OUTPAINT_STRENGTH)
    generator.generate([GenerationTask(params, canvas, mask)])
    sync(setup)
    return time.perf_counter() - start


def easel_frames(generator: DiffusersGenerator, setup: BenchSetup, picture: PIL.Image.Image,
                 motion: Motion) -> float:
    """Seconds for every frame after the first (the first is the picture, as when a clip starts from one)."""
    params = GenerationParams(JobKind.ANIMATE, PROMPT, width=setup.side, height=setup.side, steps=setup.steps,
                              model="bench", seed=1, strength=FRAME_STRENGTH, motion=motion)
    start = time.perf_counter()
    animate(generator.generate, [GenerationTask(params, init_image=picture)], [[]], lambda *_: None)
    sync(setup)
    return time.perf_counter() - start


class PlainDiffusers:
    """The same model in diffusers' own inpaint and img2img pipelines, called as their docs show."""

    def __init__(self, setup: BenchSetup) -> None:
        self.setup = setup
        folder = ensure_builtin(setup.source.removeprefix("builtin:"), setup.models_dir)
        dtype = torch.float16 if setup.dtype == "float16" else torch.float32
        self.inpaint_pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, **{DTYPE_KEYWORD: dtype}).to(
            setup.device)
        self.img2img_pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, **{DTYPE_KEYWORD: dtype}).to(
            setup.device)
        for pipe in (self.inpaint_pipe, self.img2img_pipe):
            pipe.set_progress_bar_config(disable=True)

    def inpaint(self, picture: PIL.Image.Image, limits: LimitsConfig) -> float:
        layout = outpaint_layout(picture.width, picture.height, OutpaintMargins(zoom=2), limits)
        canvas, mask = outpaint_canvas(picture, layout)  # the same inputs, made before the clock starts
        pipe = self.inpaint_pipe
        start = time.perf_counter()
        pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
        pipe(PROMPT, image=canvas, mask_image=mask, width=layout.canvas[0], height=layout.canvas[1],
             num_inference_steps=self.setup.steps, strength=OUTPAINT_STRENGTH,
             generator=torch.Generator("cpu").manual_seed(1))
        sync(self.setup)
        return time.perf_counter() - start

    def frames(self, picture: PIL.Image.Image, motion: Motion) -> float:
        pipe = self.img2img_pipe
        frame = picture
        start = time.perf_counter()
        for _ in range(motion.frames - 1):
            pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
            frame = pipe(PROMPT, image=camera_move(frame, motion), num_inference_steps=self.setup.steps,
                         strength=FRAME_STRENGTH, generator=torch.Generator("cpu").manual_seed(1)).images[0]
        sync(self.setup)
        return time.perf_counter() - start


def on_torch(timed: Callable[[], float]) -> float:
    """Run on the thread Easel's worker runs torch on (each thread calling torch gets its own OpenMP pool)."""
    return TORCH_THREAD.submit(timed).result()


def sync(setup: BenchSetup) -> None:
    if setup.device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
