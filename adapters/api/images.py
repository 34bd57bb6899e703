"""GET /v1/images/{sha256}: a stored PNG; GET /v1/videos/{sha256} and /v1/gifs/{sha256}: the /animate clip
whose poster that is, as an MP4 and as a GIF.
The link is the permission, except for a withheld image.

From a folder store the file is sent as is; from an object store the bytes are streamed through, or,
with `storage.image_links = "redirect"`, the answer is a 307 to a presigned URL, so the store serves
the bytes and Easel's HTTP server does not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from adapters.api.deps import CoreDep, Credentials, KeysDep
from adapters.api.schemas import errors
from bot.animation import CLIP_NAME, GIF_NAME
from bot.errors import NotFound, Refused

router = APIRouter()

IMMUTABLE = "public, max-age=31536000, immutable"  # the link names the bytes: they never change
PRIVATE = "private, no-store"


@router.get("/v1/images/{sha256}", tags=["images"], response_class=FileResponse, responses={
    200: {"description": "the PNG", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
    307: {"description": "with storage.image_links = \"redirect\": the PNG at a presigned object-store URL"},
    **errors(403, 404, 422)}, openapi_extra={"security": [{}]})  # added to the bearer: the key is optional
async def get_image(sha256: str, core: CoreDep, keys: KeysDep, credentials: Credentials) -> Response:
    """A PNG by the SHA-256 in its link. The link is the permission: it needs no key, so it can be
    shown in a browser or chat. An image the image check withheld is served only to a moderator's key."""
    store = core.store
    if not await store.exists(sha256):
        raise NotFound(f"No image {sha256}")
    withheld = await _check_allowed(core, keys, credentials, sha256)
    return _send(core, withheld, "image/png", store.local_path(sha256),
                 partial(store.presigned_url, sha256), partial(store.stream, sha256))


@router.get("/v1/videos/{sha256}", tags=["images"], response_class=FileResponse, responses={
    200: {"description": "the MP4", "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}},
    307: {"description": "with storage.image_links = \"redirect\": the MP4 at a presigned object-store URL"},
    **errors(403, 404, 422)}, openapi_extra={"security": [{}]})
async def get_video(sha256: str, core: CoreDep, keys: KeysDep, credentials: Credentials) -> Response:
    """The clip of the /animate job whose poster (last frame) has this SHA-256, under the poster's rules:
    the link is the permission, and a withheld clip is served only to a moderator's key."""
    return await _job_file(core, keys, credentials, sha256, CLIP_NAME, "video/mp4", "video")


@router.get("/v1/gifs/{sha256}", tags=["images"], response_class=FileResponse, responses={
    200: {"description": "the GIF", "content": {"image/gif": {"schema": {"type": "string", "format": "binary"}}}},
    307: {"description": "with storage.image_links = \"redirect\": the GIF at a presigned object-store URL"},
    **errors(403, 404, 422)}, openapi_extra={"security": [{}]})
async def get_gif(sha256: str, core: CoreDep, keys: KeysDep, credentials: Credentials) -> Response:
    """The clip of the /animate job whose poster has this SHA-256 as a looping GIF, under the poster's rules
    (as GET /v1/videos/{sha256}); 404 for a clip too large for a GIF."""
    return await _job_file(core, keys, credentials, sha256, GIF_NAME, "image/gif", "GIF")


async def _job_file(core: CoreDep, keys: KeysDep, credentials: Credentials, sha256: str, name: str,
                    media_type: str, what: str) -> Response:
    """The file `name` of the job whose result image (an /animate poster) has this SHA-256, under that
    image's rules."""
    store = core.store
    job = await core.service.job_that_made(sha256)
    if job is None or not await store.job_file_exists(job.id, name):
        raise NotFound(f"No {what} for image {sha256}")
    withheld = await _check_allowed(core, keys, credentials, sha256)
    return _send(core, withheld, media_type, store.job_file_local_path(job.id, name),
                 partial(store.job_file_presigned_url, job.id, name), partial(store.stream_job_file, job.id, name))


def _send(core: CoreDep, withheld: bool, media_type: str, path: Path | None,
          presigned_url: Callable[[int], str | None], stream: Callable[[], AsyncIterator[bytes]]) -> Response:
    """A stored file as the answer: sent as is from this host's disk; from an object store, a 307 to a
    presigned URL with `image_links = "redirect"`, else streamed through."""
    headers = {"Cache-Control": PRIVATE if withheld else IMMUTABLE}
    if path is not None:
        return FileResponse(path, media_type=media_type, headers=headers)
    storage = core.settings.storage
    # A presigned URL is a bearer link anyone may pass on: never one for a withheld image or clip.
    if storage.image_links == "redirect" and not withheld:
        url = presigned_url(storage.presigned_url_s)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": PRIVATE})
    return StreamingResponse(stream(), media_type=media_type, headers=headers)


async def _check_allowed(core: CoreDep, keys: KeysDep, credentials: Credentials, sha256: str) -> bool:
    """Whether the image check withheld this image; Refused unless the key is a moderator's then."""
    if not await core.service.image_withheld(sha256):
        return False
    key = await keys.authenticate(credentials.credentials) if credentials else None
    if key is None or not core.service.policy.is_moderator(key.requester()):
        raise Refused("This image was withheld by the image check; only a moderator can open it. "
                      "Its owner can appeal with /appeal JOB_ID <why>")
    return True
