"""The OpenAI Images API under Easel's /v1, for the openai SDKs, Open WebUI and LibreChat:

    POST /v1/images/generations   images.generate (JSON)
    POST /v1/images/edits         images.edit (multipart: `image` or `image[]`, optional `mask`)
    POST /v1/images/variations    images.create_variation (multipart: `image`)

(`models.list` and `models.retrieve` are GET /v1/models and /v1/models/{id}, in account.py.)

Each request becomes an Easel command (/imagine, /edit or /inpaint) for the same job service as every
surface, so quotas, the prompt check, the queue and the image check apply unchanged. The route then
waits for the job (`http.openai_wait_s`) and answers OpenAI's `{"created", "data": [...]}` with the
images its Delivery may show (bot/delivery.py). Errors come in OpenAI's `{"error": {...}}`.

How OpenAI's fields map:
- `prompt` goes through Easel's grammar, so Easel flags written in it work (`a fox --seed 4 --steps 30`,
  `(-blurry)`) and win over the request's own `n`, `size` and `model`.
- `size`: "WxH" within Easel's limits, or "auto" (the model's default; for edits and variations, the
  input's shape at the model's pixel count). `n` is Easel's --n (up to limits.max_n).
- `model`: an Easel model name selects it; OpenAI's names (gpt-image-1, dall-e-3, ...) mean the default.
- `response_format`: b64_json (default) or url (a link to GET /v1/images/{sha256}). Images are PNG.
- accepted and ignored: quality, style, background, output_format, output_compression, moderation
  (Easel's own checks always apply), user, safety_identifier, input_fidelity, partial_images.
- edits: the first image is used (`image[]` may hold more); the mask's TRANSPARENT pixels are repainted
  (OpenAI's convention; bot/images.py reads a mask's alpha that way). No mask: the whole picture is
  redrawn (img2img).
- variations: img2img of the picture at bot/followups.py's VARIATION_STRENGTH, with a neutral prompt
  (a `prompt` field, an Easel extension, replaces it).

A job still running when the wait ends answers 504 with `x-should-retry: false` and a message naming
its id: the openai SDK retries 5xx (and 408, 409, 429) by default, which would queue a second job.
An `Idempotency-Key` header makes a deliberate retry wait for the first job instead of queuing another.
"""

from __future__ import annotations

import asyncio
import base64
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, create_model
from starlette.datastructures import UploadFile

from adapters.api.deps import CoreDep, Key
from adapters.api.errors import HttpError, error_response, register_dialect
from adapters.api.parse import check_body_length, fingerprint, read_upload
from adapters.api.render import base_url, image_url
from adapters.api.schemas import LimitsOut, SizeLimits, errors, generation_fields, without_none
from bot.apikeys import ApiKeyView
from bot.bootstrap import Core
from bot.domain import GenerateCommand, InputImages, JobKind, JobStatus
from bot.errors import InvalidCommand, InvalidImage
from bot.followups import VARIATION_STRENGTH
from bot.grammar import flags_in
from bot.images import load_upload
from bot.views import JobView

router = APIRouter(tags=["OpenAI Images API"])

# OpenAI's own model names (and what clients send when none is chosen): the default model.
OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image", "chatgpt-image", "gpt-")
# What a variation asks for when the request has no `prompt`: nothing that pulls the picture elsewhere.
VARIATION_PROMPT = "a variation of this picture"
_SIZE = re.compile(r"[0-9]+x[0-9]+")
_Body = TypeVar("_Body", bound=BaseModel)


# -- requests -------------------------------------------------------------------------------------------


