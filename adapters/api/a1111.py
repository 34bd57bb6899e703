"""The AUTOMATIC1111 API under /sdapi/v1, for the clients that speak it: SillyTavern, Open WebUI's A1111
engine, LibreChat's stable-diffusion tool, `webuiapi` scripts.

    POST /sdapi/v1/txt2img, /img2img     a job through the same queue, quota and safety checks as every
                                          other surface, answered once it is done: images, parameters, info
    GET|POST /sdapi/v1/options            sd_model_checkpoint, remembered per key
    GET  /sdapi/v1/progress               this key's current job, with a live preview where allowed
    POST /sdapi/v1/interrupt, /skip       cancel this key's current job
    POST /sdapi/v1/png-info               the `parameters` chunk of a PNG, taken apart
    GET  /sdapi/v1/sd-models, samplers, schedulers, upscalers, latent-upscale-modes, sd-vae, loras,
         prompt-styles, scripts, extensions

Every route takes an Easel API key as the HTTP Basic password (any user name; that is what these
clients send) or as a Bearer token. With `http.a1111_anonymous_tier` set, a request without a key is
served too, as one user on that quota tier. Errors have A1111's shape (`{"error", "detail", "body",
"errors"}`) and Easel's status codes and messages.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, ValidationError

from adapters.api.a1111_schemas import (
    ERRORS,
    GENERATION_ERRORS,
    GenerationOut,
    GenerationRequest,
    Img2ImgRequest,
    PngInfoOut,
    PngInfoRequest,
    ProgressOut,
    Txt2ImgRequest,
)
from adapters.api.a1111_translate import (
    command_of,
    echoed,
    images_b64,
    img2img_inputs,
    info_of,
    model_named,
    png_info,
    progress_out,
    samplers_out,
    schedulers_out,
)
from adapters.api.deps import CoreDep
from adapters.api.errors import HttpError, describe_errors, register_dialect
from adapters.api.parse import check_body_length, decode_image
from bot.apikeys import PLATFORM, TOKEN_PREFIX
from bot.bootstrap import Core
from bot.domain import GenerateCommand, InputImages, JobKind, JobStatus, Requester
from bot.errors import InvalidCommand, Unauthorized
from bot.events import EventKind
from bot.followups import UPSCALE_FACTOR
from bot.views import JobView

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

ANONYMOUS_USER_ID = "a1111-anonymous"  # the one user every keyless request counts as (its quota, its jobs)


def a1111_error_body(_status: int, code: str, message: str) -> dict[str, Any]:
    """A1111 answers errors as `{"error": type, "detail": message, "body": ..., "errors": ...}`."""
    return {"error": code, "detail": message, "body": "", "errors": message}


register_dialect("/sdapi/", a1111_error_body)


# -- who is asking -------------------------------------------------------------------------------------


def api_key_in(authorization: str | None) -> str | None:
    """The Easel API key in an Authorization header: the HTTP Basic password (any user name), or a
    Bearer token. Empty Basic credentials, which Open WebUI and SillyTavern send when their auth field is
    blank, are no key; a key typed as the Basic user name with no password is taken too."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    if not scheme:
        return None
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() != "basic":
        raise Unauthorized(f"the Authorization header uses {scheme!r}; send the Easel API key as the "
                           "HTTP Basic password (any user name) or as `Bearer esk_...`")
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Unauthorized("the Authorization header's Basic credentials are not base64 of "
                           "`user:password`; use any user name and an Easel API key as the password") from None
    return password or (user if user.startswith(TOKEN_PREFIX) else None)


async def a1111_requester(request: Request, core: CoreDep) -> Requester:
    """The key's user, or (only with http.a1111_anonymous_tier set) the one anonymous LAN user."""
    token = api_key_in(request.headers.get("authorization"))
    if token is not None:
        return (await core.apikeys.authenticate(token)).requester()
    tier = core.settings.http.a1111_anonymous_tier
    if not tier:
        raise Unauthorized("Send an Easel API key as the HTTP Basic password (any user name, e.g. "
                           "`easel:esk_...` in your client's auth field) or as `Authorization: Bearer "
                           "esk_...`; create one with `easel apikey create --name NAME`")
    return Requester(platform=PLATFORM, user_id=ANONYMOUS_USER_ID, display_name="A1111 API (anonymous)",
                     quota_tier=tier)


Asker = Annotated[Requester, Depends(a1111_requester)]


def remembered_models(request: Request) -> dict[str, str]:
    """sd_model_checkpoint as each user last POSTed it to /options. A shared server cannot have one
    current model, as A1111 does: each key has its own. Kept in this server's memory: after a restart a
    key is back on generation.default_model, which GET /options then says."""
    state = request.app.state
    if not hasattr(state, "a1111_models"):
        state.a1111_models = {}
    return state.a1111_models


RememberedModels = Annotated[dict[str, str], Depends(remembered_models)]


# -- generating ----------------------------------------------------------------------------------------

RequestBody = TypeVar("RequestBody", bound=BaseModel)


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its body itself (capped before it is read)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


