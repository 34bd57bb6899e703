"""The HTTP adapter: a JSON API for programs (FastAPI, OpenAPI at /openapi.json) and the web chat at /.

Like every adapter it translates: a request becomes a command for the job service, job events
become JSON, server-sent events and completion webhooks. The web chat (adapters/web/) is a static
page that uses this same API with a per-browser key from POST /v1/sessions.

    POST   /v1/jobs                   queue /imagine, /edit or /inpaint (JSON or multipart); 202
    POST   /v1/jobs?dry_run=true      validate and price it without queuing
    GET    /v1/jobs, /v1/jobs/{id}    your jobs; one job: status, progress, seeds, image links
    GET    /v1/jobs/{id}/events       server-sent events: queued, started, progress, done/failed/cancelled
    DELETE /v1/jobs/{id}              cancel
    POST   /v1/jobs/{id}/reroll|variations|upscale
    GET    /v1/images/{sha256}        a PNG (a capability link: no key needed)
    GET    /v1/quota, /v1/models, /v1/help, /healthz, /metrics

Errors are `{"code": ..., "message": ...}` with the EaselError codes; a bad payload is a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.webhooks import WebhookSender, check_webhook_target
from bot.apikeys import PLATFORM, ApiKeys, ApiKeyView
from bot.bootstrap import Core
from bot.delivery import Delivery, deliver_events
from bot.domain import GenerateCommand, InputImages, JobKind, JobStatus
from bot.errors import (
    EaselError,
    IdempotencyConflict,
    InvalidCommand,
    InvalidImage,
    NotFound,
    QueueFull,
    QuotaExceeded,
    Refused,
    Unauthorized,
)
from bot.events import EventKind
from bot.followups import reroll, upscale, variation
from bot.metrics import read_metrics
from bot.policy import describe_quota
from bot.views import JobView, QuotaStatus

log = logging.getLogger("easel.http")

WEB_DIR = Path(__file__).resolve().parent / "web"
STATUS_OF: dict[type[EaselError], int] = {
    InvalidCommand: 400, InvalidImage: 400, Unauthorized: 401, Refused: 403, NotFound: 404,
    IdempotencyConflict: 409, QuotaExceeded: 429, QueueFull: 429,
}
# Everything a page of ours may load comes from this server; results are blob:/data: URLs at most.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                           "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")


class HttpError(EaselError):
    """An EaselError with its own HTTP status, e.g. a body over the size limit (413)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# -- request and response bodies (they are also the OpenAPI schema) -----------------------------------


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://", max_length=2000, description="POSTed once the job is final")
    secret: str = Field(min_length=16, max_length=256,
                        description="HMAC-SHA256 key for the Easel-Signature header; choose a random one")


class JobRequest(BaseModel):
    """Either `command` in the chat grammar, or `kind` and `prompt` with optional fields."""

    model_config = ConfigDict(extra="forbid")

    command: str | None = Field(None, max_length=4000, examples=["/imagine a lighthouse at dusk --seed 42"])
    kind: JobKind | None = None
    prompt: str | None = Field(None, max_length=4000)
    negative: str | None = Field(None, max_length=4000)
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    size: str | None = Field(None, max_length=20, examples=["512x768"])
    ar: str | None = Field(None, max_length=20, examples=["16:9"])
    n: int | None = None
    sampler: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=128)
    strength: float | None = None
    image: str | None = Field(None, description="base64 (or a data: URL) of a PNG, JPEG, WebP, GIF or BMP")
    mask: str | None = Field(None, description="base64 of the mask: white pixels are repainted")
    webhook: Webhook | None = None


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(0, ge=0, description="which image of the job, from 0")


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


class JobOut(BaseModel):
    id: str
    status: JobStatus
    kind: JobKind
    prompt: str
    negative: str
    params: dict[str, Any]
    seeds: list[int]
    position: int | None = Field(None, description="1 = next to run; null once started")
    progress: dict[str, int]
    images: list[ImageOut] = Field(description="the images that may be shown (withheld ones are not listed)")
    withheld: list[WithheldOut]
    notice: str | None = Field(None, description="every withheld image's message, as one paragraph")
    inputs: dict[str, str | None]
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    links: dict[str, str]


class SubmitOut(JobOut):
    replayed: bool = Field(False, description="true: the Idempotency-Key matched an earlier request")


