"""PNG encoding: what storing one generated picture costs at Easel's zlib level against PIL's default,
on the same picture in the same run.

    python -m bench.png                    # a 512x512 photo-like picture made here
    python -m bench.png --picture FILE     # any picture, cut to a square and resized to --side

Every image the worker stores is PNG-encoded on the way (bot/images.py to_png_bytes) before its job
can finish, so with one user the encoding adds to each image's wait. The built-in models' 64x64
pictures encode in well under a millisecond; a 512x512 picture takes tens of milliseconds, and
how many depends on the zlib level and on the picture: smooth, photo-like pictures (what Stable
Diffusion makes) cost the most at high levels. The picture made here has a photo's spectrum (amplitude
falling as 1/f^1.5), which gives the same figures as photos resized to 512x512 do. Levels take turns
within each round; the table gives medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bench.common import print_table
from bot.images import PNG_COMPRESS_LEVEL, to_png_bytes

PIL_DEFAULT_LEVEL = 6


def photo_like(side: int, seed: int = 0) -> Image.Image:
    """A picture with a natural photo's statistics: noise shaped to a 1/f^1.5 amplitude spectrum, its
    three channels correlated as a photo's are."""
    rng = np.random.default_rng(seed)
    frequency = np.hypot(np.fft.fftfreq(side)[:, None], np.fft.rfftfreq(side)[None, :])
    frequency[0, 0] = 1.0
    shared = rng.standard_normal((side, side))
    channels = []
    for _ in range(3):
        noise = 0.7 * shared + 0.3 * rng.standard_normal((side, side))
        field = np.fft.irfft2(np.fft.rfft2(noise) / frequency**1.5, s=(side, side))
        channels.append((field - field.mean()) / field.std())
    pixels = np.stack(channels, axis=-1) * 45 + 128
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def encode(picture: Image.Image, level: int) -> tuple[float, int]:
    """Seconds and bytes for one PNG encoding by the function the worker stores pictures with."""
    start = time.perf_counter()
    png = to_png_bytes(picture, compress_level=level)
    return time.perf_counter() - start, len(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--picture", type=Path, help="a picture to encode instead of the photo-like one")
    parser.add_argument("--side", type=int, default=512, help="width and height in pixels (default 512)")
    parser.add_argument("--rounds", type=int, default=15, help="encodings per level, taking turns (default 15)")
    args = parser.parse_args()
    if args.picture:
        try:
            with Image.open(args.picture) as opened:
                picture = ImageOps.fit(opened.convert("RGB"), (args.side, args.side), Image.Resampling.LANCZOS)
        except (OSError, ValueError) as error:  # missing, unreadable, or not a picture PIL can open
            parser.error(f"--picture {args.picture}: {error}")
    else:
        picture = photo_like(args.side)
    levels = {f"PIL's default (level {PIL_DEFAULT_LEVEL})": PIL_DEFAULT_LEVEL,
              f"Easel (level {PNG_COMPRESS_LEVEL})": PNG_COMPRESS_LEVEL}
    seconds: dict[str, list[float]] = {name: [] for name in levels}
    sizes: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, level in levels.items():
            elapsed, sizes[name] = encode(picture, level)
            seconds[name].append(elapsed)
    default, easel = (statistics.median(runs) for runs in seconds.values())
    default_bytes, easel_bytes = sizes.values()
    print(f"# {args.picture or 'photo-like picture'} at {args.side}x{args.side}, median of {args.rounds} rounds")
    print_table(["encoder", "ms", "KiB", "time ratio", "size ratio"],
                [[name, statistics.median(runs) * 1000, sizes[name] / 1024, statistics.median(runs) / default,
                  sizes[name] / default_bytes] for name, runs in seconds.items()])
    print(f"headline: Easel encodes a {args.side}x{args.side} picture in {easel * 1000:.1f} ms, "
          f"{easel / default:.2f}x PIL's default level's {default * 1000:.1f} ms, for a file "
          f"{easel_bytes / default_bytes:.2f}x the size")


if __name__ == "__main__":
    main()
