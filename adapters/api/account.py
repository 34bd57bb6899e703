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
from bot.catalog import CatalogModel, describe_models
from bot.errors import NotFound
from bot.styles import describe_styles, style_flag

router = APIRouter(tags=["account"])


@router.get("/v1/quota", response_model=QuotaOut, responses=errors(401))
async def quota(core: CoreDep, key: Key) -> dict[str, Any]:
    """Cost units (512x512, 20 steps, 1 image = 1 unit) used and left today and this minute, and
    `text`, the same as the chat's /quota answer. A limit of null means none."""
    return quota_out(await core.service.quota(key.requester()))


class ModelDefaultsOut(BaseModel):
    steps: int
    cfg: float
    sampler: str
    negative_prompt: str


class ModelOut(BaseModel):
    id: str = Field(description="the name to give as `model` (or --model)")
    object: Literal["model"]
    created: int = Field(description="0: Easel does not record when a model was configured")
    owned_by: Literal["easel"]
    default: bool = Field(description="the model a job gets without --model (and for OpenAI's model names)")
    default_width: int
    default_height: int
    family: Literal["sd1", "sd2", "sdxl"] | None = Field(description="null until a hub model is downloaded")
    family_name: str = Field(description="the family for people: SD 1.x, SD 2.x, SDXL")
    defaults: ModelDefaultsOut = Field(description="what a job gets unless its own flags say otherwise")
    description: str
    origin: Literal["config", "checkpoints"] = Field(
        description="config: a [models.*] table; checkpoints: found in the checkpoints folder")


class RefusedModelOut(BaseModel):
    file: str
    reason: str = Field(description="why the file cannot be used, and what to do")


class ModelListOut(BaseModel):
    object: Literal["list"]
    data: list[ModelOut]
    refused: list[RefusedModelOut] = Field(description="files in the checkpoints folder that cannot be used")
    text: str = Field(description="the chat's /models answer")


def model_out(core: Core, model: CatalogModel) -> dict[str, Any]:
    """One model in OpenAI's shape (`id`, `object`, `created`, `owned_by`), Easel's own fields beside them:
    its family ("sd1", "sd2", "sdxl"; null until a hub model is downloaded), default size and settings
    (which a job's own values override) and description. `created` is 0: Easel does not record when a
    model was configured."""
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "easel",
            "default": model.name == core.catalog.default_name,
            "default_width": model.width, "default_height": model.height,
            "family": model.family.value if model.family else None, "family_name": model.family_label,
            "defaults": {"steps": model.steps, "cfg": model.cfg, "sampler": model.sampler,
                         "negative_prompt": model.negative},
            "description": model.description, "origin": model.origin}


@router.get("/v1/models", response_model=ModelListOut, responses=errors(401, body=OpenAIErrorOut))
async def models(core: CoreDep, key: Key) -> dict[str, Any]:
    """The models, as OpenAI's `models.list` answers: `{"object": "list", "data": [...]}`; `default`
    marks the one a job gets without --model (and an OpenAI model name such as dall-e-3). Beside
    them, `refused`: files in the checkpoints folder that cannot be used, each with why (`file`,
    `reason`), and `text`, the chat's /models answer. The checkpoints folder is read again first."""
    listed = core.catalog.list()
    return {"object": "list", "data": [model_out(core, model) for model in listed if model.usable],
            "refused": [{"file": model.file or model.name, "reason": model.problem}
                        for model in listed if not model.usable],
            "text": describe_models(listed, core.catalog.default_name)}


# 422: none is answered (any model_id is a string), but FastAPI would otherwise document its own 422 body.
@router.get("/v1/models/{model_id}", response_model=ModelOut,
            responses=errors(401, 404, 422, body=OpenAIErrorOut))
async def model(core: CoreDep, key: Key, model_id: str) -> dict[str, Any]:
    """One model, as OpenAI's `models.retrieve` answers."""
    found = core.catalog.get(model_id)
    if found is None:
        usable = [model.name for model in core.catalog.list() if model.usable]
        raise NotFound(f"No model {model_id!r}; the models are {', '.join(usable)}")
    if found.problem is not None:
        raise NotFound(f"Model {found.name!r} cannot be used: {found.problem}")
    return model_out(core, found)


@router.get("/v1/loras", responses=errors(401))
async def loras(core: CoreDep, key: Key) -> dict[str, Any]:
    """The installed LoRAs (`<lora:NAME:WEIGHT>` in a prompt) and textual-inversion embeddings (their
    name as a word in a prompt or negative prompt), each with `for` (the models it fits), its size and
    AUTOMATIC1111's short hash; `text` is the chat's /loras answer."""
    networks = core.parser.networks
    return {"loras": [networks.entry(found) for found in networks.loras().values()],
            "embeddings": [networks.entry(found) for found in networks.embeddings().values()],
            "text": networks.listing()}


@router.get("/v1/styles", responses=errors(401))
async def styles(core: CoreDep, key: Key) -> dict[str, Any]:
    """The styles of styles.csv (`--style NAME` in a command, `flag` being the NAME to write), each with
    its prompt (`{prompt}` marks where the user's goes) and negative prompt; `text` is the chat's
    /styles answer. The file is read again when it has changed."""
    listed = core.parser.styles.styles()
    return {"styles": [{"name": style.name, "flag": style_flag(style.name), "prompt": style.prompt,
                        "negative_prompt": style.negative} for style in listed],
            "text": describe_styles(listed)}


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