class _Options(BaseModel):
    """The fields every OpenAI image request may carry. Unknown fields are refused, naming them."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=128, description="an Easel model (GET /v1/models); OpenAI's "
                              "names (gpt-image-1, dall-e-3) mean the default model")
    n: int | None = Field(None, description="how many images, 1 to limits.max_n")
    size: str | None = Field(None, max_length=20, examples=["512x512", "auto"],
                             description="WIDTHxHEIGHT within Easel's limits, or auto (the model's default)")
    response_format: Literal["b64_json", "url"] | None = None
    user: str | None = Field(None, description="ignored: the API key is the user")
    # Accepted so that clients which always send them work; they change nothing here.
    quality: str | None = None
    background: str | None = None
    output_format: str | None = Field(None, description="ignored: images are PNG")
    output_compression: int | None = None
    moderation: str | None = Field(None, description="ignored: Easel's prompt and image checks always apply")
    safety_identifier: str | None = None
    partial_images: int | None = None
    stream: bool | None = Field(None, description="false or absent: the answer comes once the job is done")


class ImageGenerationRequest(_Options):
    prompt: str = Field(max_length=4000, description="Easel flags written in it (--seed 4, --steps 30) work")
    style: str | None = None


class ImageEditRequest(_Options):
    prompt: str = Field(max_length=4000)
    input_fidelity: str | None = None


class ImageVariationRequest(_Options):
    prompt: str = Field(VARIATION_PROMPT, max_length=4000, description="an Easel extension: what to steer "
                        "the variation towards")


# -- answers --------------------------------------------------------------------------------------------


class OpenAIImage(BaseModel):
    b64_json: str | None = Field(None, description="the PNG, base64 (response_format b64_json)")
    url: str | None = Field(None, description="a link to the PNG (response_format url)")
    revised_prompt: str = Field(description="the prompt the model was given (Easel flags taken out)")
    seed: int = Field(description="Easel: the seed that repeats this image")
    spoiler: bool = Field(False, description="Easel: flagged where NSFW is allowed; show it behind a spoiler")


class EaselJobInfo(BaseModel):
    job_id: str = Field(description="GET /v1/jobs/{job_id} shows the job")
    withheld: list[str] = Field(description="why images of the job are missing (the image check withheld "
                                            "them), and how to appeal")


class ImagesOut(BaseModel):
    created: int = Field(description="when the job finished, in Unix seconds")
    data: list[OpenAIImage]
    size: str
    background: Literal["opaque"] = "opaque"
    output_format: Literal["png"] = "png"
    easel: EaselJobInfo


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorOut(BaseModel):
    error: OpenAIErrorDetail


# What an image request may answer besides 200 (422: an Idempotency-Key over 255 characters).
OPENAI_ERRORS = errors(400, 401, 403, 409, 411, 413, 415, 422, 429, 500, 504, body=OpenAIErrorOut)


# -- the requests as /openapi.json shows them -------------------------------------------------------------
# The routes read their bodies themselves (JSON, or multipart with files) with the plain models above, so
# that a wrong field gets OpenAI's 400 naming it; they reference these schemas, which openapi.py adds to
# the document with this server's limits: the prompt's length, n's range, the model names.


def documented_requests(limits: LimitsOut) -> list[type[BaseModel]]:
    """ImageGenerationRequest (JSON), ImageEditForm and ImageVariationForm (multipart) with `limits`."""
    easel, size = generation_fields(limits, required=("prompt",)), limits.size
    model_names = Literal[(*(model.name for model in limits.models), "auto", "default")]  # type: ignore[valid-type]
    openai_name = Annotated[str, StringConstraints(pattern=f"^({'|'.join(OPENAI_MODEL_PREFIXES)})")]
    fields: dict[str, Any] = {
        "prompt": easel["prompt"],
        "n": easel["n"],
        "size": (str | None, Field(None, max_length=20, pattern=_size_pattern(size), examples=["auto"],
                                   description=f"WIDTHxHEIGHT in pixels: each side {size.min_side} to "
                                   f"{size.max_side}, a multiple of {size.multiple_of}, at most {size.max_pixels} "
                                   "pixels in all; or auto (the model's default; an edit keeps its picture's "
                                   "shape)")),
        "model": (model_names | openai_name | None, Field(None, description=f"{easel['model'][1].description}; "
                                                          "OpenAI's names (gpt-image-1, dall-e-3...) mean it too")),
        "stream": (Literal[False] | None, Field(None, description="the answer comes once the job is done; "
                                                "streaming is not offered")),
    }
    variation_prompt = (str, Field(VARIATION_PROMPT, min_length=1, max_length=limits.prompt_chars, pattern=r"\S",
                                   description=ImageVariationRequest.model_fields["prompt"].description))
    generation = create_model("ImageGenerationRequest", __base__=ImageGenerationRequest,
                              __doc__=ImageGenerationRequest.__doc__, **fields)
    edit = _documented_form("ImageEditForm", ImageEditRequest, fields, {
        "mask": (bytes, Field(None, description="optional: its transparent pixels are repainted"))})
    variation = _documented_form("ImageVariationForm", ImageVariationRequest, {**fields, "prompt": variation_prompt})
    return [generation, edit, variation]


def _size_pattern(size: SizeLimits) -> str:
    """WIDTHxHEIGHT with each side one the grammar allows (a multiple of 8 within the limits), or auto.
    The pixel cap is in the description only: no pattern short of listing every size can say it."""
    first = -(-size.min_side // size.multiple_of) * size.multiple_of
    sides = "|".join(str(side) for side in range(first, size.max_side + 1, size.multiple_of))
    return f"^(({sides})x({sides})|auto)$"


def _documented_form(name: str, request: type[BaseModel], fields: dict[str, Any],
                     files: dict[str, Any] | None = None) -> type[BaseModel]:
    """`request`'s fields as multipart form fields (text, never null), with `fields` overriding them, and
    the picture as the file `image` or `image[]` (of several, the first is used). Unknown fields are
    refused (400)."""
    documented = {field: fields.get(field, (info.annotation, info)) for field, info in request.model_fields.items()}
    form: dict[str, Any] = {field: (without_none(annotation), info) for field, (annotation, info) in documented.items()}
    # `image` or `image[]`, said as "without image[], image is required" (schemathesis 4.32 cannot generate
    # bodies with files for the plainer anyOf of two `required`).
    either_image = {"if": {"not": {"required": ["image[]"]}}, "then": {"required": ["image"]}}
    return create_model(
        name, __config__=ConfigDict(extra="forbid", json_schema_extra=either_image),
        __doc__=f"{request.__doc__ or ''} As multipart/form-data: the fields as form fields, the picture as the "
                "file `image` (or `image[]`: the first is used).".strip(),
        **form, **(files or {}),
        image=(bytes, Field(None, description="the picture")),
        # A single file here, though several parts may carry it: schemathesis cannot make an array of files.
        images=(bytes, Field(None, alias="image[]", description="the picture, under the name OpenAI's SDKs "
                             "give it; of several, the first is used")))


# -- errors in OpenAI's shape ---------------------------------------------------------------------------

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}
# Every field name an OpenAI image request may have: a message that starts with one is about it.
_PARAMS = (set(ImageGenerationRequest.model_fields) | set(ImageEditRequest.model_fields)
           | {"image", "image[]", "mask"})
_PARAM_AT_START = re.compile(r"`?([a-z_\[\]]+)`?[: ]")


def openai_error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """OpenAI's error shape, which its SDKs read (`error.message`); `param` names the request field the
    message starts with, if any."""
    match = _PARAM_AT_START.match(message)
    param = match[1] if match and match[1] in _PARAMS else None
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


for _prefix in ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/models"):
    register_dialect(_prefix, openai_error_body)


# -- the routes -----------------------------------------------------------------------------------------

IdempotencyKey = Annotated[str | None, Header(max_length=255, description="the same key on a retry waits "
                                                                         "for the first job")]


# The media types a picture may be sent as: the formats bot/images.py decodes. A mask must have transparent
# pixels, so it is documented as a PNG, as OpenAI documents it.
PICTURE_TYPES = "image/png, image/jpeg, image/webp, image/gif, image/bmp"
MASK_TYPES = "image/png"


def _body(media_type: str, schema: str, files: dict[str, str] | None = None) -> dict[str, Any]:
    """`openapi_extra`: the request body is the schema `schema` (documented_requests), as `media_type`;
    `files` are its multipart parts that must be pictures, with the media types each may have."""
    encoding = {"encoding": {file: {"contentType": types} for file, types in files.items()}} if files else {}
    return {"requestBody": {"required": True, "content": {media_type: {
        "schema": {"$ref": f"#/components/schemas/{schema}"}, **encoding}}}}


@router.post("/v1/images/generations", response_model=ImagesOut, responses=OPENAI_ERRORS,
             openapi_extra=_body("application/json", "ImageGenerationRequest"))
async def generate_images(request: Request, core: CoreDep, key: Key,
                          idempotency_key: IdempotencyKey = None) -> Any:
    """OpenAI's `images.generate`: /imagine, answered once the job is done (see the module's notes)."""
    check_body_length(request, core.settings.limits.max_upload_bytes)
    body = _validated(ImageGenerationRequest, await _json_fields(request))
    command = command_of(core, JobKind.IMAGINE, body)
    return await run_job(request, core, key, command, InputImages(), body, idempotency_key)


@router.post("/v1/images/edits", response_model=ImagesOut, responses=OPENAI_ERRORS,
             openapi_extra=_body("multipart/form-data", "ImageEditForm", {
                 "image": PICTURE_TYPES, "image[]": PICTURE_TYPES, "mask": MASK_TYPES}))
async def edit_image(request: Request, core: CoreDep, key: Key, idempotency_key: IdempotencyKey = None) -> Any:
    """OpenAI's `images.edit`: /inpaint with a mask (its transparent pixels repainted), /edit without."""
    fields, image, mask = await _read_form(request, core)
    body = _validated(ImageEditRequest, fields)
    if mask is not None:
        _check_transparent(core, mask)
    command = command_of(core, JobKind.INPAINT if mask is not None else JobKind.EDIT, body)
    return await run_job(request, core, key, command, InputImages(image=image, mask=mask), body, idempotency_key)


