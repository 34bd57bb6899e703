"""Jobs made from a finished job: re-roll, variations, upscale, zoom out and pan, as chat buttons offer them.

Each one builds a new `GenerateCommand` from the stored job (its parameters, its stored input
images, or one of its result images) and submits it through the job service like any command, so
quota, queue caps and safety apply to the person who pressed the button, who owns the new job.

Example:
    result = await reroll(core.service, requester, "k7mq2x9a")            # same settings, new seed
    result = await variation(core.service, requester, "k7mq2x9a", index=0)  # img2img from image 1
    result = await upscale(core.service, requester, "k7mq2x9a", index=0)    # twice the size
    result = await reframe(core.service, requester, "k7mq2x9a", 0, "zoom2")  # /outpaint --zoom 2 of image 1
"""

from __future__ import annotations

import math
from dataclasses import replace

from bot.domain import GenerateCommand, GenerationParams, InputImages, JobKind, JobStatus, OutpaintMargins, Requester
from bot.errors import InvalidCommand, Refused
from bot.grammar import fit_size
from bot.safety import WITHHOLD, flagged_category
from bot.service import JobService, SubmitResult
from bot.views import ImageView, JobView

# How much of the chosen image a variation repaints: enough to differ, little enough to stay close.
VARIATION_STRENGTH = 0.6
# Upscale: each side grows this much (within [limits]). Without an [upscale] model, a light img2img
# pass at UPSCALE_STRENGTH adds detail at the new size without changing the picture.
UPSCALE_FACTOR = 2
UPSCALE_STRENGTH = 0.35
# Zoom out and pan: /outpaint of one image, as the buttons under a single-image result name them. A zoom
# grows the canvas that much each way; a pan adds PAN_SHARE of the picture's side in that direction.
REFRAMES: dict[str, str] = {"zoom15": "Zoom out 1.5x", "zoom2": "Zoom out 2x", "left": "Pan left", "up": "Pan up",
                            "right": "Pan right", "down": "Pan down"}
ZOOM_FACTORS = {"zoom15": 1.5, "zoom2": 2.0}
PAN_SHARE = 0.5


async def reroll(service: JobService, requester: Requester, job_id: str, *,
                 idempotency_key: str | None = None) -> SubmitResult:
    """The same command again with a new seed (and the same attached images, for /edit and /inpaint)."""
    job = await service.get_job(job_id)
    inputs = InputImages(
        image=service.store.read_bytes(job.init_image_sha) if job.init_image_sha else None,
        mask=service.store.read_bytes(job.mask_image_sha) if job.mask_image_sha else None,
    )
    return await service.submit(requester, GenerateCommand(replace(job.params, seed=None)), inputs,
                                **_once(idempotency_key))


async def variation(service: JobService, requester: Requester, job_id: str, index: int, *,
                    idempotency_key: str | None = None) -> SubmitResult:
    """As many new images as the job made, each an img2img pass over its image `index` (0-based)."""
    job = await service.get_job(job_id)
    image = _result_image(job, index)
    strength = _within_limits(service, VARIATION_STRENGTH)
    params = _edit_of(job.params, image, strength=strength, n=job.params.n, seed=None)
    return await service.submit(requester, GenerateCommand(params),
                                InputImages(image=service.store.read_bytes(image.sha256)),
                                **_once(idempotency_key))


async def upscale(service: JobService, requester: Requester, job_id: str, index: int, *,
                  idempotency_key: str | None = None) -> SubmitResult:
    """Image `index` (0-based) at UPSCALE_FACTOR times its size, as far as the limits allow."""
    job = await service.get_job(job_id)
    image = _result_image(job, index)
    limits = service.settings.limits
    area = image.width * image.height * UPSCALE_FACTOR**2
    width, height = fit_size(image.width, image.height, area, limits)
    if width * height <= image.width * image.height:
        raise InvalidCommand(f"image {index + 1} of job {job.id} is {image.width}x{image.height}, already "
                             f"the largest size allowed here (limits.max_side {limits.max_side}, "
                             f"limits.max_pixels {limits.max_pixels})")
    # The image's own seed keeps the added detail consistent with the picture it came from.
    upscaler = service.settings.upscale
    if upscaler.model:
        # The upscale model enlarges the picture as stored (the worker sees its size), then an img2img
        # pass at `denoise`, if any (generation/upscale.py).
        strength = _within_limits(service, upscaler.denoise) if upscaler.denoise else None
        params = _edit_of(job.params, image, strength=strength, n=1, seed=image.seed, kind=JobKind.UPSCALE)
    else:
        params = _edit_of(job.params, image, strength=_within_limits(service, UPSCALE_STRENGTH), n=1,
                          seed=image.seed)
    params = replace(params, width=width, height=height)
    return await service.submit(requester, GenerateCommand(params),
                                InputImages(image=service.store.read_bytes(image.sha256)),
                                **_once(idempotency_key))


