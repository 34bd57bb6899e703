"""Translating between the AUTOMATIC1111 API and Easel: A1111's fields become a GenerateCommand checked by
the one grammar; a job's Delivery becomes A1111's answer (`images`, `parameters`, `info`); a PNG's
`parameters` chunk becomes png-info's answer. Nothing here reads a job's images or safety flags itself:
`delivery.images` are the pictures that may be returned.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from adapters.api.a1111_schemas import GenerationRequest, Img2ImgRequest
from adapters.api.parse import decode_image
from bot.config import LimitsConfig
from bot.delivery import Delivery
from bot.domain import SAMPLERS, GenerateCommand, InputImages, JobKind, JobStatus
from bot.errors import InvalidCommand, InvalidImage
from bot.grammar import CommandParser
from bot.images import load_upload, to_png_bytes
from bot.store import A1111_SAMPLER_NAMES, PARAMETERS_KEY, a1111_parameters, parse_a1111_parameters
from bot.views import JobView

# A1111's own aliases of its sampler names (modules/sd_samplers_kdiffusion.py), besides Easel's names.
_A1111_ALIASES: dict[str, tuple[str, ...]] = {
    "euler": ("k_euler",), "euler_a": ("k_euler_a", "k_euler_ancestral"), "lms": ("k_lms",),
    "heun": ("k_heun",), "dpmpp_2m": ("k_dpmpp_2m",), "dpmpp_2m_karras": ("k_dpmpp_2m_ka",),
    "ddim": (), "pndm": (), "unipc": (),
}
# Any name a client may send (lower-cased) -> Easel's sampler.
_SAMPLER_OF: dict[str, str] = {
    alias.lower(): sampler for sampler in SAMPLERS
    for alias in (sampler, A1111_SAMPLER_NAMES[sampler], *_A1111_ALIASES[sampler])
}
# A1111 (1.9 on) names the noise schedule apart from the sampler. Easel's samplers run their own
# schedule ("automatic"), and DPM++ 2M also runs on Karras sigmas (Easel's dpmpp_2m_karras).
SCHEDULERS: dict[str, str] = {"automatic": "Automatic", "karras": "Karras"}
_KARRAS_OF = {"dpmpp_2m": "dpmpp_2m_karras", "dpmpp_2m_karras": "dpmpp_2m_karras"}

# The grammar names the chat's flags; an A1111 client knows the JSON fields.
_FIELD_OF_FLAG = {"seed": "seed", "steps": "steps", "cfg": "cfg_scale", "n": "batch_size × n_iter",
                  "model": "sd_model_checkpoint", "strength": "denoising_strength", "sampler": "sampler_name",
                  "no": "negative_prompt"}
_REWORDED = (("--size sides", "width and height"), ("; use a smaller size or --ar", "; use a smaller width and height"),
             ("--size", "width × height"), ("the negative prompt (--no and (-...) groups)", "negative_prompt"))
_FLAG_WORD = re.compile(r"--([a-z]+)")


def in_a1111_words(error: InvalidCommand) -> InvalidCommand:
    """The grammar's message with the A1111 field names instead of the chat's flags (--cfg -> cfg_scale)."""
    message = error.message
    for chat, field in _REWORDED:
        message = message.replace(chat, field)
    return InvalidCommand(_FLAG_WORD.sub(lambda m: _FIELD_OF_FLAG.get(m[1], m[0]), message))


# -- requests -----------------------------------------------------------------------------------------


def model_named(parser: CommandParser, name: str) -> str:
    """Easel's model for an `sd_model_checkpoint` value (the titles GET /sdapi/v1/sd-models lists)."""
    found = parser.catalog.get(name)
    if found is None or not found.usable:
        usable = [model.name for model in parser.catalog.list() if model.usable]
        raise InvalidCommand(f"sd_model_checkpoint {name!r} is not one of Easel's models: "
                             f"{', '.join(usable)} (GET /sdapi/v1/sd-models)")
    return found.name


