"""Quality: does `builtin:shapes` draw what it is told? Accuracy per attribute, through Easel's generator.

    python -m bench.quality                          # builtin:shapes, 20 steps, cfg 7, euler
    python -m bench.quality --source /tmp/my-shapes --seeds 2
    python -m bench.quality --extras generation/models/shapes-extras   # + the LoRA and embedding rows

Every (colour, shape, background) combination is prompted ("a red circle on a blue background"),
including the ones held out of training, `--seeds` times each with fixed seeds. Each picture is read
back by the deterministic checker of `generation/shapes.py` (nearest of the eight colours per pixel;
background from the border, shape from how much of its bounding box the shape fills). Targets:
colour and background right in at least 90% of the pictures, shape in 80%, and all three right
in 70% of the held-out combinations.

With `--extras FOLDER` (the `loras/` and `embeddings/` that generation/train_extras.py writes), a
second table scores what they teach, read back by the same checker: the `ring` and `cross` LoRAs on
prompts of their shape in every colour pair (alone, both together, and none for comparison), the
trained prompts with a LoRA active (what it leaves alone), and the `crimson` embedding on prompts
with "crimson" for the shape's colour or the background (right when red is drawn there), beside the
same prompts with "red".
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
from bot.extra_networks import ExtraNetworks
from generation.pipelines import DiffusersGenerator, GenerationTask
from generation.shapes import (
    COLOURS,
    SHAPES,
    SIDE,
    Description,
    all_combinations,
    caption,
    describe,
    is_held_out,
    training_combinations,
)

ATTRIBUTES = ("colour", "shape", "background")


# (prompt, what it should draw, LoRAs): one picture to check
Case = tuple[str, Description, tuple[tuple[str, float], ...]]


def score(source: str, seeds: int = 1, steps: int | None = None, cfg: float | None = None,
          sampler: str = "euler", device: str = "cpu", models_dir: Path = Path("data/models"),
          batch: int = 8) -> dict[str, dict[str, float]]:
    """Generate every combination `seeds` times; per group ("trained", "held out", "all"), the share
    of pictures with each attribute right, and with all three right ("all three")."""
    generator = _generator(source, device, models_dir)
    cases = [(caption(*combo), combo, ()) for combo in all_combinations()]
    results = _draw(generator, cases, seeds, steps, cfg, sampler, batch)
    groups = {"trained": [r for r in results if not is_held_out(*r[0])],
              "held out": [r for r in results if is_held_out(*r[0])], "all": results}
    return {name: _accuracy(rows) for name, rows in groups.items()}


def score_extras(source: str, extras: Path, seeds: int = 1, steps: int | None = None, cfg: float | None = None,
                 sampler: str = "euler", device: str = "cpu", models_dir: Path = Path("data/models"),
                 batch: int = 8) -> dict[str, dict[str, float]]:
    """The LoRA and embedding rows: per row, the share of pictures with each attribute right."""
    generator = _generator(source, device, models_dir, ExtraNetworks(extras / "loras", extras / "embeddings"))
    pairs = [(colour, background) for colour in COLOURS for background in COLOURS if colour != background]
    ring, cross, both = (("ring", 1.0),), (("cross", 1.0),), (("cross", 1.0), ("ring", 1.0))

    def drawing(shape: str, loras: tuple[tuple[str, float], ...]) -> list[Case]:
        return [(caption(colour, shape, background), Description(colour, shape, background), loras)
                for colour, background in pairs]

    reds = [Description("red", shape, background) for shape in SHAPES for background in COLOURS if background != "red"]
    reds += [Description(colour, shape, "red") for colour in COLOURS if colour != "red" for shape in SHAPES]

    def spelled(word: str) -> list[Case]:
        return [(caption(*want).replace("red", word), want, ()) for want in reds]

    rows: dict[str, list[Case]] = {
        "ring prompts, no LoRA": drawing("ring", ()),
        "ring prompts, ring LoRA": drawing("ring", ring),
        "cross prompts, cross LoRA": drawing("cross", cross),
        "ring and cross prompts, both LoRAs": drawing("ring", both) + drawing("cross", both),
        "trained prompts, ring LoRA": [(caption(*combo), combo, ring) for combo in training_combinations()],
        "red prompts": spelled("red"),
        "crimson prompts, embedding": spelled("crimson"),
    }
    return {name: _accuracy(_draw(generator, cases, seeds, steps, cfg, sampler, batch))
            for name, cases in rows.items()}


def _generator(source: str, device: str, models_dir: Path, networks: ExtraNetworks | None = None) -> DiffusersGenerator:
    return DiffusersGenerator({"shapes": ModelConfig(source=source, default_width=SIDE, default_height=SIDE)},
                              device=device, dtype="float32", cache_dir=models_dir, networks=networks)


def _draw(generator: DiffusersGenerator, cases: list[Case], seeds: int, steps: int | None, cfg: float | None,
          sampler: str, batch: int) -> list[tuple[Description, Description]]:
    """Each case `seeds` times (seed 1000 * s + its index), `batch` pictures a call: (wanted, drawn) pairs."""
    limits = LimitsConfig()
    pictures = [(case, seed) for case in cases for seed in range(seeds)]
    results: list[tuple[Description, Description]] = []
    for start in range(0, len(pictures), batch):
        chunk = pictures[start : start + batch]
        for loras in dict.fromkeys(case[2] for case, _ in chunk):  # one call per LoRA set (the batch key)
            same = [(index, case, seed) for index, (case, seed) in enumerate(chunk, start) if case[2] == loras]
            tasks = [GenerationTask(GenerationParams(
                JobKind.IMAGINE, prompt, width=SIDE, height=SIDE, model="shapes", loras=loras,
                steps=steps or limits.default_steps, cfg=cfg or limits.default_cfg, sampler=sampler,
                seed=1000 * seed + index)) for index, (prompt, _, _), seed in same]
            for (_, (_, want, _), _), [image] in zip(same, generator.generate(tasks), strict=True):
                results.append((want, describe(image)))
    return results


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
    parser.add_argument("--extras", type=Path, help="also score the LoRAs and embedding in this folder "
                        "(generation/models/shapes-extras)")
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
    if args.extras is None:
        return
    started = time.monotonic()
    rows = score_extras(args.source, args.extras, args.seeds, args.steps, args.cfg, args.sampler, args.device,
                        args.models_dir)
    print(f"\n# LoRAs and embedding of {args.extras}, same settings, {time.monotonic() - started:.0f} s")
    print_table(["prompts", "images", *ATTRIBUTES, "all three"],
                [[name, int(s["images"]), *(s[a] for a in ATTRIBUTES), s["all three"]] for name, s in rows.items()])
    print(f"headline: rings drawn {rows['ring prompts, ring LoRA']['shape']:.0%} with the ring LoRA "
          f"({rows['ring prompts, no LoRA']['shape']:.0%} without), crosses "
          f"{rows['cross prompts, cross LoRA']['shape']:.0%}, both LoRAs together "
          f"{rows['ring and cross prompts, both LoRAs']['shape']:.0%}; trained prompts all right "
          f"{rows['trained prompts, ring LoRA']['all three']:.0%} with the ring LoRA active; \"crimson\" prompts all "
          f"right {rows['crimson prompts, embedding']['all three']:.0%} (the same with \"red\": "
          f"{rows['red prompts']['all three']:.0%})")


if __name__ == "__main__":
    main()
