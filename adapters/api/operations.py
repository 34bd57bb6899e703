"""Operations and the web chat: the chat page, a key per browser, the health check and Prometheus metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, PlainTextResponse

from adapters.api.deps import CoreDep, KeysDep
from bot.errors import Refused
from bot.metrics import read_metrics

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Everything a page of ours may load comes from this server; results are blob:/data: URLs at most.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                           "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")

router = APIRouter()


@router.get("/", include_in_schema=False)
async def web_chat() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                         "Cache-Control": "no-cache"})


@router.get("/healthz", tags=["operations"])
async def healthz(core: CoreDep) -> dict[str, str]:
    await core.bus.latest_id()  # a read that fails when the database does
    return {"status": "ok"}


@router.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
async def metrics(core: CoreDep) -> PlainTextResponse:
    return PlainTextResponse(prometheus_text(await read_metrics(core.db)),
                             media_type="text/plain; version=0.0.4")


@router.post("/v1/sessions", tags=["web chat"], status_code=201)
async def new_session(core: CoreDep, keys: KeysDep) -> dict[str, str]:
    """A key for one browser of the web chat (when `http.web_sessions` is on)."""
    if not core.settings.http.web_sessions:
        raise Refused("This server gives no web sessions; paste an API key made with "
                      "`easel apikey create --name NAME`")
    token, key = await keys.create("web session", kind="web")
    return {"token": token, "key_id": key.public_id}


def prometheus_text(m: Any) -> str:
    lines = [
        "# HELP easel_queue_length Jobs waiting for a worker.", "# TYPE easel_queue_length gauge",
        f"easel_queue_length {m.queue_length}",
        "# HELP easel_jobs Jobs by status.", "# TYPE easel_jobs gauge",
        *(f'easel_jobs{{status="{status}"}} {count}' for status, count in m.jobs_by_status.items()),
        "# HELP easel_generation_seconds Start to finish of succeeded jobs.",
        "# TYPE easel_generation_seconds summary",
        f"easel_generation_seconds_sum {m.generation_seconds_sum:.6f}",
        f"easel_generation_seconds_count {m.generation_seconds_count}",
        f"# HELP easel_images_per_second Images made per second over the last {m.window_s:g} s.",
        "# TYPE easel_images_per_second gauge", f"easel_images_per_second {m.images_per_second:.6f}",
        f"# HELP easel_worker_busy_ratio Share of the last {m.window_s:g} s some batch was running.",
        "# TYPE easel_worker_busy_ratio gauge", f"easel_worker_busy_ratio {m.worker_busy_ratio:.6f}",
    ]
    return "\n".join(lines) + "\n"