async def read_body(request: Request, model: type[RequestBody], max_upload: int) -> RequestBody:
    """The JSON body, refused before it is read when it is over the size cap (two images' worth)."""
    check_body_length(request, max_upload)
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as error:
        raise HttpError(422, InvalidCommand.code, describe_errors(error.errors())) from None


def requested_model(body: GenerationRequest, requester: Requester, models: dict[str, str]) -> str | None:
    override = (body.override_settings or {}).get("sd_model_checkpoint")
    return str(override) if override else models.get(requester.user_id)


async def generate(core: Core, requester: Requester, command: GenerateCommand, inputs: InputImages,
                   body: GenerationRequest) -> dict[str, Any]:
    """Queue the job and answer once it is final, as A1111 clients wait for: the images that may be
    shown, the request echoed, and `info`. A job still running after http.a1111_wait_s goes on and the
    answer names it; an interrupted one answers with no images, as A1111 answers with what it had."""
    submitted = await core.service.submit(requester, command, inputs)
    job = await core.service.wait_until_final(submitted.job.id, core.settings.http.a1111_wait_s)
    if not job.status.is_final:
        raise HttpError(504, "timeout", f"Job {job.id} is still {job.status.value} after "
                        f"{core.settings.http.a1111_wait_s:g} s (http.a1111_wait_s); it goes on, and GET "
                        f"/v1/jobs/{job.id} with the same key has its images once it is done")
    if job.status is JobStatus.FAILED:
        raise HttpError(500, "job_failed", f"Job {job.id} failed: {job.error}")
    delivery = core.deliveries.of_job(job)
    images = images_b64(delivery, core.store.read_bytes) if body.send_images is not False else []
    return {"images": images, "parameters": echoed(body), "info": info_of(delivery)}


@router.post("/txt2img", response_model=GenerationOut, responses=GENERATION_ERRORS,
             openapi_extra=body_schema(Txt2ImgRequest))
async def txt2img(request: Request, core: CoreDep, requester: Asker, models: RememberedModels) -> Any:
    """Text to image, answered once the job is done. `seed` -1 is random; the same request with a
    fixed seed gives the same PNG bytes again."""
    body = await read_body(request, Txt2ImgRequest, core.settings.limits.max_upload_bytes)
    command = command_of(core.parser, body, JobKind.IMAGINE, requested_model(body, requester, models))
    return await generate(core, requester, command, InputImages(), body)


@router.post("/img2img", response_model=GenerationOut, responses=GENERATION_ERRORS,
             openapi_extra=body_schema(Img2ImgRequest))
async def img2img(request: Request, core: CoreDep, requester: Asker, models: RememberedModels) -> Any:
    """Image to image from `init_images[0]`; with a `mask`, inpainting (white pixels are repainted)."""
    limits = core.settings.limits
    body = await read_body(request, Img2ImgRequest, limits.max_upload_bytes)
    inputs = img2img_inputs(body, limits)
    kind = JobKind.INPAINT if inputs.mask is not None else JobKind.EDIT
    command = command_of(core.parser, body, kind, requested_model(body, requester, models))
    return await generate(core, requester, command, inputs, body)


# -- options and what there is ------------------------------------------------------------------------


@router.get("/options", responses=ERRORS)
async def get_options(core: CoreDep, requester: Asker, models: RememberedModels) -> dict[str, Any]:
    """The settings A1111 clients read; sd_model_checkpoint is this key's model."""
    generation = core.settings.generation
    return {"sd_model_checkpoint": models.get(requester.user_id, generation.default_model),
            "sd_checkpoint_hash": None, "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
            "samples_format": "png", "live_previews_enable": generation.previews,
            "show_progress_every_n_steps": generation.preview_every_steps if generation.previews else -1}


@router.post("/options", responses=ERRORS)
async def set_options(core: CoreDep, requester: Asker, models: RememberedModels,
                      options: Annotated[dict[str, Any], Body()]) -> None:
    """Sets this key's sd_model_checkpoint (a title from /sd-models); the other settings are accepted
    and ignored (Open WebUI posts back every option it read)."""
    name = options.get("sd_model_checkpoint")
    if name is not None:
        models[requester.user_id] = model_named(core.parser, str(name))


@router.get("/sd-models", responses=ERRORS)
async def sd_models(core: CoreDep, requester: Asker) -> list[dict[str, Any]]:
    """Easel's models; the title is what sd_model_checkpoint takes."""
    return [{"title": model.name, "model_name": model.name, "hash": None, "sha256": None,
             "filename": model.file or model.source, "config": None}
            for model in core.catalog.list() if model.usable]


@router.get("/samplers", responses=ERRORS)
async def samplers(requester: Asker) -> list[dict[str, Any]]:
    """Easel's samplers by their A1111 names; Easel's own names are aliases, and accepted too."""
    return samplers_out()


@router.get("/schedulers", responses=ERRORS)
async def schedulers(requester: Asker) -> list[dict[str, Any]]:
    """automatic (each sampler's own schedule) and karras (with DPM++ 2M)."""
    return schedulers_out()


