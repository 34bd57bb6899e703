"""Operations and the web chat: the chat page, a key per browser, the health check and Prometheus metrics."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse

from adapters.api.deps import CoreDep, KeysDep
from adapters.api.schemas import HealthOut, SessionOut, errors
from bot.errors import Refused
from bot.metrics import PROMETHEUS_CONTENT_TYPE, PrometheusExporter

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Everything a page of ours may load comes from this server; results are blob:/data: URLs at most.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                           "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")

router = APIRouter()


@router.get("/", include_in_schema=False)
async def web_chat() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                         "Cache-Control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    # The page links this icon; browsers and tools that ask for /favicon.ico regardless get it too.
    return FileResponse(WEB_DIR / "favicon.svg", media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})


@router.get("/healthz", tags=["operations"], response_model=HealthOut)
async def healthz(core: CoreDep) -> dict[str, str]:
    await core.bus.latest_id()  # a read that fails when the database does
    return {"status": "ok"}


@router.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    exporter: PrometheusExporter = request.app.state.metrics
    return PlainTextResponse(await exporter.scrape(), media_type=PROMETHEUS_CONTENT_TYPE)


@router.post("/v1/sessions", tags=["web chat"], status_code=201, response_model=SessionOut, responses=errors(403))
async def new_session(core: CoreDep, keys: KeysDep) -> dict[str, str]:
    """A key for one browser of the web chat (when `http.web_sessions` is on)."""
    if not core.settings.http.web_sessions:
        raise Refused("This server gives no web sessions; paste an API key made with "
                      "`easel apikey create --name NAME`")
    token, key = await keys.create("web session", kind="web")
    return {"token": token, "key_id": key.public_id}
