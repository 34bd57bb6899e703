"""What a key may ask about itself and the server: its quota, the models, the chat commands."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from adapters.api.deps import CoreDep, Key
from adapters.api.render import quota_out

router = APIRouter(tags=["account"])

# Prompts to suggest, by model source. builtin:shapes knows only the words of its captions (see
# generation/shapes.py; these three are training combinations, so it draws them right); builtin:tiny
# draws noise whatever it is told, and real weights take any prompt.
SHAPES_EXAMPLES = ("a red circle on a blue background", "a white square on a green background",
                   "a yellow triangle on a black background")
GENERAL_EXAMPLES = ("a lighthouse at dusk, oil painting", "a red fox in the snow", "a bowl of ramen, studio photo")


def example_prompts(source: str) -> list[str]:
    """Prompts a model of this source draws what they say (for builtin:tiny, none does)."""
    return list(SHAPES_EXAMPLES if source == "builtin:shapes" else GENERAL_EXAMPLES)


@router.get("/v1/quota")
async def quota(core: CoreDep, key: Key) -> dict[str, Any]:
    """Cost units (512x512, 20 steps, 1 image = 1 unit) used and left today and this minute, and
    `text`, the same as the chat's /quota answer. A limit of null means none."""
    return quota_out(await core.service.quota(key.requester()))


@router.get("/v1/models")
async def models(core: CoreDep, key: Key) -> dict[str, Any]:
    settings = core.settings
    return {"default": settings.generation.default_model,
            "models": [{"name": name, "default_width": m.default_width, "default_height": m.default_height}
                       for name, m in settings.models.items()]}


@router.get("/v1/help")
async def help_text(core: CoreDep, key: Key) -> dict[str, Any]:
    """The chat commands, flags and limits, as /help answers them, and `examples`: prompts the default
    model draws (`{"model": "shapes", "prompts": ["a red circle on a blue background", ...]}`)."""
    default = core.settings.generation.default_model
    return {"text": core.parser.help_text(),
            "examples": {"model": default, "prompts": example_prompts(core.settings.models[default].source)}}