def nothing_to_list(path: str, what: str) -> None:
    """A GET that answers an empty list: Easel has none of these (yet), and A1111 clients list them."""

    async def empty(requester: Asker) -> list[Any]:
        return []

    empty.__doc__ = f"Empty: Easel has no {what}."
    router.add_api_route(path, empty, methods=["GET"], responses=ERRORS, name=path.strip("/"))


@router.get("/upscalers", responses=ERRORS)
async def upscalers(core: CoreDep, requester: Asker) -> list[dict[str, Any]]:
    """The upscale model of [upscale] model, which the Upscale button (POST /v1/jobs/{id}/upscale) runs;
    empty when none is set (the button then runs an img2img pass at twice the size)."""
    model = core.settings.upscale.model
    if not model:
        return []
    path = None if model.startswith("builtin:") else model
    return [{"name": model, "model_name": "SRVGGNetCompact", "model_path": path, "model_url": None,
             "scale": UPSCALE_FACTOR}]


for _path, _what in (("/latent-upscale-modes", "latent upscale modes"), ("/sd-vae", "separate VAEs"),
                     ("/extensions", "extensions")):
    nothing_to_list(_path, _what)


@router.get("/loras", responses=ERRORS)
async def loras(core: CoreDep, requester: Asker) -> list[dict[str, Any]]:
    """The installed LoRAs (storage.lora_dir); `name` is what <lora:NAME:WEIGHT> in a prompt takes."""
    networks = core.parser.networks
    return [{"name": found.name, "alias": found.name, "path": found.path.name,
             "metadata": {"for": networks.family(found), "hash": networks.short_hash(found)}}
            for found in networks.loras().values()]


@router.get("/prompt-styles", responses=ERRORS)
async def prompt_styles(core: CoreDep, requester: Asker) -> list[dict[str, str]]:
    """The styles of storage.styles_file, as A1111 lists its styles.csv."""
    return [{"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative}
            for style in core.parser.styles.styles()]


@router.get("/scripts", responses=ERRORS)
async def scripts(requester: Asker) -> dict[str, list[str]]:
    """Empty: Easel runs no A1111 scripts."""
    return {"txt2img": [], "img2img": []}


# -- progress, interrupt, png-info ---------------------------------------------------------------------


async def current_jobs(core: Core, requester: Requester) -> tuple[JobView | None, int]:
    """The requester's current job (running, else the next of theirs to run) and how many are unfinished."""
    recent = await core.service.list_jobs(50, requester)
    running = [job for job in recent if job.status is JobStatus.RUNNING]
    queued = [job for job in recent if job.status is JobStatus.QUEUED]
    current = running[0] if running else queued[-1] if queued else None
    return current, len(running) + len(queued)


@router.get("/progress", response_model=ProgressOut, responses=ERRORS)
async def progress(core: CoreDep, requester: Asker,
                   skip_current_image: Annotated[bool, Query()] = False) -> Any:
    """This key's current job: progress 0 to 1, eta, state, and the live preview where the delivery
    rules allow one (generation.previews on; never where the image check could withhold the result)."""
    job, unfinished = await current_jobs(core, requester)
    preview = None
    if job is not None and job.status is JobStatus.RUNNING and not skip_current_image:
        event = await core.bus.latest_of(job.id, EventKind.PROGRESS)
        if event is not None:
            delivery = core.deliveries.of_event(event, job)
            # No spoilers here: a preview that may be shown only behind one is not shown at all.
            preview = delivery.preview if not delivery.preview_spoiler else None
    return progress_out(job, unfinished, preview, core.clock())


async def interrupt_current(core: Core, requester: Requester) -> dict[str, Any]:
    """A1111 answers `{}` whether or not there was something to interrupt, and so does Easel."""
    job, _ = await current_jobs(core, requester)
    if job is not None:
        with contextlib.suppress(InvalidCommand):  # it finished in the meantime: nothing to interrupt
            await core.service.cancel(requester, job.id)
    return {}


@router.post("/interrupt", responses=ERRORS)
async def interrupt(core: CoreDep, requester: Asker) -> dict[str, Any]:
    """Cancel this key's current job (its quota is refunded); its txt2img answers with no images."""
    return await interrupt_current(core, requester)


@router.post("/skip", responses=ERRORS)
async def skip(core: CoreDep, requester: Asker) -> dict[str, Any]:
    """As interrupt: Easel makes a request's images in one batch, so there is no next one to skip to."""
    return await interrupt_current(core, requester)


@router.post("/png-info", response_model=PngInfoOut, responses=ERRORS, openapi_extra=body_schema(PngInfoRequest))
async def png_info_of(request: Request, core: CoreDep, requester: Asker) -> Any:
    """The `parameters` text chunk of a PNG (Easel writes it into every image), and its fields."""
    max_upload = core.settings.limits.max_upload_bytes
    body = await read_body(request, PngInfoRequest, max_upload)
    return png_info(decode_image(body.image.strip(), "image", max_upload) or b"")
