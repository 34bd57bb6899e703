"""What a key may ask about itself and the server: its quota, the models (in the shape of OpenAI's
`models.list` and `models.retrieve`), the chat commands."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from adapters.api.deps import CoreDep, Key
from adapters.api.openai_images import OpenAIErrorOut
from adapters.api.render import quota_out
from bot.bootstrap import Core
from bot.catalog import CatalogModel, describe_models
from bot.errors import NotFound
from bot.styles import describe_styles, style_flag

router = APIRouter(tags=["account"])

@router.get("/v1/quota")
async def quota(core: CoreDep, key: Key) -> dict[str, Any]:
    """Cost units (512x512, 20 steps, 1 image = 1 unit) used and left today and this minute, and
    `text`, the same as the chat's /quota answer. A limit of null means none."""
    return quota_out(await core.service.quota(key.requester()))


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


@router.get("/v1/models")
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


@router.get("/v1/models/{model_id}", responses={404: {"model": OpenAIErrorOut}})
async def model(core: CoreDep, key: Key, model_id: str) -> dict[str, Any]:
    """One model, as OpenAI's `models.retrieve` answers."""
    found = core.catalog.get(model_id)
    if found is None:
        usable = [model.name for model in core.catalog.list() if model.usable]
        raise NotFound(f"No model {model_id!r}; the models are {', '.join(usable)}")
    if found.problem is not None:
        raise NotFound(f"Model {found.name!r} cannot be used: {found.problem}")
    return model_out(core, found)


@router.get("/v1/loras")
async def loras(core: CoreDep, key: Key) -> dict[str, Any]:
    """The installed LoRAs (`<lora:NAME:WEIGHT>` in a prompt) and textual-inversion embeddings (their
    name as a word in a prompt or negative prompt), each with `for` (the models it fits), its size and
    AUTOMATIC1111's short hash; `text` is the chat's /loras answer."""
    networks = core.parser.networks
    return {"loras": [networks.entry(found) for found in networks.loras().values()],
            "embeddings": [networks.entry(found) for found in networks.embeddings().values()],
            "text": networks.listing()}


@router.get("/v1/styles")
async def styles(core: CoreDep, key: Key) -> dict[str, Any]:
    """The styles of styles.csv (`--style NAME` in a command, `flag` being the NAME to write), each with
    its prompt (`{prompt}` marks where the user's goes) and negative prompt; `text` is the chat's
    /styles answer. The file is read again when it has changed."""
    listed = core.parser.styles.styles()
    return {"styles": [{"name": style.name, "flag": style_flag(style.name), "prompt": style.prompt,
                        "negative_prompt": style.negative} for style in listed],
            "text": describe_styles(listed)}


@router.get("/v1/help")
async def help_text(core: CoreDep, key: Key) -> dict[str, Any]:
    """The chat commands, flags and limits, as /help answers them, and `examples`: prompts the default
    model draws (`{"model": "shapes", "prompts": ["a red circle on a blue background", ...]}`)."""
    default = core.settings.generation.default_model
    return {"text": core.parser.help_text(),
            "examples": {"model": default, "prompts": core.parser.example_prompts()}}
