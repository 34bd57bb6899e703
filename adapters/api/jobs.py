"""Jobs and their follow-ups: queue, list, read, watch (server-sent events), cancel, reroll, vary, upscale,
reframe (zoom out, pan).

A job's JSON is always built from its Delivery (`core.deliveries`), so the core decides which images a
route may show; a key sees only its own jobs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapters.api.deps import CoreDep, Key
from adapters.api.errors import HttpError
from adapters.api.parse import fingerprint, generation_text, read_job_request
from adapters.api.render import base_url, event_data, job_out, params_out, quota_out
from adapters.api.schemas import (
    DryRunOut,
    IndexRequest,
    JobOut,
    ListQuery,
    ReframeRequest,
    SubmitOut,
    SubmitQuery,
    errors,
    event_stream_item,
)
from adapters.webhooks import check_webhook_target
from bot.apikeys import PLATFORM, ApiKeyView
from bot.bootstrap import Core
from bot.delivery import Delivery
from bot.domain import GenerateCommand, JobStatus
from bot.errors import InvalidCommand, NotFound
from bot.followups import reframe, reroll, upscale, variation
from bot.views import JobView

router = APIRouter()


async def own_job(core: Core, key: ApiKeyView, job_id: str) -> JobView:
    """A key sees only its own jobs; another key's job is as good as absent."""
    job = await core.service.get_job(job_id)
    if (job.platform, job.user_id) != (PLATFORM, key.public_id):
        raise NotFound(f"No job with id {job_id!r} among this key's jobs")
    return job


def shown(core: Core, job: JobView) -> Delivery:
    """What of `job` may be shown to its owner (bot/delivery.py decides)."""
    return core.deliveries.of_job(job)


async def with_position(core: Core, job: JobView) -> int | None:
    return await core.service.position(job.id) if job.status is JobStatus.QUEUED else None


# POST /v1/jobs reads its body itself (JSON or multipart, size-capped first), so the schema is declared
# here; adapters/api/openapi.py adds the two schemas, with this server's limits, to the document.
JOB_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/JobForm"}}}}}
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": DryRunOut, "description": "dry_run=true: the job checked and priced; nothing is queued"},
    202: {"description": "Queued", "headers": {
        "Location": {"description": "the job's URL", "required": True, "schema": {"type": "string"}},
        "Idempotent-Replayed": {"description": "`true` when the Idempotency-Key matched an earlier request",
                                "schema": {"type": "string"}}}},
    **errors(400, 401, 403, 409, 411, 413, 415, 422, 429)}


@router.post("/v1/jobs", tags=["jobs"], status_code=202, response_model=SubmitOut, responses=SUBMIT_RESPONSES,
             openapi_extra=JOB_BODY)
async def submit_job(request: Request, core: CoreDep, key: Key, response: Response,
                     query: Annotated[SubmitQuery, Query()],
                     idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> Any:
    """Queue a job; answers 202 with its id and queue position. Retries with the same
    `Idempotency-Key` get the same job back."""
    settings = core.settings
    body, inputs = await read_job_request(request, settings.limits.max_upload_bytes)
    command = core.parser.parse(generation_text(body))
    if not isinstance(command, GenerateCommand):
        raise InvalidCommand("POST /v1/jobs takes /imagine, /edit, /inpaint or /outpaint; the other commands are GET "
                             "/v1/jobs (/jobs), GET /v1/jobs/{id} (/job), DELETE /v1/jobs/{id} (/cancel), "
                             "GET /v1/quota (/quota), GET /v1/models (/models) and GET /v1/help (/help)")
    if query.dry_run:
        estimate = await core.service.estimate(key.requester(), command, inputs)
        p = estimate.params
        return JSONResponse({"valid": True, "cost_units": estimate.cost, "images": estimate.images,
                             "position": estimate.position, "quota": quota_out(estimate.quota),
                             "params": {"kind": p.kind.value, "prompt": p.prompt, "negative": p.negative,
                                        **params_out(p)}})
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
    others = [job_out(shown(core, other.job), base, other.position) for other in result.others]
    return {**job_out(shown(core, result.job), base, result.position or None), "replayed": result.replayed,
            "others": others}


@router.get("/v1/jobs", tags=["jobs"], response_model=list[JobOut], responses=errors(401, 422))
async def list_jobs(request: Request, core: CoreDep, key: Key,
                    query: Annotated[ListQuery, Query()]) -> Any:
    """This key's jobs, newest first."""
    base = base_url(core, request)
    return [job_out(shown(core, job), base) for job in await core.service.list_jobs(query.limit, key.requester())]


@router.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut, responses=errors(401, 404, 422))
async def get_job(request: Request, core: CoreDep, key: Key, job_id: str) -> Any:
    job = await own_job(core, key, job_id)
    return job_out(shown(core, job), base_url(core, request), await with_position(core, job))


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse, responses={
    200: {"content": {"text/event-stream": {"itemSchema": event_stream_item()}},
          "description": "queued, started, progress, then done, failed or cancelled; the stream ends after "
                         "the final event. Each event's `data` is JSON (its schema by `event`)"},
    **errors(401, 404, 422)})