class ErrorOut(BaseModel):
    code: str
    message: str


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorOut} for status in (400, 401, 404, 422, 429)}
SUBMIT_ERRORS = {**ERRORS, **{status: {"model": ErrorOut} for status in (403, 409, 411, 413, 415)}}


# -- translating ----------------------------------------------------------------------------------------


def base_url(core: Core, request: Request | None = None) -> str:
    if core.settings.http.public_url:
        return core.settings.http.public_url.rstrip("/")
    if request is not None:
        return str(request.base_url).rstrip("/")
    return f"http://{core.settings.http.host}:{core.settings.http.port}"


def image_url(base: str, sha256: str) -> str:
    return f"{base}/v1/images/{sha256}"


def job_out(delivery: Delivery, base: str, position: int | None = None) -> dict[str, Any]:
    """A job as the API shows it: only the images that may be shown (with `spoiler`), and a notice for
    each withheld one (bot/delivery.py decides which)."""
    job, p = delivery.job, delivery.job.params

    def when(moment: Any) -> str | None:
        return moment.isoformat() if moment else None

    return {
        "id": job.id, "status": job.status.value, "kind": p.kind.value, "prompt": p.prompt, "negative": p.negative,
        "params": {"width": p.width, "height": p.height, "steps": p.steps, "cfg": p.cfg, "n": p.n,
                   "sampler": p.sampler, "model": p.model, "seed": p.seed, "strength": p.strength},
        "seeds": job.seeds, "position": position,
        "progress": {"step": job.progress_step, "total": job.progress_total},
        "images": images_out(delivery, base),
        "withheld": withheld_out(delivery),
        "notice": delivery.notice or None,
        "inputs": {"image": image_url(base, job.init_image_sha) if job.init_image_sha else None,
                   "mask": image_url(base, job.mask_image_sha) if job.mask_image_sha else None},
        "error": job.error,
        "created_at": when(job.created_at), "started_at": when(job.started_at),
        "finished_at": when(job.finished_at),
        "links": {"self": f"{base}/v1/jobs/{job.id}", "events": f"{base}/v1/jobs/{job.id}/events"},
    }


def images_out(delivery: Delivery, base: str) -> list[dict[str, Any]]:
    return [{"index": i.index, "seed": i.seed, "url": image_url(base, i.sha256), "width": i.width,
             "height": i.height, "spoiler": i.spoiler} for i in delivery.images]


def withheld_out(delivery: Delivery) -> list[dict[str, Any]]:
    return [{"index": w.index, "seed": w.seed, "category": w.category, "message": w.message}
            for w in delivery.withheld]


def event_data(delivery: Delivery, base: str) -> dict[str, Any]:
    """One SSE event's data: what the delivery may show, with image links instead of file paths."""
    data: dict[str, Any] = {"job_id": delivery.job.id}
    kind = delivery.kind
    if kind is EventKind.QUEUED:
        data["position"] = delivery.position
    elif kind is EventKind.STARTED:
        data["batch_size"] = delivery.job.batch_size
    elif kind is EventKind.PROGRESS:
        data.update(step=delivery.step, total=delivery.total)
        if delivery.preview is not None:
            data.update(preview=delivery.preview, preview_spoiler=delivery.preview_spoiler)
    elif kind in (EventKind.DONE, EventKind.RELEASED):
        data.update(images=images_out(delivery, base), withheld=withheld_out(delivery))
        if delivery.notice:
            data["notice"] = delivery.notice
    elif kind is EventKind.FAILED:
        data["error"] = delivery.error
    return data


def generation_text(body: JobRequest) -> str:
    """The JSON fields as a chat command, so the one grammar checks every value and names every limit."""
    fields = body.model_fields_set - {"image", "mask", "webhook"}
    if body.command is not None:
        if fields - {"command"}:
            raise InvalidCommand("give either `command` or `kind` and `prompt` with their fields, not both "
                                 f"(also got: {', '.join(sorted(fields - {'command'}))})")
        return body.command
    if body.kind is None or body.prompt is None:
        raise InvalidCommand("a job needs `command` (e.g. \"/imagine a red fox --seed 4\"), or `kind` "
                             "(imagine, edit, inpaint) and `prompt`")
    words = [f"/{body.kind.value}", body.prompt]
    for flag in ("seed", "steps", "cfg", "size", "ar", "n", "sampler", "model", "strength"):
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


