"""POST /v1/trainings: teach the model a new word from pictures (bot/teach.py), as multipart form data.

    curl -H "Authorization: Bearer $KEY" -F name=mascot -F steps=300 \
         -F picture=@1.png -F caption="mascot waving" -F picture=@2.png -F caption="mascot asleep" ... \
         http://localhost:8000/v1/trainings

Each `picture` file may be followed by a `caption` field: its caption (the pictures and captions pair up
in order; a picture without one gets `shared_caption`, else the trigger word). The training is a job:
GET /v1/jobs/{id} and its event stream show it, with `loss`, `eta_s` and `sample` in its progress
events, and its two pictures (without and with the word) when it is done.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import Field
from starlette.datastructures import UploadFile

from adapters.api.deps import CoreDep, Key
from adapters.api.errors import HttpError
from adapters.api.parse import read_upload
from adapters.api.render import base_url, job_out
from adapters.api.schemas import SubmitOut, errors
from bot.domain import TEACH_KINDS, TeachCommand, TrainingPicture
from bot.errors import InvalidCommand, InvalidImage

router = APIRouter()


class TrainingOut(SubmitOut):
    cost_units: float = Field(description="the quota units reserved for all its steps (bot/policy.py)")


FIELDS = ("command", "name", "kind", "steps", "rank", "trigger", "model", "shared_caption")
PICTURE_TYPES = "image/png, image/jpeg, image/webp, image/gif, image/bmp"
TRAINING_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "encoding": {"picture": {"contentType": PICTURE_TYPES}},
    "schema": {
        "type": "object", "required": ["picture"], "additionalProperties": False,
        # the separate fields with `name`, or the chat's command alone
        "oneOf": [{"required": ["name"], "not": {"required": ["command"]}},
                  {"required": ["command"], "not": {"required": ["name"]}}],
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$",
                     "description": "what to call it: <lora:NAME>, and the trigger word unless `trigger`"},
            "command": {"type": "string", "description": "instead of the other fields: the chat's "
                        "`/teach NAME [--steps N] [--rank R] [--trigger WORD] [shared caption]` (the web chat)"},
            "picture": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 3,
                        "maxItems": 30, "description": "the pictures, teach.min_pictures to teach.max_pictures"},
            "caption": {"type": "array", "items": {"type": "string"},
                        "description": "each picture's caption, each part right after its picture"},
            "shared_caption": {"type": "string", "description": "the caption of pictures without their own"},
            "kind": {"type": "string", "enum": list(TEACH_KINDS)},
            "steps": {"type": "integer", "description": "teach.min_steps to teach.max_steps"},
            "rank": {"type": "integer", "description": "teach.min_rank to teach.max_rank"},
            "trigger": {"type": "string", "description": "the word that calls it (default: the name)"},
            "model": {"type": "string", "description": "the model to train it for (default: the default model)"},
        }}}}}}


@router.post("/v1/trainings", tags=["jobs"], status_code=202, response_model=TrainingOut, openapi_extra=TRAINING_FORM,
             responses=errors(400, 401, 403, 409, 411, 413, 415, 422, 429))
async def submit_training(request: Request, core: CoreDep, key: Key, response: Response) -> Any:
    """Queue a training; answers 202 with its job (GET /v1/jobs/{id} follows it) and queue position."""
    teach, max_upload = core.settings.teach, core.settings.limits.max_upload_bytes
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise HttpError(411, InvalidCommand.code, "send a Content-Length header with the request body")
    cap = teach.max_pictures * max_upload + 256 * 1024
    if int(length) > cap:
        raise HttpError(413, InvalidImage.code, f"the request is {int(length)} bytes; the limit is {cap} "
                        "(teach.max_pictures pictures of limits.max_upload_bytes)")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HttpError(415, InvalidCommand.code, "send the training as multipart/form-data: `name`, then each "
                        "`picture` file, each followed by its `caption` if it has one")
    form = await request.form(max_files=teach.max_pictures + 1, max_fields=2 * teach.max_pictures + len(FIELDS))
    fields: dict[str, str] = {}
    pictures: list[TrainingPicture] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != "picture":
                raise InvalidCommand(f"unexpected file field `{name}`; the pictures are `picture` fields")
            data = await read_upload(value, "picture", max_upload)
            pictures.append(TrainingPicture(data, "", value.filename or ""))
        elif name == "caption":
            if not pictures or pictures[-1].caption:
                raise InvalidCommand("each `caption` follows the `picture` it describes (one caption a picture)")
            pictures[-1] = TrainingPicture(pictures[-1].data, value, pictures[-1].filename)
        elif name in FIELDS:
            fields[name] = value
        else:
            raise InvalidCommand(f"unexpected field `{name[:40]}`; the fields are {', '.join(FIELDS)}, picture "
                                 "and caption")
    if "command" in fields:
        if set(fields) != {"command"}:
            raise InvalidCommand("send either `command` (/teach NAME ...) or the separate fields, not both")
        command = core.parser.parse(fields["command"])
        if not isinstance(command, TeachCommand):
            raise InvalidCommand("POST /v1/trainings takes /teach NAME ...; the other commands go to /v1/jobs")
    elif "name" not in fields:
        raise InvalidCommand("`name` is missing: what to call the new word, e.g. name=mascot")
    else:
        command = TeachCommand(name=fields["name"], kind=fields.get("kind", "lora"), steps=_whole(fields, "steps"),
                               rank=_whole(fields, "rank"), trigger=fields.get("trigger"),
                               model=fields.get("model"), caption=fields.get("shared_caption", ""))
    result = await core.teach.submit(key.requester(), command, pictures)
    base = base_url(core, request)
    response.headers["Location"] = f"{base}/v1/jobs/{result.job.id}"
    return {**job_out(core.deliveries.of_job(result.job), base, result.position), "replayed": False, "others": [],
            "cost_units": result.cost}


def _whole(fields: dict[str, str], name: str) -> int | None:
    if name not in fields:
        return None
    if not fields[name].isdecimal() or len(fields[name]) > 9:
        raise InvalidCommand(f"`{name}` takes a whole number (got {fields[name][:20]!r})")
    return int(fields[name])