async def job_events(request: Request, core: CoreDep, key: Key, job_id: str,
                     last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    job = await own_job(core, key, job_id)
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


@router.delete("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut, responses=errors(400, 401, 404, 409, 422))
async def cancel_job(request: Request, core: CoreDep, key: Key, job_id: str) -> Any:
    """Cancel a queued or running job (its quota is refunded). 409 if it already finished."""
    job = await own_job(core, key, job_id)
    if job.status.is_final:
        raise HttpError(409, InvalidCommand.code, f"Job {job.id} already {job.status.value}; there is "
                        "nothing to cancel")
    return job_out(shown(core, await core.service.cancel(key.requester(), job.id)), base_url(core, request))


# -- follow-ups: a new job made from one of the key's jobs ---------------------------------------------


async def follow_up(request: Request, core: Core, key: ApiKeyView, job_id: str, make: Any, *args: Any) -> Any:
    job = await own_job(core, key, job_id)
    result = await make(core.service, key.requester(), job.id, *args)
    return {**job_out(shown(core, result.job), base_url(core, request), result.position), "replayed": False}


@router.post("/v1/jobs/{job_id}/reroll", tags=["follow-ups"], status_code=202, response_model=SubmitOut,
             responses=errors(400, 401, 403, 404, 422, 429))
async def reroll_job(request: Request, core: CoreDep, key: Key, job_id: str) -> Any:
    """The same job again with a new seed."""
    return await follow_up(request, core, key, job_id, reroll)


@router.post("/v1/jobs/{job_id}/variations", tags=["follow-ups"], status_code=202, response_model=SubmitOut,
             responses=errors(400, 401, 403, 404, 422, 429))
async def variations_of(request: Request, core: CoreDep, key: Key, job_id: str, body: IndexRequest) -> Any:
    """New images close to image `index` of the job (img2img)."""
    return await follow_up(request, core, key, job_id, variation, body.index)


@router.post("/v1/jobs/{job_id}/upscale", tags=["follow-ups"], status_code=202, response_model=SubmitOut,
             responses=errors(400, 401, 403, 404, 422, 429))
async def upscale_image(request: Request, core: CoreDep, key: Key, job_id: str, body: IndexRequest) -> Any:
    """Image `index` of the job at twice the size (within the limits)."""
    return await follow_up(request, core, key, job_id, upscale, body.index)


@router.post("/v1/jobs/{job_id}/reframe", tags=["follow-ups"], status_code=202, response_model=SubmitOut,
             responses=errors(400, 401, 403, 404, 422, 429))
async def reframe_image(request: Request, core: CoreDep, key: Key, job_id: str, body: ReframeRequest) -> Any:
    """Image `index` of the job zoomed out or panned: an outpaint of it with the job's prompt and a new seed."""
    return await follow_up(request, core, key, job_id, reframe, body.index, body.action)