def fingerprint(body: JobRequest, inputs: InputImages) -> str:
    """A hash of what was asked, the same for a JSON or multipart retry of one request."""
    asked = body.model_dump(mode="json", exclude={"image", "mask"}, exclude_none=True)
    for name, data in (("image", inputs.image), ("mask", inputs.mask)):
        if data is not None:
            asked[name] = hashlib.sha256(data).hexdigest()
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


async def read_job_request(request: Request, max_upload: int) -> tuple[JobRequest, InputImages]:
    # The whole body is capped before it is read: two images, base64's overhead, and the fields.
    cap = 2 * ((max_upload + 2) // 3 * 4) + 256 * 1024
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise HttpError(411, InvalidCommand.code, "send a Content-Length header with the request body")
    if int(length) > cap:
        raise HttpError(413, InvalidImage.code, f"the request is {int(length)} bytes; the limit is {cap} "
                        "(two images of limits.max_upload_bytes)")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _read_multipart(request, max_upload)
    if not content_type.startswith("application/json"):
        raise HttpError(415, InvalidCommand.code, "send the job as application/json or multipart/form-data")
    try:
        body = JobRequest.model_validate_json(await request.body(), strict=True)
    except ValidationError as error:
        raise HttpError(422, InvalidCommand.code, _describe(error.errors())) from None
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
            data = await value.read(max_upload + 1)
            if len(data) > max_upload:
                raise HttpError(413, InvalidImage.code, f"`{name}` is over {max_upload // (1024 * 1024)} MiB "
                                "(limits.max_upload_bytes); send a smaller file")
            files[name] = data
        elif name in ("webhook_url", "webhook_secret"):
            fields.setdefault("webhook", {})[name.removeprefix("webhook_")] = value
        else:
            fields[name] = value
    try:
        body = JobRequest.model_validate(fields)  # lax: form values are text, "20" is a fine 20
    except ValidationError as error:
        raise HttpError(422, InvalidCommand.code, _describe(error.errors())) from None
    image = files.get("image") or decode_image(body.image, "image", max_upload)
    mask = files.get("mask") or decode_image(body.mask, "mask", max_upload)
    return body, InputImages(image=image, mask=mask)


def _describe(errors: Any) -> str:
    """Pydantic's errors in one line, naming each field: `steps: Input should be a valid integer`."""
    parts = []
    for item in list(errors)[:5]:
        field = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query", "header",
                                                                                   "path"))
        message = item.get("msg", "is not valid")
        if item.get("type") == "extra_forbidden":
            message = "unknown field (see /openapi.json)"
        elif item.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        parts.append(f"{field or 'body'}: {message}")
    return "; ".join(parts) or "the request is not valid"


# -- the app --------------------------------------------------------------------------------------------


_bearer = HTTPBearer(auto_error=False, description="an API key from `easel apikey create`, or POST /v1/sessions")


