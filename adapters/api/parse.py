"""Translating in: a JSON or multipart job request becomes chat-grammar text and input images, with every
size limit checked before the body is read or decoded."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from adapters.api.errors import HttpError, describe_errors
from adapters.api.schemas import JobRequest
from bot.domain import InputImages, JobKind
from bot.errors import InvalidCommand, InvalidImage


def generation_text(body: JobRequest) -> str:
    """The JSON fields as a chat command, so the one grammar checks every value and names every limit."""
    fields = body.model_fields_set - {"image", "mask", "webhook"}
    if body.command is not None:
        if fields - {"command"}:
            raise InvalidCommand("give either `command` or `kind` and `prompt` with their fields, not both "
                                 f"(also got: {', '.join(sorted(fields - {'command'}))})")
        return body.command
    if body.kind is None or body.prompt is None:
        kinds = ", ".join(kind.value for kind in JobKind if kind is not JobKind.TEACH)  # teaching is POST /v1/trainings
        raise InvalidCommand(f"a job needs `command` (e.g. \"/imagine a red fox --seed 4\"), or `kind` ({kinds}) "
                             "and `prompt`")
    words = [f"/{body.kind.value}", body.prompt]
    for flag in ("seed", "steps", "cfg", "size", "ar", "n", "sampler", "model", "strength", "zoom", "left", "right",
                 "up", "down"):
        value = getattr(body, flag)
        if value is not None:
            words.append(f"--{flag}={value}")
    if body.negative:
        words += ["--no", body.negative]  # last: --no takes the words up to the next flag
    return " ".join(words)


def decode_image(value: str | None, what: str, max_bytes: int) -> bytes | None:
    if value is None:
        return None
    if value.startswith("data:"):
        value = value.partition(",")[2]
    # Measured before decoding: 4 base64 characters carry 3 bytes.
    if len(value) > (max_bytes + 2) // 3 * 4 + 4:
        raise HttpError(413, InvalidImage.code, f"`{what}` is over {max_bytes // (1024 * 1024)} MiB "
                        f"(limits.max_upload_bytes); send a smaller file")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"`{what}` is not valid base64; encode the file's bytes (or send it as a "
                           "multipart upload)") from None


def fingerprint(body: BaseModel, inputs: InputImages) -> str:
    """A hash of what was asked, the same for a JSON or multipart retry of one request."""
    asked = body.model_dump(mode="json", exclude={"image", "mask"}, exclude_none=True)
    for name, data in (("image", inputs.image), ("mask", inputs.mask)):
        if data is not None:
            asked[name] = hashlib.sha256(data).hexdigest()
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


def check_body_length(request: Request, max_upload: int) -> None:
    """Refuse a body over the cap before reading it: two images, base64's overhead, and the fields."""
    cap = 2 * ((max_upload + 2) // 3 * 4) + 256 * 1024
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise HttpError(411, InvalidCommand.code, "send a Content-Length header with the request body")
    if int(length) > cap:
        raise HttpError(413, InvalidImage.code, f"the request is {int(length)} bytes; the limit is {cap} "
                        "(two images of limits.max_upload_bytes)")


async def read_upload(upload: UploadFile, name: str, max_upload: int) -> bytes:
    """An uploaded file's bytes, reading no more than one byte past the limit."""
    data = await upload.read(max_upload + 1)
    if len(data) > max_upload:
        raise HttpError(413, InvalidImage.code, f"`{name}` is over {max_upload // (1024 * 1024)} MiB "
                        "(limits.max_upload_bytes); send a smaller file")
    return data


async def read_job_request(request: Request, max_upload: int) -> tuple[JobRequest, InputImages]:
    check_body_length(request, max_upload)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _read_multipart(request, max_upload)
    if not content_type.startswith("application/json"):
        raise HttpError(415, InvalidCommand.code, "send the job as application/json or multipart/form-data")
    try:
        body = JobRequest.model_validate_json(await request.body(), strict=True)
    except ValidationError as error:
        raise HttpError(422, InvalidCommand.code, describe_errors(error.errors())) from None
    inputs = InputImages(image=decode_image(body.image, "image", max_upload),
                         mask=decode_image(body.mask, "mask", max_upload))
    return body, inputs


async def _read_multipart(request: Request, max_upload: int) -> tuple[JobRequest, InputImages]:
    form = await request.form(max_files=2, max_fields=40)
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in ("image", "mask"):
                raise InvalidCommand(f"unexpected file field `{name}`; the files are `image` and `mask`")
            files[name] = await read_upload(value, name, max_upload)
        elif name in ("webhook_url", "webhook_secret"):
            fields.setdefault("webhook", {})[name.removeprefix("webhook_")] = value
        else:
            fields[name] = value
    try:
        body = JobRequest.model_validate(fields)  # lax: form values are text, "20" is a fine 20
    except ValidationError as error:
        raise HttpError(422, InvalidCommand.code, describe_errors(error.errors())) from None
    image = files.get("image") or decode_image(body.image, "image", max_upload)
    mask = files.get("mask") or decode_image(body.mask, "mask", max_upload)
    return body, InputImages(image=image, mask=mask)
