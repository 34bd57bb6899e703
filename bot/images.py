"""Attached pictures: the one place that decides whether an upload can be used, and how it is prepared.

Every adapter and the job service call `load_upload` on the raw bytes of an attachment, so a user gets
the same message for the same bad file on every platform. The checks run cheapest first: the byte
count, then the file header (format and dimensions, without decoding a pixel), then the full decode.

Example:
    >>> picture = load_upload(attachment_bytes, settings.limits)            # doctest: +SKIP
    >>> mask = load_upload(mask_bytes, settings.limits, what="mask")        # doctest: +SKIP
    >>> picture, mask = prepare_inputs(picture, mask, 512, 512)             # doctest: +SKIP
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from bot.config import LimitsConfig
from bot.errors import InvalidImage

# Pillow format names we accept. Anything else (TIFF, PSD, EPS, ICO...) is refused at the header.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_FORMATS_IN_WORDS = "PNG, JPEG, WebP, GIF or BMP"

# The mask and the image may differ this much in aspect ratio (rounding in editors, odd crops).
MAX_MASK_ASPECT_DIFFERENCE = 0.02

# zlib level for every PNG Easel writes: fixed, so the same pixels always give the same bytes. Level 1,
# not PIL's default 6: a 512x512 photo-like picture encodes in a third of the time (about 21 against 61 ms
# on a 2-core CPU, `python -m bench.png`) for a file about a tenth larger, and a job waits for its encode.
PNG_COMPRESS_LEVEL = 1

# What a failed decode can raise, depending on the format plugin and where the file was cut.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

_TRANSPARENT_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def load_upload(data: bytes, limits: LimitsConfig, what: str = "image") -> Image.Image:
    """Check an attachment and decode it into an RGB (or RGBA, when it has transparency) image.

    `what` names the attachment in messages ("image" or "mask"). Raises `InvalidImage` with a
    one-line message saying what is wrong and what to send instead. Animated files give their
    first frame; the EXIF orientation a phone camera records is applied.
    """
    # 1. Byte count: nothing is parsed before this.
    if len(data) > limits.max_upload_bytes:
        raise InvalidImage(f"the {what} is {_megabytes(len(data))}; the limit is "
                           f"{_megabytes(limits.max_upload_bytes)}; send a smaller or more compressed file")

    # 2. Header: format and dimensions only, no pixels decoded yet.
    with _open_header(data, limits, what) as image:
        # 3. Dimensions, before a single pixel is allocated.
        width, height = image.size
        if width * height > limits.max_upload_pixels:
            raise InvalidImage(f"the {what} is {width}×{height} ({_megapixels(width * height)}); the limit "
                               f"is {_pixel_limit(limits)}; scale it down and send it again")

        # 4. Full decode of the first frame, then orientation and colour mode.
        try:
            image.seek(0)
            image.load()
            upright = _to_8_bit(ImageOps.exif_transpose(image))  # a new, single-frame image
            return upright.convert("RGBA" if _has_transparency(upright) else "RGB")
        except _DECODE_ERRORS as e:
            raise InvalidImage(f"the {what} file is damaged or incomplete ({e}); "
                               f"send the original file again") from None


def prepare_inputs(
    image: Image.Image, mask: Image.Image | None, width: int, height: int
) -> tuple[Image.Image, Image.Image | None]:
    """Resize the image (RGB) and the mask ("L", 0 or 255, white = repaint) to width×height.

    A transparent image is flattened onto white, as AUTOMATIC1111 does. A mask whose alpha channel
    is used (some pixel not fully opaque) is read from that channel: transparent pixels are
    repainted, opaque ones kept, whatever their colour; ComfyUI users erase the area to repaint in
    the same way. Any other mask is read by its luminance. Raises `InvalidImage` when the mask's
    aspect ratio differs from the image's by more than 2%.
    """
    if mask is not None:
        _check_same_aspect(image, mask)

    resized_image = _flatten(image).resize((width, height), Image.Resampling.LANCZOS)
    if mask is None:
        return resized_image, None
    resized_mask = _mask_luminance(mask).resize((width, height), Image.Resampling.LANCZOS)
    return resized_image, resized_mask.point(lambda value: 255 if value >= 128 else 0)


def to_png_bytes(image: Image.Image, text: Mapping[str, str] | None = None, *,
                 compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Encode as PNG, deterministically: the same pixels (and text) always give the same bytes.

    Nothing from `image.info` is carried over (no ICC profile, EXIF or time chunk); `text` becomes
    tEXt chunks, in the given order. `compress_level` is there for bench/png.py, which times other
    levels against Easel's; everything Easel stores is written at PNG_COMPRESS_LEVEL.
    """
    clean = image.copy()
    clean.info = {}
    png_info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        png_info.add_text(key, value)
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", compress_level=compress_level, optimize=False, pnginfo=png_info)
    return buffer.getvalue()


def _open_header(data: bytes, limits: LimitsConfig, what: str) -> Image.Image:
    """Image.open reads only the header; map each way it can fail to a message."""
    try:
        # Easel's own pixel limit (checked by the caller) is the one that counts, so Pillow's bomb
        # *warning* is noise here. Its bomb *error* (over twice Pillow's limit) still stops the file.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidImage(f"the {what} has far too many pixels; the limit is {_pixel_limit(limits)}; "
                           f"scale it down and send it again") from None
    except UnidentifiedImageError:
        raise InvalidImage(f"the {what} is not a {_FORMATS_IN_WORDS} file; "
                           f"use a picture in one of those formats") from None
    except _DECODE_ERRORS as e:
        raise InvalidImage(f"the {what} file is damaged or incomplete ({e}); "
                           f"send the original file again") from None


def _check_same_aspect(image: Image.Image, mask: Image.Image) -> None:
    image_ratio = image.width / image.height
    mask_ratio = mask.width / mask.height
    if abs(mask_ratio / image_ratio - 1) > MAX_MASK_ASPECT_DIFFERENCE:
        raise InvalidImage(f"the mask is {mask.width}×{mask.height} but the image is "
                           f"{image.width}×{image.height}; they must have the same aspect ratio "
                           f"(draw the mask over a copy of the image)")


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in _TRANSPARENT_MODES or "transparency" in image.info


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale PNGs open as "I;16"/"I"; Pillow's convert would clip them to white."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L"):
        return image
    levels = np.asarray(image, dtype=np.float64)
    peak = 65535 if image.mode.startswith("I;16") or levels.max() > 255 else 255
    return Image.fromarray(np.clip(levels * (255 / peak), 0, 255).round().astype(np.uint8))


def _flatten(image: Image.Image) -> Image.Image:
    """RGB, with transparent areas on white."""
    if not _has_transparency(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _mask_luminance(mask: Image.Image) -> Image.Image:
    """The mask as "L" before binarising: inverted alpha when alpha is used, luminance otherwise."""
    if _has_transparency(mask):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.point(lambda value: 255 - value)
    return mask.convert("L")


def _megabytes(size: int) -> str:
    megabytes = size / (1024 * 1024)
    return f"{megabytes:.0f} MB" if megabytes == int(megabytes) else f"{megabytes:.1f} MB"


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1_000_000:.1f} megapixels"


def _pixel_limit(limits: LimitsConfig) -> str:
    side = int(limits.max_upload_pixels ** 0.5)
    return f"{_megapixels(limits.max_upload_pixels)} (for example {side}×{side})"