async def current_key(request: Request,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiKeyView:
    keys: ApiKeys = request.app.state.keys
    return await keys.authenticate(credentials.credentials if credentials else None)


# The key a request was made with (401 without one): its jobs, quota and safety record are its own.
Key = Annotated[ApiKeyView, Depends(current_key)]


def build_app(core: Core) -> FastAPI:
    """The FastAPI app over one core. `HttpAdapter` serves it with uvicorn."""
    settings = core.settings
    keys = ApiKeys(core.db)
    app = FastAPI(title="Easel", version="1", description="Stable Diffusion jobs on a durable, fair queue.",
                  docs_url="/docs", redoc_url=None)
    app.state.keys = keys

    async def own_job(key: ApiKeyView, job_id: str) -> JobView:
        """A key sees only its own jobs; another key's job is as good as absent."""
        job = await core.service.get_job(job_id)
        if (job.platform, job.user_id) != (PLATFORM, key.public_id):
            raise NotFound(f"No job with id {job_id!r} among this key's jobs")
        return job

    def shown(job: JobView) -> Delivery:
        """What of `job` may be shown to its owner (bot/delivery.py decides)."""
        return core.deliveries.of_job(job)

    async def with_position(job: JobView) -> int | None:
        return await core.service.position(job.id) if job.status is JobStatus.QUEUED else None

    # -- errors: one hook, JSON always --------------------------------------------------------------

    @app.exception_handler(EaselError)
    async def easel_error(_request: Request, error: EaselError) -> JSONResponse:
        status = error.status if isinstance(error, HttpError) else next(
            (code for cls, code in STATUS_OF.items() if isinstance(error, cls)), 400)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"code": error.code, "message": error.message}, status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"code": InvalidCommand.code, "message": _describe(error.errors())}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        # 400 here is a malformed multipart body (too many files or fields, a broken boundary).
        code = {400: InvalidCommand.code, 404: NotFound.code, 405: "method_not_allowed"}.get(error.status_code,
                                                                                              "http_error")
        return JSONResponse({"code": code, "message": str(error.detail)}, error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception) -> JSONResponse:
        log.exception("HTTP request failed", exc_info=error)
        return JSONResponse({"code": "internal_error", "message": "Something went wrong on our side; it has "
                             "been logged. Try again."}, 500)

    # -- the web chat and operations ----------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def web_chat() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                             "Cache-Control": "no-cache"})

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        await core.bus.latest_id()  # a read that fails when the database does
        return {"status": "ok"}

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(await read_metrics(core.db)),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/sessions", tags=["web chat"], status_code=201)
    async def new_session() -> dict[str, str]:
        """A key for one browser of the web chat (when `http.web_sessions` is on)."""
        if not settings.http.web_sessions:
            raise Refused("This server gives no web sessions; paste an API key made with "
                          "`easel apikey create --name NAME`")
        token, key = await keys.create("web session", kind="web")
        return {"token": token, "key_id": key.public_id}

    # -- jobs -----------------------------------------------------------------------------------------

    job_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "command": {"type": "string"}, "image": {"type": "string", "format": "binary"},
            "mask": {"type": "string", "format": "binary"}, "webhook_url": {"type": "string"},
            "webhook_secret": {"type": "string"}},
            "description": "the fields of the JSON body as form fields, images as files"}}}}}

    @app.post("/v1/jobs", tags=["jobs"], status_code=202, response_model=SubmitOut, responses=SUBMIT_ERRORS,
              openapi_extra=job_body)
    async def submit_job(request: Request, key: Key, response: Response,
                         dry_run: Annotated[bool, Query(description="validate and price only")] = False,
                         idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> Any:
        """Queue a job; answers 202 with its id and queue position. Retries with the same
        `Idempotency-Key` get the same job back."""
        body, inputs = await read_job_request(request, settings.limits.max_upload_bytes)
        command = core.parser.parse(generation_text(body))
        if not isinstance(command, GenerateCommand):
            raise InvalidCommand("POST /v1/jobs takes /imagine, /edit or /inpaint; see GET /v1/quota, "
                                 "GET /v1/jobs/{id}, DELETE /v1/jobs/{id} for the other commands")
        if dry_run:
            estimate = await core.service.estimate(key.requester(), command, inputs)
            p = estimate.params
            return JSONResponse({"valid": True, "cost_units": estimate.cost, "images": estimate.images,
                                 "position": estimate.position, "quota": quota_out(estimate.quota),
                                 "params": {"kind": p.kind.value, "prompt": p.prompt, "negative": p.negative,
                                            "width": p.width, "height": p.height, "steps": p.steps,
                                            "cfg": p.cfg, "n": p.n, "sampler": p.sampler, "model": p.model,
                                            "seed": p.seed, "strength": p.strength}})
        reply_to = {}
        if body.webhook is not None:
            await check_webhook_target(body.webhook.url, settings.http.allow_private_webhooks)
            reply_to = {"webhook": body.webhook.model_dump()}
        result = await core.service.submit(key.requester(reply_to), command, inputs,
                                           idempotency_key=idempotency_key,
                                           fingerprint=fingerprint(body, inputs))
        if result.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        base = base_url(core, request)
        response.headers["Location"] = f"{base}/v1/jobs/{result.job.id}"
        return {**job_out(shown(result.job), base, result.position or None), "replayed": result.replayed}

    @app.get("/v1/jobs", tags=["jobs"], response_model=list[JobOut])
    async def list_jobs(request: Request, key: Key, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Any:
        """This key's jobs, newest first."""
        base = base_url(core, request)
        return [job_out(shown(job), base) for job in await core.service.list_jobs(limit, key.requester())]

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut, responses=ERRORS)
    async def get_job(request: Request, key: Key, job_id: str) -> Any:
        job = await own_job(key, job_id)
        return job_out(shown(job), base_url(core, request), await with_position(job))

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses={
        200: {"content": {"text/event-stream": {}}, "description": "queued, started, progress, then done, "
              "failed or cancelled; the stream ends after the final event"}, **ERRORS})
    async def job_events(request: Request, key: Key, job_id: str,
                         last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
        job = await own_job(key, job_id)
        base = base_url(core, request)
        after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0

        async def stream() -> AsyncIterator[str]:
            async for event in core.bus.watch(job.id):
                if event.id > after:
                    # A final event shows the images: read them as they are now.
                    now = await core.service.get_job(job.id) if event.is_final else job
                    data = event_data(core.deliveries.of_event(event, now), base)
                    yield f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut, responses=ERRORS)
    async def cancel_job(request: Request, key: Key, job_id: str) -> Any:
        """Cancel a queued or running job (its quota is refunded). 409 if it already finished."""
        job = await own_job(key, job_id)
        if job.status.is_final:
            raise HttpError(409, InvalidCommand.code, f"Job {job.id} already {job.status.value}; there is "
                            "nothing to cancel")
        return job_out(shown(await core.service.cancel(key.requester(), job.id)), base_url(core, request))

    async def follow_up(request: Request, key: Key, job_id: str, make: Any, *args: Any) -> Any:
        job = await own_job(key, job_id)
        result = await make(core.service, key.requester(), job.id, *args)
        return {**job_out(shown(result.job), base_url(core, request), result.position), "replayed": False}

    @app.post("/v1/jobs/{job_id}/reroll", tags=["follow-ups"], status_code=202, response_model=SubmitOut,
              responses=ERRORS)
    async def reroll_job(request: Request, key: Key, job_id: str) -> Any:
        """The same job again with a new seed."""
        return await follow_up(request, key, job_id, reroll)

    @app.post("/v1/jobs/{job_id}/variations", tags=["follow-ups"], status_code=202, response_model=SubmitOut,
              responses=ERRORS)
    async def variations_of(request: Request, key: Key, job_id: str, body: IndexRequest) -> Any:
        """New images close to image `index` of the job (img2img)."""
        return await follow_up(request, key, job_id, variation, body.index)

    @app.post("/v1/jobs/{job_id}/upscale", tags=["follow-ups"], status_code=202, response_model=SubmitOut,
              responses=ERRORS)
    async def upscale_image(request: Request, key: Key, job_id: str, body: IndexRequest) -> Any:
        """Image `index` of the job at twice the size (within the limits)."""
        return await follow_up(request, key, job_id, upscale, body.index)

    # -- the rest -------------------------------------------------------------------------------------

    @app.get("/v1/images/{sha256}", tags=["images"], response_class=FileResponse,
             responses={403: {"model": ErrorOut}, 404: {"model": ErrorOut}})
    async def get_image(sha256: str, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                            Depends(_bearer)]) -> FileResponse:
        """A PNG by the SHA-256 in its link. The link is the permission: it needs no key, so it can be
        shown in a browser or chat. An image the image check withheld is served only to a moderator's key."""
        path = core.store.path_of(sha256)
        if not path.is_file():
            raise NotFound(f"No image {sha256}")
        if await core.service.image_withheld(sha256):
            key = await keys.authenticate(credentials.credentials) if credentials else None
            if key is None or not core.service.policy.is_moderator(key.requester()):
                raise Refused("This image was withheld by the image check; only a moderator can open it. "
                              "Its owner can appeal with /appeal JOB_ID <why>")
            return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, no-store"})
        return FileResponse(path, media_type="image/png",
                            headers={"Cache-Control": "public, max-age=31536000, immutable"})

    @app.get("/v1/quota", tags=["account"])
    async def quota(key: Key) -> dict[str, Any]:
        """Cost units (512x512, 20 steps, 1 image = 1 unit) used and left today and this minute, and
        `text`, the same as the chat's /quota answer. A limit of null means none."""
        return quota_out(await core.service.quota(key.requester()))

    @app.get("/v1/models", tags=["account"])
    async def models(key: Key) -> dict[str, Any]:
        return {"default": settings.generation.default_model,
                "models": [{"name": name, "default_width": m.default_width, "default_height": m.default_height}
                           for name, m in settings.models.items()]}

    @app.get("/v1/help", tags=["account"])
    async def help_text(key: Key) -> dict[str, str]:
        """The chat commands, flags and limits, as /help answers them."""
        return {"text": core.parser.help_text()}

    return app


