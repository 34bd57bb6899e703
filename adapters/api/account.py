"""What a key may ask about itself and the server: its quota, the models, the chat commands."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from adapters.api.deps import CoreDep, Key
from adapters.api.render import quota_out

router = APIRouter(tags=["account"])

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
            "examples": {"model": default, "prompts": core.parser.example_prompts()}}