@router.post("/v1/images/variations", response_model=ImagesOut, responses=OPENAI_ERRORS,
             openapi_extra=_body("multipart/form-data", "ImageVariationForm", {
                 "image": PICTURE_TYPES, "image[]": PICTURE_TYPES}))
async def vary_image(request: Request, core: CoreDep, key: Key, idempotency_key: IdempotencyKey = None) -> Any:
    """OpenAI's `images.create_variation`: /edit of the picture at VARIATION_STRENGTH."""
    fields, image, mask = await _read_form(request, core)
    if mask is not None:
        raise InvalidCommand("`mask`: variations take no mask; use POST /v1/images/edits to repaint part of "
                             "a picture")
    body = _validated(ImageVariationRequest, fields)
    limits = core.settings.limits
    strength = min(max(VARIATION_STRENGTH, limits.min_strength), limits.max_strength)
    command = command_of(core, JobKind.EDIT, body, strength=strength)
    return await run_job(request, core, key, command, InputImages(image=image), body, idempotency_key)


# -- translating in -------------------------------------------------------------------------------------


async def _json_fields(request: Request) -> Any:
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise HttpError(415, InvalidCommand.code, "send images.generate as application/json")
    try:
        return await request.json()
    except ValueError:
        raise InvalidCommand("the body is not valid JSON") from None