def quota_out(status: QuotaStatus) -> dict[str, Any]:
    def finite(value: float) -> float | None:  # JSON has no infinity: null = no limit
        return None if math.isinf(value) else round(value, 3)

    return {"tier": status.tier, "used": round(status.used, 3), "limit": finite(status.limit),
            "remaining": finite(status.remaining), "reserved": round(status.reserved, 3),
            "resets_at": status.resets_at.isoformat(),
            "minute": {"used": round(status.minute_used, 3), "limit": finite(status.minute_limit)},
            "images": {"used": status.images_used, "limit": status.images_limit or None},
            "text": describe_quota(status)}


def prometheus_text(m: Any) -> str:
    lines = [
        "# HELP easel_queue_length Jobs waiting for a worker.", "# TYPE easel_queue_length gauge",
        f"easel_queue_length {m.queue_length}",
        "# HELP easel_jobs Jobs by status.", "# TYPE easel_jobs gauge",
        *(f'easel_jobs{{status="{status}"}} {count}' for status, count in m.jobs_by_status.items()),
        "# HELP easel_generation_seconds Start to finish of succeeded jobs.",
        "# TYPE easel_generation_seconds summary",
        f"easel_generation_seconds_sum {m.generation_seconds_sum:.6f}",
        f"easel_generation_seconds_count {m.generation_seconds_count}",
        f"# HELP easel_images_per_second Images made per second over the last {m.window_s:g} s.",
        "# TYPE easel_images_per_second gauge", f"easel_images_per_second {m.images_per_second:.6f}",
        f"# HELP easel_worker_busy_ratio Share of the last {m.window_s:g} s some batch was running.",
        "# TYPE easel_worker_busy_ratio gauge", f"easel_worker_busy_ratio {m.worker_busy_ratio:.6f}",
    ]
    return "\n".join(lines) + "\n"


