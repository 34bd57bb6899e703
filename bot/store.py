"""The image store: PNGs named by the sha256 of their bytes, a job's named files (an /animate clip's
frames and MP4, a /teach training's checkpoint) and trained LoRAs, in a folder or an S3-compatible bucket.

Layout: `<root>/<sha[:2]>/<sha>.png` in a folder, `<prefix>/<sha[:2]>/<sha>.png` in a bucket; a job's
files under `jobs/<job id>/` and trained LoRAs under `loras/<name>.safetensors` beside them. Content
addressing makes saving idempotent (the same bytes land on the same name) and lets the database refer
to an image by its hash alone. Every generated image carries its generation parameters in a PNG
`parameters` text chunk, in the format AUTOMATIC1111 and ComfyUI users paste back into their tools.

Example:
    >>> store = open_image_store(settings.storage)                    # doctest: +SKIP
    >>> stored = store.save_generated(image, params, seed=42)        # doctest: +SKIP
    >>> read_parameters(stored.path).splitlines()[-1]                # doctest: +SKIP
    'Steps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 42, Size: 512x512, Model: tiny'
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import mimetypes
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from bot.config import StorageConfig
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
    path: Path | str  # a FolderImageStore's file, an S3ImageStore's s3:// URL
    size_bytes: int
    width: int
    height: int


def a1111_parameters(params: GenerationParams, seed: int, hashes: Sequence[tuple[str, str]] = ()) -> str:
    """The generation parameters as AUTOMATIC1111 writes them, for the image made with `seed`.

    LoRAs go back into the prompt as `<lora:NAME:WEIGHT>` tags, as AUTOMATIC1111 keeps them there;
    `hashes` are further fields: its `Lora hashes` and `TI hashes` (bot.extra_networks.ExtraNetworks.a1111_hashes),
    and an upscale's `Hires upscale` and `Hires upscaler` (generation/worker.py).

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