def _validated(model: type[_Body], fields: Any) -> _Body:
    """The request's fields checked against `model`; a 400 naming the first bad field (as OpenAI does)."""
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        item = error.errors()[0]
        field = ".".join(str(part) for part in item["loc"]) or "body"
        if item["type"] == "extra_forbidden":
            raise InvalidCommand(f"`{field}`: unknown parameter for this endpoint (see /openapi.json)") from None
        if item["type"] == "missing":
            raise InvalidCommand(f"`{field}`: missing; it is required") from None
        raise InvalidCommand(f"`{field}`: {item['msg']} (got {str(item.get('input'))[:40]!r})") from None


async def _read_form(request: Request, core: Core) -> tuple[dict[str, str], bytes, bytes | None]:
    """A multipart edit or variation: its text fields, the first image, and the mask if any."""
    max_upload = core.settings.limits.max_upload_bytes
    check_body_length(request, max_upload)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HttpError(415, InvalidCommand.code, "send the image as multipart/form-data (`image`, and "
                        "`mask` for an edit)")
    form = await request.form(max_files=16, max_fields=40)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for name, value in form.multi_items():
        if not isinstance(value, UploadFile):
            fields[name] = value
            continue
        field = "image" if name == "image[]" else name
        if field not in ("image", "mask"):
            raise InvalidCommand(f"`{name}`: unexpected file; the files are `image` (or `image[]`) and `mask`")
        if field not in files:  # of several images the first is used
            files[field] = await read_upload(value, field, max_upload)
    if "image" not in files:
        raise InvalidImage("`image`: missing; send the picture as the multipart file `image`")
    return fields, files["image"], files.get("mask")


def _check_transparent(core: Core, mask: bytes) -> None:
    """OpenAI's masks mark what to repaint with transparency; one without any would be misread as
    Easel's own white-repaint mask, so it is refused instead."""
    image = load_upload(mask, core.settings.limits, "mask")  # RGBA when it has any transparency
    if image.mode != "RGBA" or image.getchannel("A").getextrema()[0] == 255:
        raise InvalidImage("`mask` has no transparent pixels: in the OpenAI API the mask's transparent "
                           "pixels mark what to repaint; erase that area, or leave `mask` out to redraw the "
                           "whole picture")


def easel_model(core: Core, name: str | None) -> str | None:
    """The Easel model an OpenAI `model` names: None for the default (OpenAI's own model names too)."""
    if not name or name.lower() in ("auto", "default"):
        return None
    model = core.catalog.get(name)  # any case; a checkpoint new in the folder is found too
    if model is not None:
        return model.name
    if name.lower().startswith(OPENAI_MODEL_PREFIXES):
        return None
    usable = ", ".join(model.name for model in core.catalog.list() if model.usable)
    raise InvalidCommand(f"`model` must be one of {usable} (GET /v1/models), or an OpenAI model name such as "
                         f"dall-e-3 for the default, {core.catalog.default_name}; got {name[:40]!r}")


