"""The API's request and response bodies: Pydantic models that are also its OpenAPI schema."""

from __future__ import annotations

from http import HTTPStatus
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from bot.config import Settings
from bot.domain import SAMPLERS, JobKind, JobStatus
from bot.grammar import MAX_ASPECT, MAX_SEED, MAX_ZOOM, MIN_ZOOM


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A whole number as JSON writes it: 30 or 30.0 (JSON has one number type; JSON Schema's "integer" takes
# both). Strict otherwise: "30" (a string) and 30.5 are refused.
WholeNumber = Annotated[int, BeforeValidator(_integral)]


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://", max_length=2000, description="POSTed once the job is final")
    secret: str = Field(min_length=16, max_length=256,
                        description="HMAC-SHA256 key for the Easel-Signature header; choose a random one")


# A job is asked for in one of two ways (parse.generation_text refuses both at once, or neither).
COMMAND_OR_PROMPT: dict[str, Any] = {"oneOf": [
    {"required": ["command"], "properties": {"command": {"type": "string"}}},
    {"required": ["kind", "prompt"], "properties": {"kind": {"type": "string"}, "prompt": {"type": "string"}}}]}


class JobRequest(BaseModel):
    """Either `command` in the chat grammar, or `kind` and `prompt` with optional fields."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=COMMAND_OR_PROMPT)

    command: str | None = Field(None, max_length=4000, examples=["/imagine a lighthouse at dusk --seed 42"])
    kind: JobKind | None = None
    prompt: str | None = Field(None, max_length=4000)
    negative: str | None = Field(None, max_length=4000)
    seed: WholeNumber | None = None
    steps: WholeNumber | None = None
    cfg: float | None = None
    size: str | None = Field(None, max_length=20, examples=["512x768"])
    ar: str | None = Field(None, max_length=20, examples=["16:9"])
    n: WholeNumber | None = None
    sampler: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=128)
    strength: float | None = None
    zoom: float | None = None
    left: WholeNumber | None = None
    right: WholeNumber | None = None
    up: WholeNumber | None = None
    down: WholeNumber | None = None
    image: str | None = Field(None, description="base64 (or a data: URL) of a PNG, JPEG, WebP, GIF or BMP")
    mask: str | None = Field(None, description="base64 of the mask: white pixels are repainted")
    webhook: Webhook | None = None


class SubmitQuery(BaseModel):
    """POST /v1/jobs's query; an unknown parameter is refused (a typo must not be ignored silently)."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, description="validate and price only: nothing is queued or charged")


class ListQuery(BaseModel):
    """GET /v1/jobs's query; an unknown parameter is refused."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(20, ge=1, le=100, description="how many jobs, newest first")


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: WholeNumber = Field(0, ge=0, description="which image of the job, from 0")


class ReframeRequest(IndexRequest):
    action: Literal["zoom15", "zoom2", "left", "up", "right", "down"] = Field(
        description="zoom15 and zoom2: zoom out 1.5x or 2x (the canvas grows that much each way); left, up, right, "
                    "down: pan, adding half the picture's side that way (less where the size limits leave less)")


class ImageOut(BaseModel):
    index: int
    seed: int
    url: str
    width: int
    height: int
    spoiler: bool = Field(False, description="flagged by the image check where NSFW is allowed: show it "
                                             "behind a spoiler (blurred, click to show)")


class WithheldOut(BaseModel):
    index: int
    seed: int
    category: str
    message: str = Field(description="what happened, why, and how to appeal; show it instead of the image")


class LoraUseOut(BaseModel):
    name: str = Field(description="the LoRA's name (trained/u<id>/NAME: its owner's /teach word)")
    weight: float


class ParamsOut(BaseModel):
    """The settings a job runs with: the defaults filled in, the size fitted to an input picture."""

    width: int
    height: int
    steps: int
    cfg: float
    n: int
    sampler: str
    model: str
    seed: int | None = Field(description="image i has seed + i; null only in a dry run without --seed "
                                         "(a random one is picked when the job is queued)")
    strength: float | None = Field(description="edit and inpaint: how much of the picture is redrawn")
    loras: list[LoraUseOut] = Field(default_factory=list, description="its LoRAs, <lora:NAME:WEIGHT> and "
                                    "--lora, and the trigger words of its owner's trained words")


class JobOut(BaseModel):
    id: str
    status: JobStatus
    kind: JobKind
    prompt: str
    negative: str
    params: ParamsOut
    seeds: list[int]
    position: int | None = Field(None, description="1 = next to run; null once started")
    progress: dict[str, int]
    images: list[ImageOut] = Field(description="the images that may be shown (withheld ones are not listed)")
    withheld: list[WithheldOut]
    notice: str | None = Field(None, description="every withheld image's message, as one paragraph")
    inputs: dict[str, str | None]
    video: str | None = Field(None, description="/animate: the clip, an H.264 MP4, wherever its poster (the "
                              "last frame, in `images`) may be shown")
    gif: str | None = Field(None, description="/animate: the same clip as a looping GIF (at most 512 pixels a side "
                            "and 8 MiB), beside `video`; its link answers 404 for a clip too large for one")
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    links: dict[str, str]


class SubmitOut(JobOut):
    replayed: bool = Field(False, description="true: the Idempotency-Key matched an earlier request")
    others: list[JobOut] = Field(default_factory=list, description="a permutation prompt's further jobs "
                                 "(`a {red, green} circle`: one job per combination, this one the first)")


class ErrorOut(BaseModel):
    """Every error of Easel's own routes, a wrong field (422) included."""

    code: str = Field(description="what kind of error, e.g. invalid_command, unauthorized, quota_exceeded")
    message: str = Field(description="one line for a person: what was wrong and what to change")


class QuotaWindowOut(BaseModel):
    used: float
    limit: float | None = Field(description="null: no limit")


class ImagesCapOut(BaseModel):
    used: int
    limit: int | None = Field(description="null: no limit")


class QuotaOut(BaseModel):
    tier: str
    used: float = Field(description="cost units charged today (512x512, 20 steps, 1 image = 1 unit)")
    limit: float | None = Field(description="units a day; null: no limit")
    remaining: float | None
    reserved: float = Field(description="the part of `used` held by jobs still queued or running")
    resets_at: str
    minute: QuotaWindowOut = Field(description="units over the last 60 seconds")
    images: ImagesCapOut = Field(description="images today, against the plain images-per-day cap")
    text: str = Field(description="the same, as the chat's /quota says it")


class DryRunParamsOut(ParamsOut):
    kind: JobKind
    prompt: str
    negative: str


class DryRunOut(BaseModel):
    """POST /v1/jobs?dry_run=true: the job checked and priced, nothing queued or charged."""

    valid: Literal[True]
    cost_units: float
    images: int
    position: int = Field(description="where it would stand in the queue now (1 = next)")
    quota: QuotaOut = Field(description="before this job")
    params: DryRunParamsOut


class IntRange(BaseModel):
    min: int
    max: int
    default: int | None = Field(None, description="null: none (a random seed)")


class FloatRange(BaseModel):
    min: float
    max: float
    default: float


class SizeLimits(BaseModel):
    min_side: int
    max_side: int
    multiple_of: int = Field(description="each side is a multiple of this")
    max_pixels: int = Field(description="width x height at most")
    max_aspect: float = Field(description="--ar ranges from 1:max_aspect to max_aspect:1")


class ModelLimits(BaseModel):
    name: str
    default_width: int
    default_height: int


class LimitsOut(BaseModel):
    """What a job may ask for on this server (settings.limits, the models, the samplers): the chat's
    /help in numbers, so a client (the MCP tools, a form) can offer exactly the allowed values."""

    prompt_chars: int = Field(description="the longest prompt, and the longest negative prompt")
    seed: IntRange
    steps: IntRange
    cfg: FloatRange
    n: IntRange
    strength: FloatRange = Field(description="edit and inpaint only")
    size: SizeLimits
    samplers: list[str]
    default_sampler: str
    models: list[ModelLimits]
    default_model: str
    max_upload_bytes: int = Field(description="the largest picture or mask one may send")

    @classmethod
    def of(cls, settings: Settings) -> LimitsOut:
        limits = settings.limits
        return cls(
            prompt_chars=limits.max_prompt_chars,
            seed=IntRange(min=0, max=MAX_SEED),
            steps=IntRange(min=limits.min_steps, max=limits.max_steps, default=limits.default_steps),
            cfg=FloatRange(min=limits.min_cfg, max=limits.max_cfg, default=limits.default_cfg),
            n=IntRange(min=1, max=limits.max_n, default=limits.default_n),
            strength=FloatRange(min=limits.min_strength, max=limits.max_strength,
                                default=limits.default_strength),
            size=SizeLimits(min_side=limits.min_side, max_side=limits.max_side, multiple_of=8,
                            max_pixels=limits.max_pixels, max_aspect=MAX_ASPECT),
            samplers=list(SAMPLERS), default_sampler=settings.generation.default_sampler,
            models=[ModelLimits(name=name, default_width=m.default_width, default_height=m.default_height)
                    for name, m in settings.models.items()],
            default_model=settings.generation.default_model,
            max_upload_bytes=limits.max_upload_bytes)


class ExamplesOut(BaseModel):
    model: str
    prompts: list[str] = Field(description="prompts this model draws what they say")


class HelpOut(BaseModel):
    text: str = Field(description="the chat's /help: commands, flags and limits")
    examples: ExamplesOut
    limits: LimitsOut


class HealthOut(BaseModel):
    status: Literal["ok"]


class SessionOut(BaseModel):
    token: str = Field(description="a key for this browser: send it as `Authorization: Bearer <token>`")
    key_id: str


# -- the generation parameters with this server's ranges: the MCP tools' arguments and /openapi.json ----


def generation_fields(limits: LimitsOut, *, required: tuple[str, ...] = ()) -> dict[str, tuple[Any, FieldInfo]]:
    """Each generation parameter as a pydantic field `(type, Field(...))` whose range, choices and
    default come from `limits`, for `create_model`. The fields in `required` have no default; the
    others default to None, which means the server's default (named in the description)."""
    size, models = limits.size, [model.name for model in limits.models]
    default_sizes = ", ".join(f"{m.name} {m.default_width}x{m.default_height}" for m in limits.models)

    def field(name: str, annotation: Any, description: str, **constraints: Any) -> tuple[Any, FieldInfo]:
        if name in required:
            return annotation, Field(description=description, **constraints)
        return annotation | None, Field(None, description=description, **constraints)

    def choice(name: str, choices: list[str], description: str) -> tuple[Any, FieldInfo]:
        # `enum` even for one choice (pydantic writes a lone Literal as `const`).
        return field(name, Literal[tuple(choices)], description, json_schema_extra={"enum": choices})

    return {
        "prompt": field("prompt", str, "what to draw", min_length=1, max_length=limits.prompt_chars,
                        pattern=r"\S"),
        "negative": field("negative", str, "what to keep out of the picture", max_length=limits.prompt_chars),
        "seed": field("seed", int, "the same seed and settings make the same picture again; image i of a "
                      "job has seed + i (default: random)", ge=limits.seed.min, le=limits.seed.max),
        "steps": field("steps", int, f"denoising steps (default {limits.steps.default}); more is slower and "
                       "finer", ge=limits.steps.min, le=limits.steps.max),
        "cfg": field("cfg", float, f"how closely to follow the prompt (default {limits.cfg.default:g})",
                     ge=limits.cfg.min, le=limits.cfg.max),
        "size": field("size", str, f"WIDTHxHEIGHT in pixels: each side {size.min_side} to {size.max_side}, "
                      f"a multiple of {size.multiple_of}, at most {size.max_pixels} pixels in all; not with "
                      f"`ar` (default: the model's, {default_sizes}; an edit keeps its picture's shape)",
                      pattern=r"^[0-9]+[xX×][0-9]+$", max_length=20),
        "ar": field("ar", str, f"aspect ratio W:H from 1:{size.max_aspect:g} to {size.max_aspect:g}:1, e.g. "
                    "16:9, at the model's usual pixel count; not with `size`",
                    pattern=r"^[0-9]+(\.[0-9]+)?:[0-9]+(\.[0-9]+)?$", max_length=20),
        "n": field("n", int, f"how many images (default {limits.n.default})", ge=limits.n.min, le=limits.n.max),
        "sampler": choice("sampler", limits.samplers, f"the diffusion sampler (default {limits.default_sampler})"),
        "model": choice("model", models, f"the model (default {limits.default_model})"),
        "strength": field("strength", float, "edit and inpaint only: how much of the picture to redraw, "
                          f"from keeping it to replacing it (default {limits.strength.default:g})",
                          ge=limits.strength.min, le=limits.strength.max),
        "zoom": field("zoom", float, f"outpaint only: the canvas grows {MIN_ZOOM:g} to {MAX_ZOOM:g} times each way, "
                      "the picture in the middle (shrunk to fit the size limits); not with the sides",
                      ge=MIN_ZOOM, le=MAX_ZOOM),
        **{side: field(side, int, f"outpaint only: pixels to add {where}, a multiple of 8; not with `zoom`",
                       ge=0, le=size.max_side, multiple_of=8)
           for side, where in (("left", "on the left"), ("right", "on the right"), ("up", "above"),
                               ("down", "below"))},
    }


def documented_job_request(limits: LimitsOut) -> type[BaseModel]:
    """JobRequest as /openapi.json shows it, with this server's ranges and choices. Requests are read
    with the plain JobRequest: the grammar checks these values and answers 400 naming the limit."""
    return create_model("JobRequest", __base__=JobRequest, __doc__=JobRequest.__doc__,
                        **generation_fields(limits))


def documented_job_form(limits: LimitsOut) -> type[BaseModel]:
    """POST /v1/jobs as multipart/form-data: JobRequest's fields as form fields, pictures as files."""
    request = documented_job_request(limits)
    # A form field is text or absent, never null.
    fields: dict[str, Any] = {name: (without_none(info.annotation), info) for name, info in
                              request.model_fields.items() if name not in ("image", "mask", "webhook")}
    rules = {**COMMAND_OR_PROMPT,
             "dependentRequired": {"webhook_url": ["webhook_secret"], "webhook_secret": ["webhook_url"]}}
    return create_model(
        "JobForm", __config__=ConfigDict(extra="forbid", json_schema_extra=rules),
        __doc__="The fields of the JSON body as form fields; `image` and `mask` as files (or base64 fields); "
                "the webhook as `webhook_url` and `webhook_secret`.",
        **fields,
        image=(bytes, Field(None, description="the picture (edit, inpaint, outpaint)")),
        mask=(bytes, Field(None, description="inpaint: white pixels are repainted")),
        webhook_url=(str, Field(None, pattern=r"^https?://", max_length=2000)),
        webhook_secret=(str, Field(None, min_length=16, max_length=256)))


def without_none(annotation: Any) -> Any:
    """`annotation` without None: a form field is text or absent, never null."""
    if get_origin(annotation) not in (Union, UnionType):
        return annotation
    return Union[tuple(arg for arg in get_args(annotation) if arg is not type(None))]  # noqa: UP007


# -- the server-sent events of GET /v1/jobs/{id}/events: `event: KIND` and `data: JSON` -----------------


class QueuedData(BaseModel):
    job_id: str
    position: int | None = Field(description="1 = next to run")


class StartedData(BaseModel):
    job_id: str
    batch_size: int = Field(description="images in the diffusers call this job is part of")


class ProgressData(BaseModel):
    job_id: str
    step: int
    total: int
    preview: str | None = Field(None, description="a data: URL of a rough picture so far (generation.previews)")
    preview_spoiler: bool = Field(False, description="show the preview only behind a spoiler")
    loss: float | None = Field(None, description="a /teach training: the mean loss of the slice that ended")
    eta_s: float | None = Field(None, description="a /teach training: about how many seconds are left")
    sample: str | None = Field(None, description="a /teach training: a data: URL of a picture made with it so far")


class DoneData(BaseModel):
    job_id: str
    images: list[ImageOut]
    withheld: list[WithheldOut]
    notice: str | None = None


class FailedData(BaseModel):
    job_id: str
    error: str | None


class CancelledData(BaseModel):
    job_id: str


# Each event's `data`, by its `event` (released: a moderator accepted an appeal; the images now shown).
EVENT_DATA: dict[str, type[BaseModel]] = {"queued": QueuedData, "started": StartedData,
                                          "progress": ProgressData, "done": DoneData, "released": DoneData,
                                          "failed": FailedData, "cancelled": CancelledData}


def event_stream_item() -> dict[str, Any]:
    """One event of the stream, for the response's `itemSchema` (the models are added to components)."""
    return {"oneOf": [
        {"type": "object", "required": ["id", "event", "data"], "properties": {
            "id": {"type": "string", "description": "send it back as Last-Event-ID to resume after it"},
            "event": {"const": kind},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        for kind, model in EVENT_DATA.items()]}


def errors(*statuses: int, body: type[BaseModel] = ErrorOut) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route's error statuses, each answered as `body` in JSON (also on routes whose
    own answer is not JSON: an image, an event stream; adapters/api/openapi.py adds the schema). `body`
    is ErrorOut, or the error model of the dialect the route's prefix is registered with (errors.py)."""
    schema = {"$ref": f"#/components/schemas/{body.__name__}"}
    return {status: {"description": HTTPStatus(status).phrase, "content": {"application/json": {"schema": schema}}}
            for status in statuses}
