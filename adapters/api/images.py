"""GET /v1/images/{sha256}: a stored PNG; GET /v1/videos/{sha256}: the /animate clip whose poster that is.
The link is the permission, except for a withheld image."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from adapters.api.deps import CoreDep, Credentials, KeysDep
from adapters.api.schemas import errors
from bot.animation import video_path
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
    return await _served(core, keys, credentials, sha256, path, "image/png")


@router.get("/v1/videos/{sha256}", tags=["images"], response_class=FileResponse, responses={
    200: {"description": "the MP4", "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}},
    **errors(403, 404, 422)}, openapi_extra={"security": [{}]})
async def get_video(sha256: str, core: CoreDep, keys: KeysDep, credentials: Credentials) -> FileResponse:
    """The clip of the /animate job whose poster (last frame) has this SHA-256, under the poster's rules:
    the link is the permission, and a withheld clip is served only to a moderator's key."""
    job = await core.service.job_that_made(sha256)
    path = video_path(core.settings.storage.data_dir, job.id) if job is not None else None
    if path is None or not path.is_file():
        raise NotFound(f"No video for image {sha256}")
    return await _served(core, keys, credentials, sha256, path, "video/mp4")


async def _served(core: CoreDep, keys: KeysDep, credentials: Credentials, sha256: str, path: Path,
                  media_type: str) -> FileResponse:
    if await core.service.image_withheld(sha256):
        key = await keys.authenticate(credentials.credentials) if credentials else None
        if key is None or not core.service.policy.is_moderator(key.requester()):
            raise Refused("This image was withheld by the image check; only a moderator can open it. "
                          "Its owner can appeal with /appeal JOB_ID <why>")
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, no-store"})
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=31536000, immutable"})
