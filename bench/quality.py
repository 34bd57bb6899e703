"""Quality: does `builtin:shapes` draw what it is told? Accuracy per attribute, through Easel's generator.

    python -m bench.quality                          # builtin:shapes, 20 steps, cfg 7, euler
    python -m bench.quality --source /tmp/my-shapes --seeds 2

Every (colour, shape, background) combination is prompted ("a red circle on a blue background"),
including the ones held out of training, `--seeds` times each with fixed seeds. Each picture is read
back by the deterministic checker of `generation/shapes.py` (nearest of the eight colours per pixel;
background from the border, shape from how much of its bounding box the shape fills). Targets:
colour and background right in at least 90% of the pictures, shape in 80%, and all three right
in 70% of the held-out combinations.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/quality.py`: import from the repository root, not from bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import bench  # noqa: F401  (and set up first, as `python -m` does: bench/__init__.py quiets transformers)

import argparse
import time

import torch

from bench.common import print_table
from bot.config import LimitsConfig, ModelConfig
from bot.domain import GenerationParams, JobKind
from generation.pipelines import DiffusersGenerator, GenerationTask
from generation.shapes import SIDE, Description, all_combinations, caption, describe, is_held_out

ATTRIBUTES = ("colour", "shape", "background")


def score(source: str, seeds: int = 1, steps: int | None = None, cfg: float | None = None,
          sampler: str = "euler", device: str = "cpu", models_dir: Path = Path("data/models"),
          batch: int = 8) -> dict[str, dict[str, float]]:
    """Generate every combination `seeds` times; per group ("trained", "held out", "all"), the share
    of pictures with each attribute right, and with all three right ("all three")."""
    limits = LimitsConfig()
    generator = DiffusersGenerator({"shapes": ModelConfig(source=source, default_width=SIDE, default_height=SIDE)},
                                   device=device, dtype="float32", cache_dir=models_dir)
    prompts = [(combo, seed) for combo in all_combinations() for seed in range(seeds)]
    results: list[tuple[Description, Description]] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        tasks = [GenerationTask(GenerationParams(
            JobKind.IMAGINE, caption(*combo), width=SIDE, height=SIDE, model="shapes",
            steps=steps or limits.default_steps, cfg=cfg or limits.default_cfg, sampler=sampler,
            seed=1000 * seed + index)) for index, (combo, seed) in enumerate(chunk, start)]
        for (combo, _), [image] in zip(chunk, generator.generate(tasks), strict=True):
            results.append((combo, describe(image)))

    groups = {"trained": [r for r in results if not is_held_out(*r[0])],
              "held out": [r for r in results if is_held_out(*r[0])], "all": results}
    return {name: _accuracy(rows) for name, rows in groups.items()}


def _accuracy(rows: list[tuple[Description, Description]]) -> dict[str, float]:
    scores = {attribute: sum(getattr(want, attribute) == getattr(got, attribute) for want, got in rows) / len(rows)
              for attribute in ATTRIBUTES}
    scores["all three"] = sum(want == got for want, got in rows) / len(rows)
    scores["images"] = len(rows)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="builtin:shapes", help="model source (default builtin:shapes)")
    parser.add_argument("--seeds", type=int, default=1, help="pictures per combination (default 1)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: Easel's, 20)")
    parser.add_argument("--cfg", type=float, help="guidance scale (default: Easel's, 7)")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--models-dir", type=Path, default=Path("data/models"))
    args = parser.parse_args()

    started = time.monotonic()
    groups = score(args.source, args.seeds, args.steps, args.cfg, args.sampler, args.device, args.models_dir)
    limits = LimitsConfig()
    print(f"# {args.source} on {args.device}, {SIDE}x{SIDE}, {args.steps or limits.default_steps} steps, "
          f"cfg {args.cfg or limits.default_cfg}, {args.sampler}, {args.seeds} seed(s) per combination, "
          f"torch {torch.__version__}, {time.monotonic() - started:.0f} s")
    print_table(["prompts", "images", *ATTRIBUTES, "all three"],
                [[name, int(s["images"]), *(s[a] for a in ATTRIBUTES), s["all three"]] for name, s in groups.items()])
    every, held = groups["all"], groups["held out"]
    met = (every["colour"] >= 0.9 and every["background"] >= 0.9 and every["shape"] >= 0.8
           and held["all three"] >= 0.7)
    print(f"headline: colour {every['colour']:.0%}, background {every['background']:.0%}, shape "
          f"{every['shape']:.0%}, held-out combinations all right {held['all three']:.0%} "
          f"(targets 90/90/80/70%: {'met' if met else 'NOT met'})")


if __name__ == "__main__":
    main()
