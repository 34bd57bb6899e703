"""The upscale model behind the Upscale button: a Real-ESRGAN compact network, run in tiles.

`[upscale] model` names it: `builtin:upscale-x2` (a tiny one trained offline on `builtin:shapes`-like
pictures by generation/train_upscaler.py, shipped in generation/models/upscale-x2/), or a Real-ESRGAN
compact (SRVGGNetCompact) state dict saved as .safetensors, such as realesr-general-x4v3 or
realesr-animevideov3 (a .pth converts with `easel convert-checkpoint`, which reads tensors only).

The picture is cut into overlapping tiles, each run alone, and the tiles are blended back with linear
ramps across the overlaps: memory stays that of one tile whatever the picture's size, and the network
sees little enough around each pixel (a few 3x3 convolutions) that the seams do not show.

The network is read by the ~30 lines below rather than by spandrel, which reads every ESRGAN-family
architecture: spandrel imports torchvision when imported, and PyPI's torchvision wheel does not load
beside the CPU build of torch that constraints/torch.txt pins ("operator torchvision::nms does not
exist"), so it would break CPU installs and CI, and bring torchvision and einops for one architecture.

Example:
    >>> upscaler = load_upscaler("builtin:upscale-x2", torch.device("cpu"))
    >>> bigger = upscale_image(upscaler, picture, (128, 128), tile=512, overlap=32)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional

from bot.catalog import PICKLE_SUFFIXES, pickle_refusal
from bot.config import BUILTIN_UPSCALERS
from bot.errors import GenerationFailed, first_line

BUILTIN_PREFIX = "builtin:"
SHIPPED_UPSCALERS: dict[str, Path] = {
    name: Path(__file__).parent / "models" / name / "model.safetensors" for name in BUILTIN_UPSCALERS}


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network (xinntao/Real-ESRGAN, BSD-3-Clause), with its state dict's names:
    `body.0` a 3x3 convolution to `features` channels, then PReLU and `convolutions` more 3x3
    convolutions each followed by a PReLU, a last convolution to 3 x scale² channels, a pixel shuffle to
    the larger size, plus the input enlarged by nearest neighbour (so the network learns the detail only).
    """

    def __init__(self, features: int = 16, convolutions: int = 4, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(3, features, 3, 1, 1), nn.PReLU(features)]
        for _ in range(convolutions):
            layers += [nn.Conv2d(features, features, 3, 1, 1), nn.PReLU(features)]
        layers.append(nn.Conv2d(features, 3 * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(scale)

    def forward(self, pictures: torch.Tensor) -> torch.Tensor:
        out = pictures
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + functional.interpolate(pictures, scale_factor=self.scale, mode="nearest")

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str) -> SRVGGNetCompact:
        """The network a state dict describes; GenerationFailed naming `source` when it is not one of these."""
        convs = sorted(int(key.split(".")[1]) for key in state if key.startswith("body.") and key.endswith(".weight")
                       and state[key].ndim == 4)
        first, last = (f"body.{convs[0]}.weight", f"body.{convs[-1]}.weight") if convs else ("", "")
        if not convs or convs != list(range(0, convs[-1] + 1, 2)) or state[first].shape[1] != 3:
            raise GenerationFailed(f"upscale model {source} is not a Real-ESRGAN compact (SRVGGNetCompact) state "
                                   "dict (body.0.weight, body.1.weight, ...); set [upscale] model to one, or to "
                                   "builtin:upscale-x2")
        scale = math.isqrt(state[last].shape[0] // 3)
        model = cls(features=state[first].shape[0], convolutions=len(convs) - 2, scale=scale)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:  # a PReLU missing or extra layers: another architecture
            raise GenerationFailed(f"upscale model {source} does not load as a Real-ESRGAN compact network: "
                                   f"{first_line(error)}") from error
        return model


@dataclass
class Upscaler:
    """A loaded upscale model: its name as [upscale] model gives it, its network and its scale."""

    name: str
    network: SRVGGNetCompact
    device: torch.device

    @property
    def scale(self) -> int:
        return self.network.scale

    @property
    def sees(self) -> int:
        """How many pixels around a pixel the network reads: one per 3x3 convolution."""
        return sum(1 for layer in self.network.body if isinstance(layer, nn.Conv2d))


def load_upscaler(source: str, device: torch.device) -> Upscaler:
    """Load `[upscale] model` (`builtin:NAME` or a .safetensors file) in float32 onto `device`."""
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        if name not in SHIPPED_UPSCALERS:
            raise GenerationFailed(f"upscale model {source!r} is unknown; the built-in ones are "
                                   f"{', '.join(BUILTIN_PREFIX + known for known in SHIPPED_UPSCALERS)}")
        path = SHIPPED_UPSCALERS[name]
        if not path.is_file():
            raise GenerationFailed(f"built-in upscale model {source} is missing from {path}; reinstall Easel or "
                                   f"retrain it with: python -m generation.train_upscaler")
    else:
        path = Path(source).expanduser()
        if source.lower().endswith(PICKLE_SUFFIXES):
            raise GenerationFailed(pickle_refusal(path))
        if not path.is_file():
            raise GenerationFailed(f"upscale model file {source} does not exist; fix [upscale] model")
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as error:
        raise GenerationFailed(f"could not read upscale model {source}: {first_line(error)}") from error
    network = SRVGGNetCompact.from_state_dict(state, source).eval().to(device)
    return Upscaler(name=source, network=network, device=device)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side of `length` pixels start: `tile` apart less `overlap`, the last one
    ending at the edge; one tile when the side is no longer than a tile."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return [*starts, length - tile]


def blend_weights(size: tuple[int, int], ramps: tuple[int, int, int, int]) -> np.ndarray:
    """A tile's weight (height x width): 1 inside, rising linearly across each side's `ramps` (left, top,
    right, bottom; 0 where the tile meets the picture's edge), never 0 so every pixel counts."""
    width, height = size

    def ramp(length: int, start: int, end: int) -> np.ndarray:
        weights = np.ones(length, dtype=np.float32)
        if start:
            weights[:start] = (np.arange(start, dtype=np.float32) + 1) / (start + 1)
        if end:
            weights[length - end:] = np.minimum(weights[length - end:], (np.arange(end, 0, -1) / (end + 1)))
        return weights

    left, top, right, bottom = ramps
    return np.outer(ramp(height, top, bottom), ramp(width, left, right))


def run_tiled(picture: np.ndarray, scale: int, tile: int, overlap: int,
              run: Callable[[np.ndarray], np.ndarray], context: int = 0) -> np.ndarray:
    """`run` (a float32 height x width x 3 tile to one `scale` times larger) over overlapping tiles of
    `picture`, `tile` pixels square and `overlap` apart (in `picture`'s pixels), blended into one. Each
    tile is run with up to `context` more pixels around it, cut off again: a network that sees that far
    around a pixel then gives every tile's pixels exactly as it would give the whole picture's."""
    height, width = picture.shape[:2]
    out = np.zeros((height * scale, width * scale, 3), dtype=np.float32)
    weight = np.zeros((height * scale, width * scale, 1), dtype=np.float32)
    rows, columns = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    for row, top in enumerate(rows):
        for column, left in enumerate(columns):
            bottom, right = min(top + tile, height), min(left + tile, width)
            above, before = min(context, top), min(context, left)
            result = run(picture[top - above:min(bottom + context, height), left - before:min(right + context, width)])
            rows_kept = slice(above * scale, (above + bottom - top) * scale)
            result = result[rows_kept, before * scale:(before + right - left) * scale]
            # Ramp only where the tile meets a neighbour, across the whole band they share (with
            # several tiles along a side, each is `tile` long).
            ramps = (columns[column - 1] + tile - left if column else 0,
                     rows[row - 1] + tile - top if row else 0,
                     right - columns[column + 1] if column + 1 < len(columns) else 0,
                     bottom - rows[row + 1] if row + 1 < len(rows) else 0)
            tile_weight = blend_weights((result.shape[1], result.shape[0]),
                                        (ramps[0] * scale, ramps[1] * scale, ramps[2] * scale, ramps[3] * scale))
            box = (slice(top * scale, bottom * scale), slice(left * scale, right * scale))
            out[box] += result * tile_weight[..., None]
            weight[box] += tile_weight[..., None]
    return out / weight


def upscale_image(upscaler: Upscaler, picture: PIL.Image.Image, size: tuple[int, int], *, tile: int,
                  overlap: int) -> PIL.Image.Image:
    """`picture` through the upscale model in tiles of `tile` output pixels overlapping by `overlap`,
    then resized (Lanczos) to `size` where the model's scale gives another size."""
    scale = upscaler.scale
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255

    def run(part: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(part)).permute(2, 0, 1)[None].to(upscaler.device)
        with torch.inference_mode():
            result = upscaler.network(tensor)
        return result[0].permute(1, 2, 0).float().cpu().numpy()

    enlarged = run_tiled(pixels, scale, max(8, tile // scale), overlap // scale, run, context=upscaler.sees)
    image = PIL.Image.fromarray((enlarged.clip(0, 1) * 255).round().astype(np.uint8), "RGB")
    return image if image.size == size else image.resize(size, PIL.Image.Resampling.LANCZOS)
