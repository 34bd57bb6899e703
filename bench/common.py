"""What the benchmarks share: the model under test, settings in a throwaway folder, a table printer."""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import Settings, load_settings

ARCHES = {
    # arch: (model source, side in pixels, steps)
    "tiny": ("builtin:tiny", 64, 20),
    "shapes": ("builtin:shapes", 64, 20),
    "sd15": ("builtin:sd15-random", 512, 20),
}


@dataclass(frozen=True)
class BenchSetup:
    device: str
    arch: str
    source: str
    side: int
    steps: int
    models_dir: Path

    @property
    def dtype(self) -> str:
        return "float16" if self.device.startswith("cuda") else "float32"


def parse_common(description: str, extra: Any = None) -> tuple[argparse.Namespace, BenchSetup]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--arch", choices=sorted(ARCHES), default="tiny",
                        help="tiny: builtin:tiny; sd15: full-size SD 1.5 architecture, random weights")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 20)")
    parser.add_argument("--side", type=int, help="image width and height (default: the model's own)")
    parser.add_argument("--models-dir", type=Path, default=Path("data/models"),
                        help="where built-in models are built and cached")
    if extra:
        extra(parser)
    args = parser.parse_args()
    source, side, steps = ARCHES[args.arch]
    return args, BenchSetup(args.device, args.arch, source, args.side or side, args.steps or steps,
                            args.models_dir)


def bench_settings(setup: BenchSetup, data_dir: Path | None = None, **generation: Any) -> Settings:
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="easel-bench-"))
    return load_settings(
        None,
        storage={"data_dir": data_dir, "models_dir": setup.models_dir},
        models={"bench": {"source": setup.source, "default_width": setup.side, "default_height": setup.side}},
        generation={"default_model": "bench", "device": setup.device, "dtype": setup.dtype, **generation},
        limits={"max_side": max(1024, setup.side), "max_steps": max(50, setup.steps)},
        # Benchmarks measure the machinery, not the limits: no quota or queue cap may refuse them.
        queue={"max_queued_per_user": 100_000, "daily_images_per_user": 0},
        quota={"tiers": {"user": {"daily_units": float("inf"), "per_minute_units": float("inf")}},
               "max_queued_total": 0},
        console={"tier": "user"},  # the one tier above; the benchmarks' users are all plain users
    )


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.1f}"
    return str(value)
