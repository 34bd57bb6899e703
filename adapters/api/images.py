"""GET /v1/images/{sha256}: a stored PNG. The link is the permission, except for a withheld image."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from adapters.api.deps import CoreDep, Credentials, KeysDep
from adapters.api.schemas import errors
from bot.errors import NotFound, Refused

router = APIRouter()


@router.get("/v1/images/{sha256}", tags=["images"], response_class=FileResponse, responses={
    200: {"description": "the PNG", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
    **errors(403, 404, 422)}, openapi_extra={"security": [{}]})  # added to the bearer: the key is optional
async def get_image(sha256: str, core: CoreDep, keys: KeysDep, credentials: Credentials) -> FileResponse:
    """A PNG by the SHA-256 in its link. The link is the permission: it needs no key, so it can be
    shown in a browser or chat. An image the image check withheld is served only to a moderator's key."""
    path = core.store.path_of(sha256)
    if not path.is_file():
        raise NotFound(f"No image {sha256}")
    if await core.service.image_withheld(sha256):
        key = await keys.authenticate(credentials.credentials) if credentials else None
        if key is None or not core.service.policy.is_moderator(key.requester()):
            raise Refused("This image was withheld by the image check; only a moderator can open it. "
                          "Its owner can appeal with /appeal JOB_ID <why>")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, no-store"})
    return FileResponse(path, media_type="image/png",
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})
