"""What a key may ask about itself and the server: its quota, the models (in the shape of OpenAI's
`models.list` and `models.retrieve`), the chat commands."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from adapters.api.deps import CoreDep, Key
from adapters.api.openai_images import OpenAIErrorOut
from adapters.api.render import quota_out
from adapters.api.schemas import HelpOut, LimitsOut, QuotaOut, errors
from bot.bootstrap import Core
from bot.errors import NotFound

router = APIRouter(tags=["account"])


@router.get("/v1/quota", response_model=QuotaOut, responses=errors(401))
async def quota(core: CoreDep, key: Key) -> dict[str, Any]:
    """Cost units (512x512, 20 steps, 1 image = 1 unit) used and left today and this minute, and
    `text`, the same as the chat's /quota answer. A limit of null means none."""
    return quota_out(await core.service.quota(key.requester()))


class ModelOut(BaseModel):
    id: str = Field(description="the name to give as `model` (or --model)")
    object: Literal["model"]
    created: int = Field(description="0: Easel does not record when a model was configured")
    owned_by: Literal["easel"]
    default: bool = Field(description="the model a job gets without --model (and for OpenAI's model names)")
    default_width: int
    default_height: int


class ModelListOut(BaseModel):
    object: Literal["list"]
    data: list[ModelOut]


def model_out(core: Core, name: str) -> dict[str, Any]:
    """One model in OpenAI's shape (`id`, `object`, `created`, `owned_by`), Easel's own fields beside them.
    `created` is 0: Easel does not record when a model was configured."""
    model = core.settings.models[name]
    return {"id": name, "object": "model", "created": 0, "owned_by": "easel",
            "default": name == core.settings.generation.default_model,
            "default_width": model.default_width, "default_height": model.default_height}


@router.get("/v1/models", response_model=ModelListOut, responses=errors(401, body=OpenAIErrorOut))
async def models(core: CoreDep, key: Key) -> dict[str, Any]:
    """The models, as OpenAI's `models.list` answers: `{"object": "list", "data": [...]}`; `default`
    marks the one a job gets without --model (and an OpenAI model name such as dall-e-3)."""
    return {"object": "list", "data": [model_out(core, name) for name in core.settings.models]}


# 422: none is answered (any model_id is a string), but FastAPI would otherwise document its own 422 body.
@router.get("/v1/models/{model_id}", response_model=ModelOut,
            responses=errors(401, 404, 422, body=OpenAIErrorOut))
async def model(core: CoreDep, key: Key, model_id: str) -> dict[str, Any]:
    """One model, as OpenAI's `models.retrieve` answers."""
    if model_id not in core.settings.models:
        raise NotFound(f"No model {model_id!r}; the models are {', '.join(core.settings.models)}")
    return model_out(core, model_id)


@router.get("/v1/help", response_model=HelpOut, responses=errors(401))
async def help_text(core: CoreDep, key: Key) -> HelpOut:
    """The chat commands, flags and limits, as /help answers them; `examples`: prompts the default
    model draws (`{"model": "shapes", "prompts": ["a red circle on a blue background", ...]}`); and
    `limits`, the same limits in numbers (the ranges of steps, cfg, n, sizes; the models and samplers),
    for clients that offer the choices themselves (`easel mcp` builds its tools' schemas from them)."""
    default = core.settings.generation.default_model
    return HelpOut.model_validate({"text": core.parser.help_text(),
                                   "examples": {"model": default, "prompts": core.parser.example_prompts()},
                                   "limits": LimitsOut.of(core.settings)})
