"""Attachment validation and preparation, as a user sending pictures would notice it."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from bot.config import LimitsConfig
from bot.errors import InvalidImage
from bot.images import load_upload, prepare_inputs, to_png_bytes

LIMITS = LimitsConfig()


def encode(image: Image.Image, format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height RGB pixels, followed by a bogus IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", b"not really compressed pixels") + png_chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded, but the header alone should have refused the file")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# load_upload: what is refused, and how it is said


def test_a_text_file_is_not_an_image() -> None:
    with pytest.raises(InvalidImage) as caught:
        load_upload(b"these are my holiday notes, not a picture\n", LIMITS)
    assert str(caught.value) == ("the image is not a PNG, JPEG, WebP, GIF or BMP file; "
                                 "use a picture in one of those formats")


def test_the_message_names_the_mask() -> None:
    with pytest.raises(InvalidImage, match=r"^the mask is not a PNG"):
        load_upload(b"plain text", LIMITS, what="mask")


def test_an_unsupported_format_is_refused() -> None:
    tiff = encode(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(InvalidImage, match="not a PNG, JPEG, WebP, GIF or BMP file"):
        load_upload(tiff, LIMITS)


def test_too_many_bytes_is_refused_with_both_sizes() -> None:
    limits = LimitsConfig(max_upload_bytes=20 * 1024 * 1024)
    data = b"\0" * int(25.3 * 1024 * 1024)
    with pytest.raises(InvalidImage) as caught:
        load_upload(data, limits)
    assert str(caught.value).startswith("the image is 25.3 MB; the limit is 20 MB;")


def test_a_huge_header_is_refused_fast_without_decoding(no_decoding: None) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=r"^the image has far too many pixels; the limit is 16\.8 megapix"):
        load_upload(png_header_only(30000, 30000), LIMITS)
    assert time.perf_counter() - started < 0.5


def test_over_the_pixel_limit_is_refused_from_the_header(no_decoding: None) -> None:
    with pytest.raises(InvalidImage) as caught:
        load_upload(png_header_only(5000, 5000), LIMITS)
    assert str(caught.value) == ("the image is 5000×5000 (25.0 megapixels); the limit is 16.8 megapixels "
                                 "(for example 4096×4096); scale it down and send it again")


def test_a_truncated_png_is_damaged() -> None:
    noise = Image.effect_noise((256, 256), 64).convert("RGB")
    whole = encode(noise)
    with pytest.raises(InvalidImage, match=r"^the image file is damaged or incomplete \(.+\); send the"):
        load_upload(whole[: len(whole) // 2], LIMITS)


def test_a_truncated_jpeg_is_damaged() -> None:
    whole = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage, match="damaged or incomplete"):
        load_upload(whole[: len(whole) // 2], LIMITS)


# load_upload: what comes out


def test_exif_orientation_is_applied() -> None:
    # A phone held upright stores a landscape sensor image plus "rotate 90° clockwise" (orientation 6).
    sensor = Image.new("RGB", (40, 20), "white")
    sensor.paste((255, 0, 0), (0, 0, 20, 20))  # the left half is red
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_upload(encode(sensor, "JPEG", exif=exif, quality=95), LIMITS)
    assert image.size == (20, 40)
    red, green, _ = image.getpixel((10, 5))  # after turning clockwise, red is on top
    assert red > 200 and green < 60
    assert image.getpixel((10, 35))[1] > 200


def test_opaque_images_come_out_rgb_and_transparent_ones_rgba() -> None:
    assert load_upload(encode(Image.new("L", (8, 8), 128)), LIMITS).mode == "RGB"
    assert load_upload(encode(Image.new("RGBA", (8, 8), (1, 2, 3, 0))), LIMITS).mode == "RGBA"
    palette_with_transparency = encode(Image.new("P", (8, 8)), transparency=0)
    assert load_upload(palette_with_transparency, LIMITS).mode == "RGBA"


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_every_allowed_format_loads(format: str) -> None:
    image = load_upload(encode(Image.new("RGB", (24, 16), (0, 128, 255)), format), LIMITS)
    assert image.size == (24, 16) and image.mode == "RGB"


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    image = load_upload(data, LIMITS)
    assert image.getpixel((4, 4)) == (255, 0, 0)
    assert getattr(image, "n_frames", 1) == 1


def test_16_bit_greyscale_keeps_its_tones() -> None:
    image = load_upload(encode(Image.new("I;16", (4, 4), 32768)), LIMITS)
    assert image.getpixel((0, 0)) == (128, 128, 128)


# prepare_inputs


def test_inputs_are_resized_and_the_mask_binarised() -> None:
    mask = Image.new("L", (100, 100), 0)
    mask.paste(200, (0, 0, 50, 100))  # light grey on the left: repaint
    mask.paste(100, (50, 0, 100, 100))  # dark grey on the right: keep
    image, prepared = prepare_inputs(Image.new("RGB", (100, 100), "blue"), mask, 64, 64)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert prepared is not None and prepared.mode == "L" and prepared.size == (64, 64)
    assert set(np.unique(np.asarray(prepared))) == {0, 255}
    assert prepared.getpixel((5, 32)) == 255 and prepared.getpixel((60, 32)) == 0


def test_no_mask_stays_no_mask() -> None:
    image, mask = prepare_inputs(Image.new("RGB", (30, 20)), None, 48, 32)
    assert image.size == (48, 32) and mask is None


def test_a_mask_of_another_aspect_ratio_is_refused() -> None:
    with pytest.raises(InvalidImage) as caught:
        prepare_inputs(Image.new("RGB", (512, 512)), Image.new("L", (300, 100)), 512, 512)
    assert str(caught.value).startswith(
        "the mask is 300×100 but the image is 512×512; they must have the same aspect ratio")


def test_a_mask_at_another_scale_or_slightly_off_is_fine() -> None:
    _, mask = prepare_inputs(Image.new("RGB", (512, 512)), Image.new("L", (1010, 1000)), 64, 64)
    assert mask is not None and mask.size == (64, 64)


def test_transparent_pixels_of_an_alpha_mask_are_repainted() -> None:
    # An "erased" copy of a photo: the hole is transparent, the rest opaque and of any colour.
    mask = Image.new("RGBA", (10, 10), (255, 255, 255, 255))  # opaque white: would be "repaint" by luminance
    mask.paste((0, 0, 0, 0), (0, 0, 5, 10))  # transparent (black underneath) on the left
    _, prepared = prepare_inputs(Image.new("RGB", (10, 10)), mask, 10, 10)
    assert prepared is not None
    assert prepared.getpixel((2, 5)) == 255  # transparent: repaint
    assert prepared.getpixel((8, 5)) == 0  # opaque: keep


def test_an_opaque_rgba_mask_is_read_by_luminance() -> None:
    mask = Image.new("RGBA", (10, 10), (0, 0, 0, 255))
    mask.paste((255, 255, 255, 255), (0, 0, 5, 10))
    _, prepared = prepare_inputs(Image.new("RGB", (10, 10)), mask, 10, 10)
    assert prepared is not None
    assert prepared.getpixel((2, 5)) == 255 and prepared.getpixel((8, 5)) == 0


def test_a_transparent_image_is_flattened_on_white() -> None:
    image, _ = prepare_inputs(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), None, 8, 8)
    assert image.mode == "RGB" and image.getpixel((4, 4)) == (255, 255, 255)


# to_png_bytes


def test_png_encoding_is_deterministic_and_drops_metadata() -> None:
    image = Image.effect_noise((32, 32), 50).convert("RGB")
    image.info["icc_profile"] = b"not a real profile"
    first, second = to_png_bytes(image), to_png_bytes(image.copy())
    assert first == second
    assert b"iCCP" not in first and b"tIME" not in first
    assert Image.open(io.BytesIO(first)).tobytes() == image.tobytes()


def test_upload_round_trip_through_png() -> None:
    original = Image.effect_noise((16, 16), 40).convert("RGB")
    loaded = load_upload(to_png_bytes(original), LIMITS)
    assert loaded.tobytes() == original.tobytes()