def sampler_of(name: str | None, scheduler: str | None, default: str) -> str:
    """Easel's sampler for A1111's `sampler_name` (or Easel's own name) and `scheduler`."""
    sampler = default if not name else _SAMPLER_OF.get(name.lower())
    if sampler is None:
        raise InvalidCommand(f"sampler_name {name!r} is not one of Easel's samplers: "
                             f"{', '.join(A1111_SAMPLER_NAMES[s] for s in SAMPLERS)} (or {', '.join(SAMPLERS)})")
    schedule = (scheduler or "automatic").lower()
    if schedule == "automatic":
        return sampler
    if schedule == "karras" and sampler in _KARRAS_OF:
        return _KARRAS_OF[sampler]
    if schedule == "karras":
        raise InvalidCommand(f"scheduler 'karras' goes with DPM++ 2M only (got sampler_name "
                             f"{A1111_SAMPLER_NAMES[sampler]!r}); use scheduler 'automatic'")
    raise InvalidCommand(f"scheduler {scheduler!r} is not one of Easel's: automatic, karras (with DPM++ 2M)")


def command_of(parser: CommandParser, body: GenerationRequest, kind: JobKind, model: str | None) -> GenerateCommand:
    """The job an A1111 request asks for, checked by the grammar against the configured limits.
    `model` is the request's (override_settings) or the key's remembered sd_model_checkpoint."""
    # 1. The prompt: A1111 draws from an empty one; Easel asks for a description.
    prompt = body.prompt.strip()
    if not prompt:
        raise InvalidCommand('prompt is empty; describe the picture, e.g. "a lighthouse at dusk"')
    # 2. How many images: A1111 runs n_iter batches of batch_size; Easel runs them as one job.
    batch_size, n_iter = body.batch_size or 1, body.n_iter or 1
    images = batch_size * n_iter
    if batch_size < 1 or n_iter < 1 or images > parser.limits.max_n:
        raise InvalidCommand(f"batch_size × n_iter is {batch_size} × {n_iter} = {images} images; a request "
                             f"makes 1 to {parser.limits.max_n} (limits.max_n)")
    # 3. The other fields as the chat's flags, so every limit is checked and named in one place.
    model = model_named(parser, model) if model else parser.default_model
    flags = {"n": str(images), "model": model,
             "sampler": sampler_of(body.sampler_name or body.sampler_index, body.scheduler, parser.default_sampler)}
    if body.seed is not None and body.seed != -1:  # -1: a random seed, as A1111
        flags["seed"] = str(body.seed)
    if body.steps is not None:
        flags["steps"] = str(body.steps)
    if body.cfg_scale is not None:
        flags["cfg"] = str(body.cfg_scale)
    if body.width is not None or body.height is not None:
        default = parser.catalog.get(model) or parser.catalog.default
        flags["size"] = f"{body.width or default.width}x{body.height or default.height}"
    if isinstance(body, Img2ImgRequest) and body.denoising_strength is not None:
        flags["strength"] = str(body.denoising_strength)
    try:
        return parser.generation(kind, prompt, (body.negative_prompt or "").strip(), flags)
    except InvalidCommand as error:
        raise in_a1111_words(error) from None


def img2img_inputs(body: Img2ImgRequest, limits: LimitsConfig) -> InputImages:
    """The init image and the mask (white = repaint; `inpainting_mask_invert` = 1 turns it round)."""
    image = _image_data(body.init_images[0], "init_images[0]", limits)
    mask = _image_data(body.mask, "mask", limits) if body.mask else None
    if mask is not None and body.inpainting_mask_invert:
        mask = to_png_bytes(ImageOps.invert(load_upload(mask, limits, "mask").convert("L")))
    return InputImages(image=image, mask=mask)


def _image_data(value: str, what: str, limits: LimitsConfig) -> bytes:
    if value.startswith(("http://", "https://")):
        raise InvalidImage(f"`{what}` is a link; Easel's A1111 API takes the image itself, base64-encoded")
    data = decode_image(value, what, limits.max_upload_bytes)
    assert data is not None  # decode_image returns None only for None
    return data


