"""LoRAs: time per image with none, one and two LoRAs on the same model in the same run, and what
switching LoRAs between batches costs next to reloading the model.

    python -m bench.loras                            # builtin:tiny on the CPU
    python -m bench.loras --device cuda --arch sd15  # SD 1.5's architecture on a GPU

The LoRAs are written for the model under test with random weights (rank `--rank`, on the attention
projections of every transformer block, the layers kohya-ss and diffusers train, in the kohya-ss
layout): speed does not depend on what a LoRA learned. Images go through Easel's generator, one
image per call, the three LoRA sets taking turns within each round so that a slow spell of a shared
machine falls on all of them; the table gives medians. The switching rows time the generator's own
steps: making another loaded LoRA the active one, loading a LoRA from its file, and loading the
model from disk (what a bot that reloaded its pipeline for each LoRA set would pay).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/loras.py`: import from the repository root, not from bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import bench  # noqa: F401  (and set up first, as `python -m` does: bench/__init__.py quiets transformers)

import statistics
import tempfile
import time

import torch
from safetensors.torch import save_file

from bench.common import BenchSetup, parse_common, print_table
from bot.config import ModelConfig
from bot.domain import GenerationParams, JobKind
from bot.extra_networks import ExtraNetworks
from generation.pipelines import DiffusersGenerator, GenerationTask, load_pipeline
from generation.train_extras import LORA_TARGETS

PROMPT = "a red circle on a blue background"
SETS: dict[str, tuple[tuple[str, float], ...]] = {
    "none": (),
    "one LoRA": (("bench_a", 0.8),),
    "two LoRAs": (("bench_a", 0.8), ("bench_b", 0.5)),
}


def write_random_lora(unet: torch.nn.Module, path: Path, rank: int, seed: int) -> None:
    """A kohya-ss LoRA for `unet` with random weights on LORA_TARGETS, as a trained one is laid out."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and "transformer_blocks" in name and \
                any(name.endswith(target) for target in LORA_TARGETS):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file({key: value.to(torch.float16) for key, value in tensors.items()}, path)


def main() -> None:
    args, setup = parse_common(__doc__.splitlines()[0], lambda parser: (
        parser.add_argument("--images", type=int, default=8, help="images per set per round (default 8)"),
        parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)"),
        parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default 4 on tiny, 16 on sd15)"),
    ))
    rank = args.rank or (16 if setup.arch == "sd15" else 4)
    lora_dir = Path(tempfile.mkdtemp(prefix="easel-bench-loras-"))
    generator = DiffusersGenerator({"bench": ModelConfig(source=setup.source, default_width=setup.side,
                                                         default_height=setup.side)},
                                   device=setup.device, dtype=setup.dtype, cache_dir=setup.models_dir,
                                   networks=ExtraNetworks(lora_dir, None))
    unet = generator._pipeline("bench", JobKind.IMAGINE).unet
    for seed, name in enumerate(("bench_a", "bench_b")):
        write_random_lora(unet, lora_dir / f"{name}.safetensors", rank, seed)

    # 1. Time per image with each LoRA set, interleaved rounds
    per_image: dict[str, list[float]] = {label: [] for label in SETS}
    for label in SETS:  # warm-up: each set loaded and run once
        generate(generator, setup, SETS[label], 1)
    for round_index in range(args.rounds):
        order = list(SETS)[round_index % len(SETS):] + list(SETS)[:round_index % len(SETS)]
        for label in order:
            per_image[label].append(generate(generator, setup, SETS[label], args.images) / args.images)
    medians = {label: statistics.median(times) for label, times in per_image.items()}

    # 2. Switching: another loaded LoRA made active; a LoRA loaded from its file; the model from disk
    loaded = generator._loaded_networks["bench"]
    switch = median_of(15, lambda i: loaded.activate(((("bench_a", "bench_b")[i % 2], 0.8),)))

    def load_fresh(i: int) -> None:
        for adapter in list(loaded.adapters):
            loaded.unload(adapter)
        loaded.activate((("bench_a", 0.8),))
    first_load = median_of(5, load_fresh)
    reload = median_of(3, lambda i: load_pipeline(setup.source, generator.device, generator.dtype, setup.models_dir))

    print(f"# {setup.arch} ({setup.source}) on {setup.device}, {setup.side}x{setup.side}, {setup.steps} steps, "
          f"one image per call, LoRAs of rank {rank} on {len(LORA_TARGETS)} projections of every transformer "
          f"block, median of {args.rounds} interleaved rounds of {args.images} images, torch {torch.__version__}")
    print_table(["LoRAs", "s/image", "time ratio"],
                [[label, medians[label], medians[label] / medians["none"]] for label in SETS])
    print()
    print_table(["between batches", "ms"],
                [["switch to another loaded LoRA", switch * 1000], ["load a LoRA from its file", first_load * 1000],
                 ["reload the model from disk", reload * 1000]])
    one, two = medians["one LoRA"] / medians["none"], medians["two LoRAs"] / medians["none"]
    verdict = "met" if max(one, two) <= 1.15 else "NOT met"
    print(f"headline: time per image {one:.2f}x with one LoRA and {two:.2f}x with two, against none (target "
          f"1.15x: {verdict}); switching LoRAs between batches {switch * 1000:.1f} ms against {reload * 1000:.0f} ms "
          f"to reload the model ({reload / switch:.0f}x)")


def generate(generator: DiffusersGenerator, setup: BenchSetup, loras: tuple[tuple[str, float], ...],
             images: int) -> float:
    """Seconds for `images` images, one call each."""
    sync(setup)
    start = time.perf_counter()
    for seed in range(images):
        params = GenerationParams(JobKind.IMAGINE, PROMPT, width=setup.side, height=setup.side, steps=setup.steps,
                                  model="bench", seed=seed, loras=loras)
        generator.generate([GenerationTask(params)])
    sync(setup)
    return time.perf_counter() - start


def median_of(times: int, action) -> float:
    """The median seconds of `action(i)` over `times` calls."""
    seconds = []
    for i in range(times):
        start = time.perf_counter()
        action(i)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def sync(setup: BenchSetup) -> None:
    if setup.device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