def command_of(core: Core, kind: JobKind, body: ImageGenerationRequest | ImageEditRequest | ImageVariationRequest,
               strength: float | None = None) -> GenerateCommand:
    """The request as an Easel command, checked by the one grammar. The request's fields become flags
    unless the prompt already has that flag (what the person typed wins over the client's defaults)."""
    if body.stream:
        raise InvalidCommand("`stream`: streaming is not offered here; leave it out, and the answer comes "
                             "once the images are done")
    if not body.prompt.strip():
        raise InvalidCommand(f"`prompt` is empty: describe the picture, e.g. \"{core.parser.example_prompts()[0]}\"")
    typed = flags_in(body.prompt)
    size = body.size
    if size is not None and size != "auto" and _SIZE.fullmatch(size) is None:
        raise InvalidCommand(f"`size` must be WIDTHxHEIGHT in pixels (e.g. 512x512) or auto; got {size[:20]!r}")
    fields = {"n": ("n", body.n), "size": ("size", None if size == "auto" else size),
              "model": ("model", easel_model(core, body.model)), "strength": ("strength", strength)}
    flags = {flag: (field, value) for flag, (field, value) in fields.items()
             if value is not None and flag not in typed and not (flag == "size" and "ar" in typed)}
    text = " ".join([body.prompt, *(f"--{flag}={value}" for flag, (_, value) in flags.items())])
    try:
        return core.parser.parse_generation(kind, text)
    except InvalidCommand as error:
        # Name the request's field, not the chat flag it became: "--size sides must..." -> "`size` sides must..."
        for flag, (field, _) in flags.items():
            if error.message.startswith(f"--{flag} "):
                raise InvalidCommand(f"`{field}`{error.message.removeprefix(f'--{flag}')}") from None
        raise


# -- running and answering ------------------------------------------------------------------------------


async def run_job(request: Request, core: Core, key: ApiKeyView, command: GenerateCommand, inputs: InputImages,
                  body: BaseModel, idempotency_key: str | None) -> Any:
    """Queue the job like any surface, wait for it, and answer with what its Delivery may show."""
    result = await core.service.submit(key.requester(), command, inputs, idempotency_key=idempotency_key,
                                       fingerprint=fingerprint(body, inputs))
    wait_s = core.settings.http.openai_wait_s
    job = await core.service.wait_until_final(result.job.id, wait_s)
    base = base_url(core, request)
    if not job.status.is_final:
        return _unretried_error(request, 504, "job_still_running", (
            f"Job {job.id} is still {job.status.value} after {wait_s:g} s (http.openai_wait_s). It is not lost "
            f"and finishes on its own: GET /v1/jobs/{job.id} shows it and its images. Sending this request "
            "again would queue another job."), location=f"{base}/v1/jobs/{job.id}")
    if job.status is JobStatus.FAILED:
        return _unretried_error(request, 500, "generation_failed", f"Job {job.id} failed: {job.error}")
    if job.status is JobStatus.CANCELLED:
        return _unretried_error(request, 409, "cancelled", f"Job {job.id} was cancelled before it finished; "
                                "its quota was refunded")
    return await images_out(request, core, job, body, base)


async def images_out(request: Request, core: Core, job: JobView, body: BaseModel, base: str) -> Any:
    """OpenAI's `{created, data}` of the images the job's Delivery may show; the withheld ones' notices
    in `easel.withheld`, and an error when none may be shown."""
    delivery = core.deliveries.of_job(job)
    if not delivery.images:
        # OpenAI answers a picture its safety system stopped with 400 content_policy_violation.
        return _unretried_error(request, 400, "content_policy_violation",
                                delivery.notice or f"Job {job.id} has no image that may be shown here")
    as_url = getattr(body, "response_format", None) == "url"
    data = []
    for image in delivery.images:
        encoded = None if as_url else base64.b64encode(await asyncio.to_thread(core.store.read_bytes, image.sha256))
        data.append({"url": image_url(base, image.sha256) if as_url else None,
                     "b64_json": encoded.decode() if encoded is not None else None,
                     "revised_prompt": job.params.prompt, "seed": image.seed, "spoiler": image.spoiler})
    finished = job.finished_at or datetime.now(UTC)
    if finished.tzinfo is None:
        finished = finished.replace(tzinfo=UTC)  # the database keeps UTC without its zone
    return {"created": int(finished.timestamp()), "data": data, "size": f"{job.params.width}x{job.params.height}",
            "background": "opaque", "output_format": "png",
            "easel": {"job_id": job.id, "withheld": [notice.message for notice in delivery.withheld]}}


def _unretried_error(request: Request, status: int, code: str, message: str,
                     location: str | None = None) -> JSONResponse:
    """An error after the job was queued: `x-should-retry: false`, so that the openai SDK's automatic
    retries do not queue the same job again behind the user's back."""
    headers = {"x-should-retry": "false", **({"Location": location} if location else {})}
    return error_response(request, status, code, message, headers)

