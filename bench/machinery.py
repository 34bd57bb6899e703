"""Machinery: what Easel costs per job beyond the diffusers call, against plain diffusers' time per image.

    python -m bench.machinery                       # builtin:tiny's image time on the CPU as the yardstick
    python -m bench.machinery --device cuda --arch sd15

Easel runs here as in bench.throughput (one core and one worker kept up across rounds, simulated users
who submit, wait for the result and submit again), but its worker's generator returns at once: blank
images of each job's size. What is timed is everything else a job pays: the submission, the claim, the
PNG stored, the finish and the owner's reads of its events. That cost over plain diffusers' time per
image, measured in the same run, is how far above 1.00x bench.throughput's one-user row must be; it
moves much less from run to run than that row, so changes to the machinery are measured here.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/machinery.py`: import from the repository root, not from bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import bench  # noqa: F401  (and set up first, as `python -m` does: bench/__init__.py quiets transformers)

import asyncio
import statistics

import torch
from PIL import Image

from bench.common import parse_common, print_table
from bench.throughput import measure_rounds, plain_diffusers
from generation.pipelines import GenerationTask


class InstantGenerator:
    """A generator that returns at once: a blank image of the job's size per seed, in a colour of its own.
    Like the real one, it holds each model it was asked for from then on (the worker's claims read
    `loaded_models`: a job for a model not loaded makes them look for idle workers that have it)."""

    def __init__(self) -> None:
        self.loaded_models: list[str] = []

    def generate(self, tasks: list[GenerationTask], on_step: object = None) -> list[list[Image.Image]]:
        self.loaded_models = sorted({*self.loaded_models, *(task.params.model for task in tasks)})
        return [[Image.new("RGB", (task.params.width, task.params.height), (seed % 256, seed // 256 % 256, 0))
                 for seed in task.params.image_seeds()] for task in tasks]

    def warm(self, model_name: str) -> None:
        pass


def main() -> None:
    args, setup = parse_common(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--jobs", type=int, default=48, help="one-image jobs per measurement (default 48)"),
        p.add_argument("--concurrency", default="1,16", help="simulated users, comma-separated"),
        p.add_argument("--rounds", type=int, default=7, help="measurements per concurrency; the table shows medians"),
        p.add_argument("--images", type=int, default=12, help="plain diffusers images timed for the yardstick"),
    ))
    concurrencies = [int(users) for users in args.concurrency.split(",")]
    print(f"# {setup.arch} ({setup.source}) on {setup.device}, {setup.side}x{setup.side}, {setup.steps} steps, "
          f"{args.jobs} jobs per measurement, median of {args.rounds} rounds, torch {torch.__version__}")
    plain = plain_diffusers(setup)
    image_s = statistics.median(plain(args.images) / args.images for _ in range(3))
    _, runs = asyncio.run(measure_rounds(setup, InstantGenerator(), {}, concurrencies, args.jobs, args.rounds,
                                         max_batch=4))

    rows = [["plain diffusers, one image", "-", "-", image_s * 1000, "-", "-", "-", 1.0]]
    per_job = {}
    for users, measured in runs.items():
        seconds = statistics.median(run.seconds for run in measured)
        per_job[users] = seconds / args.jobs
        rows.append([f"easel machinery, {users} user(s)", users,
                     f"{statistics.median(run.mean_batch for run in measured):.1f}", per_job[users] * 1000,
                     f"{statistics.median(run.loop_ms_per_job for run in measured):.1f}",
                     f"{statistics.median(run.statements_per_job for run in measured):.1f}",
                     f"{1 + per_job[users] / image_s:.3f}x" if users == 1 else "-", per_job[users] / image_s])
    print_table(["what", "users", "batch", "ms/job", "loop ms/job", "SQL/job", "best 1-user ratio", "of an image"],
                rows)
    alone = min(per_job)  # the fewest users: one, unless --concurrency leaves it out
    print(f"headline: one user's job costs {per_job[alone] * 1000:.1f} ms beyond the diffusers call, "
          f"{per_job[alone] / image_s:.3f} of plain diffusers' {image_s * 1000:.0f} ms image, so bench.throughput's "
          f"one-user row is about {1 + per_job[alone] / image_s:.3f}x at best here")


if __name__ == "__main__":
    main()
