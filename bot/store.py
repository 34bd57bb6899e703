"""The image store: PNG files on disk, named by the sha256 of their bytes.

Layout: `<root>/<sha[:2]>/<sha>.png`. Content addressing makes saving idempotent (the same bytes land
on the same path) and lets the database refer to an image by its hash alone. Every generated image
carries its generation parameters in a PNG `parameters` text chunk, in the format AUTOMATIC1111 and
ComfyUI users paste back into their tools.

Example:
    >>> store = ImageStore(settings.storage.data_dir / "images")      # doctest: +SKIP
    >>> stored = store.save_generated(image, params, seed=42)        # doctest: +SKIP
    >>> read_parameters(stored.path).splitlines()[-1]                # doctest: +SKIP
    'Steps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 42, Size: 512x512, Model: tiny'
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bot.domain import GenerationParams, JobKind, lora_tags
from bot.errors import NotFound
from bot.images import to_png_bytes

PARAMETERS_KEY = "parameters"  # the tEXt keyword AUTOMATIC1111 writes and reads

# Our sampler names (bot.domain.SAMPLERS) as AUTOMATIC1111 displays them.
A1111_SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "heun": "Heun",
    "lms": "LMS",
    "pndm": "PLMS",
    "unipc": "UniPC",
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredImage:
    """One PNG in the store."""

    sha256: str
    path: Path
    size_bytes: int
    width: int
    height: int


def a1111_parameters(params: GenerationParams, seed: int, hashes: Sequence[tuple[str, str]] = ()) -> str:
    """The generation parameters as AUTOMATIC1111 writes them, for the image made with `seed`.

    LoRAs go back into the prompt as `<lora:NAME:WEIGHT>` tags, as AUTOMATIC1111 keeps them there;
    `hashes` are its `Lora hashes` and `TI hashes` fields (bot.extra_networks.ExtraNetworks.a1111_hashes).

    >>> a1111_parameters(GenerationParams(JobKind.IMAGINE, "a cat", seed=42), seed=42)
    'a cat\\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 42, Size: 512x512, Model: tiny'
    """
    fields = [
        ("Steps", str(params.steps)),
        ("Sampler", A1111_SAMPLER_NAMES.get(params.sampler, params.sampler)),
        ("CFG scale", str(float(params.cfg))),
        ("Seed", str(seed)),
        ("Size", f"{params.width}x{params.height}"),
        ("Model", params.model),
    ]
    if params.kind is not JobKind.IMAGINE and params.strength is not None:
        fields.append(("Denoising strength", str(float(params.strength))))
    fields += hashes

    lines = [f"{params.prompt} {lora_tags(params.loras)}" if params.loras else params.prompt]
    if params.negative:
        lines.append(f"Negative prompt: {params.negative}")
    lines.append(", ".join(f"{name}: {_a1111_quote(value)}" for name, value in fields))
    return "\n".join(lines)


# One `Name: value` pair of the last line, as AUTOMATIC1111 reads it: a value is plain up to the next
# comma, or a JSON string when it holds a comma, colon or newline (see _a1111_quote).
_A1111_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """A `parameters` text taken apart as AUTOMATIC1111's png-info does: `Prompt`, `Negative prompt`,
    then each field of the last line, `Size` as `Size-1` (width) and `Size-2` (height). Values are text.

    >>> fields = parse_a1111_parameters(a1111_parameters(
    ...     GenerationParams(JobKind.IMAGINE, "a cat, 4k", negative="dogs", seed=42), seed=42))
    >>> fields["Prompt"], fields["Negative prompt"], fields["Seed"], fields["Size-1"], fields["Sampler"]
    ('a cat, 4k', 'dogs', '42', '512', 'Euler')
    """
    *lines, last = text.strip().split("\n")
    if len(_A1111_FIELD.findall(last)) < 3:  # no settings line: it is all prompt
        lines, last = [*lines, last], ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            (negative if negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for name, raw in _A1111_FIELD.findall(last):
        value = raw.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        size = _A1111_SIZE.match(value)
        if size is not None:
            fields[f"{name}-1"], fields[f"{name}-2"] = size[1], size[2]
        else:
            fields[name] = value
    return fields


def read_parameters(source: Path | str | bytes) -> str | None:
    """The `parameters` text of a PNG file (a path) or PNG bytes; None when it has none."""
    opened = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    with Image.open(opened) as image:
        text = getattr(image, "text", {})  # only PNG images have text chunks
        return text.get(PARAMETERS_KEY)


class ImageStore:
    """Content-addressed PNG files under `root`; safe to share between processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def save_generated(self, image: Image.Image, params: GenerationParams, seed: int,
                       hashes: Sequence[tuple[str, str]] = ()) -> StoredImage:
        """Store a generated image with its parameters chunk (`hashes`: see a1111_parameters). Same pixels
        and parameters, same file."""
        png = to_png_bytes(image, text={PARAMETERS_KEY: a1111_parameters(params, seed, hashes)})
        return self._save(png, image.size)

    def save_input(self, png_bytes: bytes) -> StoredImage:
        """Store an uploaded image or mask that `bot.images` has already validated and re-encoded."""
        if not png_bytes.startswith(_PNG_SIGNATURE):
            raise ValueError("save_input() takes PNG bytes; encode the upload with bot.images.to_png_bytes")
        with Image.open(io.BytesIO(png_bytes)) as image:
            size = image.size
        return self._save(png_bytes, size)

    def path_of(self, sha256: str) -> Path:
        """Where the image with this hash lives (whether or not it exists)."""
        if not _SHA256_HEX.fullmatch(sha256):
            raise NotFound(f"{sha256!r} is not an image id; "
                           f"image ids are 64 lower-case hexadecimal characters")
        return self.root / sha256[:2] / f"{sha256}.png"

    def read_bytes(self, sha256: str) -> bytes:
        """The PNG bytes of a stored image; NotFound when it is not in the store."""
        path = self.path_of(sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"image {sha256} is not in the store (looked for {path}); "
                           f"it may have been deleted") from None

    def _save(self, png: bytes, size: tuple[int, int]) -> StoredImage:
        sha256 = hashlib.sha256(png).hexdigest()
        path = self.path_of(sha256)
        if not path.exists():  # same bytes, same name: a second save has nothing to do
            _write_atomically(path, png)
        width, height = size
        return StoredImage(sha256=sha256, path=path, size_bytes=len(png), width=width, height=height)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); Windows cannot open a directory, and needs no such step."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _a1111_quote(value: str) -> str:
    """AUTOMATIC1111's quoting: a value holding a comma, colon or newline is written as a JSON string."""
    if "," not in value and ":" not in value and "\n" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)