async def reframe(service: JobService, requester: Requester, job_id: str, index: int, action: str, *,
                  idempotency_key: str | None = None) -> SubmitResult:
    """Image `index` (0-based) zoomed out or panned (`action`, a key of REFRAMES): an /outpaint of it with
    its job's prompt and settings, a new seed, and /outpaint's default strength."""
    if action not in REFRAMES:
        raise ValueError(f"`action` must be one of {', '.join(REFRAMES)}, not {action!r}")
    job = await service.get_job(job_id)
    image = _result_image(job, index)
    limits = service.settings.limits
    if action in ZOOM_FACTORS:
        margins = OutpaintMargins(zoom=ZOOM_FACTORS[action])
    else:
        margins = _pan_margins(job, image, index, action, service)
    params = _edit_of(job.params, image, strength=_within_limits(service, limits.default_outpaint_strength), n=1,
                      seed=None, kind=JobKind.OUTPAINT)
    return await service.submit(requester, GenerateCommand(params, outpaint=margins),
                                InputImages(image=service.store.read_bytes(image.sha256)),
                                **_once(idempotency_key))


def _pan_margins(job: JobView, image: ImageView, index: int, direction: str, service: JobService) -> OutpaintMargins:
    """PAN_SHARE of the picture's side in `direction`, in multiples of 8, less where the limits leave less."""
    limits = service.settings.limits
    across = direction in ("left", "right")
    side, other = (image.width, image.height) if across else (image.height, image.width)
    room = min(limits.max_side, limits.max_pixels // other) - side  # what the size limits leave that way
    pixels = min(int(side * PAN_SHARE), room) // 8 * 8
    if pixels < 8:
        raise InvalidCommand(f"image {index + 1} of job {job.id} is {image.width}x{image.height}, as "
                             f"{'wide' if across else 'tall'} as the size limits allow here (limits.max_side "
                             f"{limits.max_side}, limits.max_pixels {limits.max_pixels}); pan another way or "
                             "zoom out")
    return OutpaintMargins(**{direction: pixels})


def _once(idempotency_key: str | None) -> dict[str, str]:
    """submit() options that make a repeat of the same button press (a platform delivering it twice)
    return the first job instead of queuing another."""
    if idempotency_key is None:
        return {}
    return {"idempotency_key": idempotency_key, "fingerprint": "followup"}


def _result_image(job: JobView, index: int) -> ImageView:
    if job.status is not JobStatus.SUCCEEDED:
        raise InvalidCommand(f"job {job.id} is {job.status.value}; variations and upscales need a "
                             "finished job with images")
    if not 0 <= index < len(job.images):
        raise InvalidCommand(f"job {job.id} has {len(job.images)} image(s); there is no image {index + 1}")
    image = job.images[index]
    category = flagged_category(image.safety_flags, WITHHOLD)
    if category is not None:
        # A follow-up would show (a copy of) a picture that may not be shown: every kind is refused.
        raise Refused(f"image {index + 1} of job {job.id} was withheld (the image check flagged it as "
                      f"{category}), so nothing can be made from it. If this is a mistake: /appeal {job.id} <why>")
    return image


def _edit_of(params: GenerationParams, image: ImageView, *, strength: float | None, n: int,
             seed: int | None, kind: JobKind = JobKind.EDIT) -> GenerationParams:
    # img2img runs steps × strength denoising steps; a short /imagine must still give at least one.
    steps = max(params.steps, math.ceil(1 / strength)) if strength else params.steps
    return replace(params, kind=kind, width=image.width, height=image.height, n=n, seed=seed,
                   strength=strength, steps=steps)


def _within_limits(service: JobService, strength: float) -> float:
    limits = service.settings.limits
    return min(max(strength, limits.min_strength), limits.max_strength)