class ImageStore(ABC):
    """Content-addressed PNGs, and the named files of a job (an animation's frames and clip): a folder on
    this host (FolderImageStore) or an S3-compatible bucket every host shares (S3ImageStore). The
    adapters' image and video routes, the service and the worker read and write images and a job's files
    only through this interface; `open_image_store` picks the one the settings name.

    Both keep the same keys below their root: `<sha[:2]>/<sha>.png` for an image, `jobs/<job id>/
    <name>` for a job's file. A job's files are named, not content-addressed, so a worker on any host
    finds the frames a killed one left and resumes after them."""

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

    def open_image(self, sha256: str) -> Image.Image:
        """A stored image, decoded (the worker's init images and masks)."""
        return Image.open(io.BytesIO(self.read_bytes(sha256)))

    def location_of(self, sha256: str) -> str:
        """Where the image with this hash lives (whether or not it exists): a file path or an s3:// URL."""
        return self._location(_image_key(sha256))

    def read_bytes(self, sha256: str) -> bytes:
        """The PNG bytes of a stored image; NotFound when it is not in the store."""
        return self._read(_image_key(sha256), f"image {sha256}")

    async def exists(self, sha256: str) -> bool:
        """Whether the image with this hash is in the store."""
        return await self._exists(_image_key(sha256))

    def stream(self, sha256: str) -> AsyncIterator[bytes]:
        """The PNG bytes in chunks, for an HTTP response that never holds a whole image in memory."""
        return self._stream(_image_key(sha256))

    def local_path(self, sha256: str) -> Path | None:
        """The image's file on this host, for a store that has one (an HTTP server sends it as is)."""
        return self._local_path(_image_key(sha256))

    def presigned_url(self, sha256: str, expires_s: int) -> str | None:
        """A URL anyone may GET the image from for `expires_s`, for a store that can sign one."""
        return self._presigned_url(_image_key(sha256), expires_s)

    # A job's named files: written as they are made (a later write of the same name replaces the file
    # whole), listed by a successor, read back by whoever delivers them.

    def put_job_file(self, job_id: str, name: str, data: bytes) -> str:
        """Write one of a job's files whole (readers never see half of it); return its location."""
        key = _job_file_key(job_id, name)
        self._write(key, data, replace=True)
        return self._location(key)

    def read_job_file(self, job_id: str, name: str) -> bytes:
        """One of a job's files; NotFound when it is not in the store."""
        return self._read(_job_file_key(job_id, name), f"file {name} of job {job_id}")

    async def job_file_exists(self, job_id: str, name: str) -> bool:
        return await self._exists(_job_file_key(job_id, name))

    def job_file_names(self, job_id: str) -> list[str]:
        """The names of a job's files, sorted; none when it has none."""
        return sorted(self._names(_job_file_key(job_id, "")))

    def job_file_location(self, job_id: str, name: str = "") -> str:
        """Where one of a job's files lives (a file path or an s3:// URL); with no name, where all do."""
        return self._location(_job_file_key(job_id, name))

    def job_file_local_path(self, job_id: str, name: str) -> Path | None:
        """The job's file on this host, for a store that has one (an HTTP server sends it as is)."""
        return self._local_path(_job_file_key(job_id, name))

    def stream_job_file(self, job_id: str, name: str) -> AsyncIterator[bytes]:
        """One of a job's files in chunks, for an HTTP response."""
        return self._stream(_job_file_key(job_id, name))

    def job_file_presigned_url(self, job_id: str, name: str, expires_s: int) -> str | None:
        """A URL anyone may GET the job's file from for `expires_s`, for a store that can sign one."""
        return self._presigned_url(_job_file_key(job_id, name), expires_s)

    def delete_job_file(self, job_id: str, name: str) -> None:
        """Delete one of a job's files; nothing happens when it is not there."""
        self._delete(_job_file_key(job_id, name))

    # Trained LoRAs (/teach, and the copies /mod share makes), whichever host trained them: the store
    # holds the original, each worker copies one into its lora_dir the first time a job needs it.

    def put_lora(self, name: str, data: bytes) -> None:
        self._write(_lora_key(name), data, replace=True)

    def read_lora(self, name: str) -> bytes:
        """A trained LoRA's file; NotFound when the store has none of that name."""
        return self._read(_lora_key(name), f"the LoRA {name!r}")

    def delete_lora(self, name: str) -> None:
        self._delete(_lora_key(name))

    def _save(self, png: bytes, size: tuple[int, int]) -> StoredImage:
        sha256 = hashlib.sha256(png).hexdigest()
        key = _image_key(sha256)
        # Same bytes, same name: a second save of an image has nothing to do.
        self._write(key, png, replace=False)
        width, height = size
        return StoredImage(sha256=sha256, path=self._local_path(key) or self._location(key), size_bytes=len(png),
                           width=width, height=height)

    def _local_path(self, key: str) -> Path | None:
        return None

    def _presigned_url(self, key: str, expires_s: int) -> str | None:
        return None

    # What each store implements, on keys below its root.

    @abstractmethod
    def _location(self, key: str) -> str: ...

    @abstractmethod
    def _read(self, key: str, what: str) -> bytes:
        """The object's bytes; NotFound naming `what` when there is none."""

    @abstractmethod
    async def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _stream(self, key: str) -> AsyncIterator[bytes]: ...

    @abstractmethod
    def _write(self, key: str, data: bytes, *, replace: bool) -> None:
        """Write `data` whole; unless `replace`, only if nothing is there yet."""

    @abstractmethod
    def _names(self, folder_key: str) -> list[str]:
        """The names of the objects in the folder `folder_key` (which ends in /), relative to it."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Delete the object; nothing happens when there is none."""


