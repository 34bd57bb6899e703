"""The HTTP adapter: a JSON API for programs (FastAPI, OpenAPI at /openapi.json) and the web chat at /.

Like every adapter it translates: a request becomes a command for the job service, job events
become JSON, server-sent events and completion webhooks. The web chat (adapters/web/) is a static
page that uses this same API with a per-browser key from POST /v1/sessions.

    POST   /v1/jobs                   queue /imagine, /edit or /inpaint (JSON or multipart); 202
    POST   /v1/jobs?dry_run=true      validate and price it without queuing
    GET    /v1/jobs, /v1/jobs/{id}    your jobs; one job: status, progress, seeds, image links
    GET    /v1/jobs/{id}/events       server-sent events: queued, started, progress, done/failed/cancelled
    DELETE /v1/jobs/{id}              cancel
    POST   /v1/jobs/{id}/reroll|variations|upscale
    GET    /v1/images/{sha256}        a PNG (a capability link: no key needed)
    GET    /v1/quota, /v1/models, /v1/help, /healthz, /metrics
    POST   /v1/images/generations|edits|variations   the OpenAI Images API (api/openai_images.py)
    /sdapi/v1/txt2img, img2img, options, progress...  the AUTOMATIC1111 API (api/a1111.py)

The routes live in adapters/api/, one router per resource; this module composes them into the app
and serves it. Errors are `{"code": ..., "message": ...}` with the EaselError codes; a bad payload is
a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from adapters.api import a1111, account, images, jobs, openai_images, operations, trainings
from adapters.api.errors import EXCEPTION_HANDLERS
from adapters.api.openapi import openapi_of
from adapters.api.render import base_url, job_out
from adapters.webhooks import WebhookSender
from bot.apikeys import PLATFORM
from bot.bootstrap import Core
from bot.delivery import deliver_events
from bot.errors import EaselError


def build_app(core: Core) -> FastAPI:
    """The FastAPI app over one core. `HttpAdapter` serves it with uvicorn.

        app = build_app(core)  # routes reach the core through adapters/api/deps.py
    """
    app = FastAPI(title="Easel", version="1", description="Stable Diffusion jobs on a durable, fair queue.",
                  docs_url="/docs", redoc_url=None, exception_handlers=EXCEPTION_HANDLERS)
    app.state.core = core
    app.state.keys = core.apikeys
    app.state.metrics = core.metrics
    # Included in this order so /openapi.json lists the paths as it always has.
    app.include_router(operations.router)
    app.include_router(jobs.router)
    app.include_router(trainings.router)
    app.include_router(images.router)
    app.include_router(account.router)
    app.include_router(openai_images.router)
    app.include_router(a1111.router)
    if core.settings.telegram.webhook_url:  # Telegram posts the bot's updates here (webhook mode)
        from adapters import telegram_webhook  # python-telegram-bot only where it is used

        app.include_router(telegram_webhook.router(core.settings.telegram))
    # A router cannot carry a mount, so the web chat's static files are mounted on the app.
    app.mount("/web", StaticFiles(directory=operations.WEB_DIR), name="web")
    app.openapi = openapi_of(app, core.settings)  # type: ignore[method-assign]  # + hand-referenced schemas
    return app


# -- the adapter ----------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        # `easel serve` owns SIGINT/SIGTERM (finish the batch, then stop); we stop through `stop`.
        yield


class HttpAdapter:
    """Serves the API and the web chat on settings.http.host:port until `stop` is set."""

    platform = PLATFORM

    def __init__(self, core: Core) -> None:
        self.core = core
        self.port: int | None = None  # the bound port, known once `started` is set (port 0 = any free one)
        self.started = asyncio.Event()
        self._socket: socket.socket | None = None

    def listen(self) -> None:
        """Take the port now (run() does, if nobody did). `easel serve` calls this before it loads the
        generation stack, so a taken port is refused in a second, not after torch's ten."""
        if self._socket is None:
            self._socket = self._bind()

    def _bind(self) -> socket.socket:
        config = self.core.settings.http
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.host, config.port))
        except OSError as error:
            sock.close()
            raise EaselError(f"cannot listen on {config.host}:{config.port} ({error.strerror}); set another "
                             "port with http.port or EASEL_HTTP__PORT") from None
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def run(self, stop: asyncio.Event) -> None:
        self.listen()
        sock, self._socket = self._socket, None
        self.port = sock.getsockname()[1]
        server = _Server(uvicorn.Config(build_app(self.core), log_level="warning", access_log=False,
                                        lifespan="off", timeout_graceful_shutdown=3))
        webhooks = WebhookSender(self.core, lambda delivery: job_out(delivery, base_url(self.core)))
        host = self.core.settings.http.host
        print(f"Web chat and API: http://{host}:{self.port}/  (OpenAPI: /openapi.json)", flush=True)
        if tier := self.core.settings.http.a1111_anonymous_tier:
            print(f"WARNING: /sdapi/v1 serves requests without an API key, as one user on the {tier!r} quota "
                  "tier (http.a1111_anonymous_tier); keep this server on a trusted network", flush=True)
        try:
            async with asyncio.TaskGroup() as group:
                serving = group.create_task(server.serve(sockets=[sock]), name="easel-http-server")
                group.create_task(deliver_events(self.core.service, self.core.deliveries, PLATFORM, webhooks.on_event,
                                                 stop, concurrency=self.core.settings.delivery.concurrency),
                                  name="easel-http-webhooks")
                while not server.started and not serving.done():
                    await asyncio.sleep(0.01)
                self.started.set()
                await stop.wait()
                server.should_exit = True
        finally:
            await webhooks.close()
            sock.close()