def echoed(body: GenerationRequest) -> dict[str, Any]:
    """`parameters` of the answer: the request's fields, as A1111 echoes them (the images only when
    `include_init_images` asks)."""
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)
    return parameters


# -- answers ------------------------------------------------------------------------------------------


def images_b64(delivery: Delivery, read_png: Callable[[str], bytes]) -> list[str]:
    """The images that may be shown, base64 PNGs (with their `parameters` chunk). A1111 clients show no
    spoilers, so a spoilered image is not sent (it cannot arise: these requesters never allow NSFW)."""
    return [base64.b64encode(read_png(image.sha256)).decode() for image in delivery.images if not image.spoiler]


def info_of(delivery: Delivery) -> str:
    """`info`: a JSON string in the shape of A1111's `Processed.js()`, its `infotexts` one per returned
    image (the text of each PNG's `parameters` chunk), with Easel's `job_id` and `withheld` notices."""
    job, p = delivery.job, delivery.job.params
    shown = [image for image in delivery.images if not image.spoiler]
    return json.dumps({
        "prompt": p.prompt, "all_prompts": [p.prompt] * p.n,
        "negative_prompt": p.negative, "all_negative_prompts": [p.negative] * p.n,
        "seed": job.seeds[0], "all_seeds": job.seeds, "subseed": -1, "all_subseeds": [-1] * p.n,
        "subseed_strength": 0, "width": p.width, "height": p.height,
        "sampler_name": A1111_SAMPLER_NAMES.get(p.sampler, p.sampler), "cfg_scale": p.cfg, "steps": p.steps,
        "batch_size": p.n, "restore_faces": False, "face_restoration_model": None, "sd_model_name": p.model,
        "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": p.strength, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": [a1111_parameters(p, image.seed) for image in shown],
        "styles": [], "job_timestamp": job.created_at.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "easel",
        "job_id": job.id, "withheld": [notice.message for notice in delivery.withheld],
    })


def samplers_out() -> list[dict[str, Any]]:
    return [{"name": A1111_SAMPLER_NAMES[sampler], "aliases": [sampler, *_A1111_ALIASES[sampler]], "options": {}}
            for sampler in SAMPLERS]


def schedulers_out() -> list[dict[str, Any]]:
    return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1.0,
             "need_inner_model": False} for name, label in SCHEDULERS.items()]


def png_info(data: bytes) -> dict[str, Any]:
    """png-info's answer: the `parameters` text, the other text chunks, and the text taken apart. Only
    the file's header and text chunks are read (Easel and A1111 write them before the pixels), never a
    pixel, so a huge picture costs nothing."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            chunks = {key: value for key, value in image.info.items() if isinstance(value, str)}
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InvalidImage("`image` is not a picture Easel can read; send a base64 PNG") from None
    text = chunks.pop(PARAMETERS_KEY, "")
    return {"info": text, "items": chunks, "parameters": parse_a1111_parameters(text) if text else {}}


def progress_out(job: JobView | None, unfinished: int, preview: str | None, now: datetime) -> dict[str, Any]:
    """/progress for one key: its current `job` (running, else next to run; None when idle), how many of
    its jobs are `unfinished`, and the live `preview` the delivery rules allow here (a data: URL)."""
    step, total = (job.progress_step, job.progress_total) if job is not None else (0, 0)
    progress = step / total if total else 0.0
    elapsed = (now - job.started_at).total_seconds() if job is not None and job.started_at else 0.0
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": job.id if job else "",
             "job_count": unfinished, "job_timestamp": job.created_at.strftime("%Y%m%d%H%M%S") if job else "0",
             "job_no": 0, "sampling_step": step, "sampling_steps": total}
    if job is None:
        textinfo = None
    elif job.status is JobStatus.QUEUED:
        textinfo = f"Job {job.id} is waiting in the queue"
    else:
        textinfo = f"Job {job.id}: step {step} of {total or job.params.steps}"
    return {"progress": progress, "eta_relative": elapsed / progress - elapsed if progress else 0.0,
            "state": state, "current_image": preview.partition(",")[2] if preview else None,
            "textinfo": textinfo}