class FolderImageStore(ImageStore):
    """Images `<root>/<sha[:2]>/<sha>.png` and a job's files `<root>/jobs/<job id>/<name>`; safe
    to share between the processes of one host."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_of(self, sha256: str) -> Path:
        """Where the image with this hash lives (whether or not it exists)."""
        return self.root / _image_key(sha256)

    def _location(self, key: str) -> str:
        return str(self.root / key)

    def _local_path(self, key: str) -> Path:
        return self.root / key

    def _read(self, key: str, what: str) -> bytes:
        path = self.root / key
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{what} is not in the store (looked for {path}); it may have been deleted") from None

    async def _exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    async def _stream(self, key: str) -> AsyncIterator[bytes]:
        yield await asyncio.to_thread(self._read, key, key)

    def _write(self, key: str, data: bytes, *, replace: bool) -> None:
        path = self.root / key
        if replace or not path.exists():
            write_atomically(path, data)

    def _names(self, folder_key: str) -> list[str]:
        folder = self.root / folder_key
        # A write in progress is a hidden temporary file (see write_atomically): not one of the names.
        return [path.name for path in folder.iterdir() if not path.name.startswith(".")] if folder.is_dir() else []

    def _delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


class S3ImageStore(ImageStore):
    """Images `<prefix>/<sha[:2]>/<sha>.png` and a job's files `<prefix>/jobs/<job id>/<name>` in
    an S3-compatible bucket, shared by every host of a fleet. Image writes are conditional (If-None-Match),
    so two workers storing the same image write it once; a PUT is atomic, so a job's file is whole or absent.

    The client is obstore (Rust's object_store): one small wheel with no Python dependencies, sync and
    async calls, streaming reads, presigned URLs, the standard AWS variables and instance credentials."""

    def __init__(self, images_url: str, *, endpoint: str = "", region: str = "") -> None:
        # Imported here, not at the top: loading the client takes a tenth of a second that a single host,
        # storing images in a folder, never needs to spend.
        import obstore
        from obstore.exceptions import AlreadyExistsError
        from obstore.store import S3Store

        self._obstore, self._already_exists = obstore, AlreadyExistsError

        parts = urlsplit(images_url)
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        config: dict[str, str] = {}
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
        if endpoint:
            config["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                config["allow_http"] = "true"  # a store on the local network (MinIO, a test server)
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        config["region"] = region
        self._store = S3Store(self.bucket, prefix=self.prefix or None, config=config,
                              client_options={"allow_http": endpoint.startswith("http://")})

    @staticmethod
    def key_of(sha256: str) -> str:
        """The image's key below the prefix."""
        return _image_key(sha256)

    def _presigned_url(self, key: str, expires_s: int) -> str | None:
        return self._obstore.sign(self._store, "GET", key, timedelta(seconds=expires_s))

    def _location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}{key}"

    def _read(self, key: str, what: str) -> bytes:
        try:
            return bytes(self._obstore.get(self._store, key).bytes())
        except FileNotFoundError:
            raise NotFound(f"{what} is not in the store (looked for {self._location(key)}); "
                           f"it may have been deleted") from None

    async def _exists(self, key: str) -> bool:
        try:
            await self._obstore.head_async(self._store, key)
        except FileNotFoundError:
            return False
        return True

    async def _stream(self, key: str) -> AsyncIterator[bytes]:
        answer = await self._obstore.get_async(self._store, key)
        async for chunk in answer.stream():
            yield bytes(chunk)

    def _write(self, key: str, data: bytes, *, replace: bool) -> None:
        # The type travels with the object: a presigned link then serves a PNG or an MP4 a browser shows.
        attributes = {"Content-Type": mimetypes.guess_type(key)[0] or "application/octet-stream"}
        if replace:
            self._obstore.put(self._store, key, data, attributes=attributes)
            return
        with contextlib.suppress(self._already_exists):  # another worker stored these very bytes first
            self._obstore.put(self._store, key, data, attributes=attributes, mode="create")

    def _names(self, folder_key: str) -> list[str]:
        return [meta["path"].removeprefix(folder_key)
                for batch in self._obstore.list(self._store, folder_key) for meta in batch]

    def _delete(self, key: str) -> None:
        self._obstore.delete(self._store, key)  # S3 answers a DELETE of a missing key with success


def open_image_store(storage: StorageConfig) -> ImageStore:
    """The store `storage.images_url` names: an S3 bucket, or by default the folder <data_dir>/images."""
    if storage.images_url:
        return S3ImageStore(storage.images_url, endpoint=storage.s3_endpoint, region=storage.s3_region)
    return FolderImageStore(storage.data_dir / "images")


def _image_key(sha256: str) -> str:
    return f"{sha256[:2]}/{_checked_id(sha256)}.png"


_JOB_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _job_file_key(job_id: str, name: str) -> str:
    """`jobs/<job id>/<name>`; a job id or name that could climb out of the folder is refused."""
    if not _JOB_FILE_NAME.fullmatch(job_id) or (name and not _JOB_FILE_NAME.fullmatch(name)):
        raise NotFound(f"{job_id!r}/{name!r} is not a job's file; job ids and file names are letters, "
                       f"digits, '.', '_' and '-'")
    return f"jobs/{job_id}/{name}"


def _lora_key(name: str) -> str:
    """`loras/<name>.safetensors`; a name is folders and a stem as a LoRA's name is (`trained/u3/zorb`)."""
    if not all(_JOB_FILE_NAME.fullmatch(part) for part in name.split("/")):
        raise NotFound(f"{name!r} is not a LoRA's name; its parts are letters, digits, '.', '_' and '-'")
    return f"loras/{name}.safetensors"


def _checked_id(sha256: str) -> str:
    if not _SHA256_HEX.fullmatch(sha256):
        raise NotFound(f"{sha256!r} is not an image id; image ids are 64 lower-case hexadecimal characters")
    return sha256


def write_atomically(path: Path, data: bytes) -> None:
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