# -- the adapter ----------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        # `easel serve` owns SIGINT/SIGTERM (finish the batch, then stop); we stop through `stop`.
        yield


class HttpAdapter:
    """Serves the API and the web chat on settings.http.host:port until `stop` is set."""

    platform = PLATFORM

    def __init__(self, core: Core) -> None:
        self.core = core
        self.port: int | None = None  # the bound port, known once `started` is set (port 0 = any free one)
        self.started = asyncio.Event()

    def _bind(self) -> socket.socket:
        config = self.core.settings.http
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.host, config.port))
        except OSError as error:
            sock.close()
            raise EaselError(f"cannot listen on {config.host}:{config.port} ({error.strerror}); set another "
                             "port with http.port or EASEL_HTTP__PORT") from None
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def run(self, stop: asyncio.Event) -> None:
        sock = self._bind()
        self.port = sock.getsockname()[1]
        server = _Server(uvicorn.Config(build_app(self.core), log_level="warning", access_log=False,
                                        lifespan="off", timeout_graceful_shutdown=3))
        webhooks = WebhookSender(self.core, lambda delivery: job_out(delivery, base_url(self.core)))
        host = self.core.settings.http.host
        print(f"Web chat and API: http://{host}:{self.port}/  (OpenAPI: /openapi.json)", flush=True)
        try:
            async with asyncio.TaskGroup() as group:
                serving = group.create_task(server.serve(sockets=[sock]), name="easel-http-server")
                group.create_task(deliver_events(self.core.service, self.core.deliveries, PLATFORM, webhooks.on_event,
                                                 stop, concurrency=self.core.settings.delivery.concurrency),
                                  name="easel-http-webhooks")
                while not server.started and not serving.done():
                    await asyncio.sleep(0.01)
                self.started.set()
                await stop.wait()
                server.should_exit = True
        finally:
            await webhooks.close()
            sock.close()
