"""Make docs/images/upscale.png, the README's Upscale picture: `python docs/upscale_picture.py`.

`/imagine a red circle on a blue background --seed 3` on builtin:shapes (64x64), beside the same enlarged
to 128x128 by bicubic resizing and by builtin:upscale-x2 (Upscale with `denoise = 0`), each shown at
twice its size (nearest neighbour, so the pixels show).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.config import ModelConfig
from bot.domain import GenerationParams, JobKind
from generation.pipelines import DiffusersGenerator, GenerationTask
from generation.upscale import load_upscaler, upscale_image

OUT = Path(__file__).parent / "images" / "upscale.png"
GAP = 8


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        generator = DiffusersGenerator({"shapes": ModelConfig(source="builtin:shapes")}, device="cpu",
                                       dtype="float32", cache_dir=Path(cache))
        params = GenerationParams(JobKind.IMAGINE, "a red circle on a blue background", width=64, height=64,
                                  cfg=3.0, model="shapes", seed=3)
        [[picture]] = generator.generate([GenerationTask(params)])
    bicubic = picture.resize((128, 128), PIL.Image.Resampling.BICUBIC)
    upscaled = upscale_image(load_upscaler("builtin:upscale-x2", torch.device("cpu")), picture, (128, 128),
                             tile=512, overlap=32)
    shown = [image.resize((image.width * 2, image.height * 2), PIL.Image.Resampling.NEAREST)
             for image in (picture, bicubic, upscaled)]
    sheet = PIL.Image.new("RGB", (sum(image.width for image in shown) + GAP * 2, 256), "white")
    left = 0
    for image in shown:
        sheet.paste(image, (left, (256 - image.height) // 2))
        left += image.width + GAP
    sheet.save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
