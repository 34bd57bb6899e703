"""/outpaint's canvas: the picture on a larger canvas, the new border pre-filled from the picture's edges,
and the mask of what the model paints (white = the new border).

The job service lays the canvas out and stores it with its mask as an inpaint job's inputs; the worker
runs the inpaint pipeline on it and puts the result back over the canvas through `feathered_mask`, so
the old picture is kept pixel for pixel and the new border fades in from its edges.

Example:
    >>> layout = outpaint_layout(64, 64, OutpaintMargins(zoom=2), LimitsConfig())
    >>> layout.canvas, layout.picture, layout.offset
    ((128, 128), (64, 64), (32, 32))
    >>> canvas, mask = outpaint_canvas(picture, layout)                    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from bot.config import LimitsConfig
from bot.domain import OutpaintMargins
from bot.errors import InvalidCommand
from bot.grammar import fit_size


@dataclass(frozen=True)
class OutpaintLayout:
    """Where the picture goes on the canvas, in pixels (width, height) and (x, y)."""

    canvas: tuple[int, int]  # the job's size: multiples of 8, within the limits
    picture: tuple[int, int]  # the size the picture is drawn at (smaller than given only to fit --zoom)
    offset: tuple[int, int]  # the picture's top-left corner on the canvas


def outpaint_layout(width: int, height: int, margins: OutpaintMargins, limits: LimitsConfig) -> OutpaintLayout:
    """Lay a `width` x `height` picture out on the canvas `margins` ask for.

    The picture is first brought to multiples of 8 within the limits, as /edit does. With --zoom a
    canvas over the limits is shrunk to fit, the picture with it (zooming out keeps its meaning: the
    picture is 1/zoom of each side); with --left/--right/--up/--down, pixels the user counted, a
    canvas over the limits is refused, naming how much fits.
    """
    picture_w, picture_h = fit_size(width, height, width * height, limits)
    if margins.zoom is not None:
        zoom = margins.zoom
        canvas_w, canvas_h = _round8(picture_w * zoom), _round8(picture_h * zoom)
        if not _fits(canvas_w, canvas_h, limits):
            canvas_w, canvas_h = fit_size(canvas_w, canvas_h, canvas_w * canvas_h, limits)
            scale = min(canvas_w / (picture_w * zoom), canvas_h / (picture_h * zoom))
            picture_w, picture_h = round(picture_w * scale), round(picture_h * scale)
        offset = ((canvas_w - picture_w) // 2, (canvas_h - picture_h) // 2)
        return OutpaintLayout((canvas_w, canvas_h), (picture_w, picture_h), offset)
    canvas_w = picture_w + margins.left + margins.right
    canvas_h = picture_h + margins.up + margins.down
    if not _fits(canvas_w, canvas_h, limits):
        raise InvalidCommand(
            f"/outpaint {margins.describe()} makes this {picture_w}x{picture_h} picture {canvas_w}x{canvas_h}; "
            f"the limit is {limits.max_side} pixels a side and {limits.max_pixels} in all; add less, or use "
            "--zoom, which shrinks the picture to fit")
    return OutpaintLayout((canvas_w, canvas_h), (picture_w, picture_h), (margins.left, margins.up))


def outpaint_canvas(picture: Image.Image, layout: OutpaintLayout) -> tuple[Image.Image, Image.Image]:
    """The canvas (RGB) and its mask ("L": 255 = new border to paint, 0 = the picture, kept).

    The border starts as the picture's edge pixels carried outwards and blurred, not grey or noise: at
    a --strength below 1 the model continues what is there, and a flat sky or wall stays one colour.
    """
    picture = picture.convert("RGB").resize(layout.picture, Image.Resampling.LANCZOS)
    (canvas_w, canvas_h), (picture_w, picture_h), (x, y) = layout.canvas, layout.picture, layout.offset
    pixels = np.asarray(picture)
    padding = ((y, canvas_h - picture_h - y), (x, canvas_w - picture_w - x), (0, 0))
    stretched = Image.fromarray(np.pad(pixels, padding, mode="edge"))
    # Blurring smooths the streaks edge-stretching draws; the wider the border, the softer.
    radius = max(2.0, max(x, y, canvas_w - picture_w - x, canvas_h - picture_h - y) / 8)
    canvas = stretched.filter(ImageFilter.GaussianBlur(radius))
    canvas.paste(picture, (x, y))
    mask = Image.new("L", layout.canvas, 255)
    mask.paste(0, (x, y, x + picture_w, y + picture_h))
    return canvas, mask


def feather_px(width: int, height: int) -> int:
    """How wide the seam between the picture and its new border fades: 1/16 of the shorter side."""
    return max(4, min(width, height) // 16)


def feathered_mask(mask: Image.Image) -> Image.Image:
    """How much of the painted canvas to show over the pre-filled one: 0 on the picture (kept exactly),
    rising to 255 over `feather_px` pixels into the new border, so the seam fades instead of cutting."""
    width = feather_px(*mask.size)
    blurred = np.asarray(mask.convert("L").filter(ImageFilter.GaussianBlur(width / 2)), dtype=np.float32) / 255
    ramp = np.clip(2 * blurred - 1, 0, 1)  # the blur is 1/2 at the seam: start the ramp there
    ramp[np.asarray(mask.convert("L")) < 128] = 0
    return Image.fromarray(np.round(ramp * 255).astype(np.uint8))


def _fits(width: int, height: int, limits: LimitsConfig) -> bool:
    return max(width, height) <= limits.max_side and width * height <= limits.max_pixels


def _round8(value: float) -> int:
    return max(8, round(value / 8) * 8)
