"""Train `builtin:upscale-x2`, the small upscale model Easel ships: `python -m generation.train_upscaler`.

A Real-ESRGAN compact network (generation/upscale.py's SRVGGNetCompact: 16 features, 4 convolutions,
about 12,000 weights, 50 KB) learns to turn `builtin:shapes`-like pictures shrunk to half their size
(bicubic) back into the sharp pictures. Everything is seeded and runs on the CPU with one thread, so
the same command writes the same file: generation/models/upscale-x2/model.safetensors, beside a
training_log.json with the settings, the loss curve and how far from the sharp pictures the model and
plain bicubic enlarging are on pictures it never saw.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
from safetensors.torch import save_file

from generation.shapes import NEW_SHAPES, SHAPES, Description, Scene, all_combinations, draw, random_scene
from generation.upscale import SHIPPED_UPSCALERS, SRVGGNetCompact

SEED = 0
SIDE = 64  # the small pictures; the model makes them 128 pixels a side
BLUR_RADIUS = 1.5  # the most a small picture is blurred (Gaussian, in its pixels)
DEFAULTS = {"steps": 2500, "images": 1200, "batch": 32, "lr": 2e-3, "crop": 32, "features": 16, "convolutions": 4}
DEFAULT_OUT = SHIPPED_UPSCALERS["upscale-x2"].parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for model.safetensors")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--images", type=int, default=DEFAULTS["images"], help="training pictures")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--crop", type=int, default=DEFAULTS["crop"], help="side of the small crops trained on")
    parser.add_argument("--features", type=int, default=DEFAULTS["features"])
    parser.add_argument("--convolutions", type=int, default=DEFAULTS["convolutions"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: reproducible)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    small, sharp = pictures(args.images, SEED)
    network, losses = train(small, sharp, args, SEED + 1)
    test_small, test_sharp = pictures(200, SEED + 2)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in network.state_dict().items()},
              args.out / "model.safetensors", metadata={"architecture": "SRVGGNetCompact", "scale": "2"})
    log = {"seed": SEED, "settings": {**{key: getattr(args, key) for key in DEFAULTS}, "threads": args.threads,
                                      "torch": torch.__version__},
           "loss": losses, "held_out_mean_abs_error": held_out_errors(network, test_small, test_sharp),
           "seconds": round(time.monotonic() - started, 1)}
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    print(f"saved to {args.out} in {log['seconds']:.0f} s: {log['held_out_mean_abs_error']}")


def pictures(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random scenes (every colour, shape and background, the new shapes too) drawn at 64 pixels a
    side (two in three blurred by up to BLUR_RADIUS) and at 128: batches of (3, side, side) in [0, 1]."""
    rng = random.Random(seed)
    combinations = [*all_combinations(),
                    *(Description(c.colour, shape, c.background) for c in all_combinations()
                      for shape in NEW_SHAPES if c.shape == SHAPES[0])]
    small, sharp = [], []
    for _ in range(count):
        scene: Scene = random_scene(rng, combinations)
        # The same scene drawn at half the size, most often blurred a little as a diffusion model's
        # pictures are (Real-ESRGAN's recipe: degrade the small picture, learn the sharp one).
        sharp.append(to_tensor(draw(scene, SIDE * 2)))
        blur = rng.choice([0.0, rng.uniform(0.3, BLUR_RADIUS), rng.uniform(0.3, BLUR_RADIUS)])
        small.append(to_tensor(draw(scene, SIDE).filter(PIL.ImageFilter.GaussianBlur(blur))))
    return torch.stack(small), torch.stack(sharp)


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def train(small: torch.Tensor, sharp: torch.Tensor, args: argparse.Namespace,
          seed: int) -> tuple[SRVGGNetCompact, list[float]]:
    """Mean squared error on random crops (most hold an edge of the shape, where the detail is), Adam with
    a cosine schedule; the loss averaged over each twentieth of the steps. (With an L1 loss the network
    settles on adding nothing to its nearest-neighbour enlargement: the flat pixels, most of them, pull
    each added value to their median, 0.)"""
    torch.manual_seed(seed)
    network = SRVGGNetCompact(features=args.features, convolutions=args.convolutions, scale=2)
    optimiser = torch.optim.Adam(network.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.steps)
    generator = torch.Generator().manual_seed(seed)
    losses, recent, steps, crop = [], [], args.steps, args.crop
    for step in range(steps):
        picked = torch.randint(0, len(small), (args.batch,), generator=generator).tolist()
        corners = torch.randint(0, SIDE - crop + 1, (args.batch, 2), generator=generator).tolist()
        inputs = torch.stack([small[i, :, y:y + crop, x:x + crop] for i, (y, x) in zip(picked, corners, strict=True)])
        wanted = torch.stack([sharp[i, :, 2 * y:2 * (y + crop), 2 * x:2 * (x + crop)]
                              for i, (y, x) in zip(picked, corners, strict=True)])
        loss = (network(inputs) - wanted).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        recent.append(loss.item())
        if (step + 1) % max(1, steps // 20) == 0:
            losses.append(round(sum(recent) / len(recent), 5))
            recent = []
    return network.eval(), losses


def held_out_errors(network: SRVGGNetCompact, small: torch.Tensor, sharp: torch.Tensor) -> dict[str, float]:
    """Mean absolute error (0-255) from the sharp pictures: the model's, and plain bicubic enlarging's."""
    with torch.inference_mode():
        model = (network(small).clamp(0, 1) - sharp).abs().mean().item()
    bicubic = torch.nn.functional.interpolate(small, scale_factor=2, mode="bicubic").clamp(0, 1)
    return {"model": round(model * 255, 3), "bicubic": round((bicubic - sharp).abs().mean().item() * 255, 3)}


if __name__ == "__main__":
    main()
