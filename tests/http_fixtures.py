"""Fixtures for the HTTP adapter's tests: the real app under uvicorn on a free 127.0.0.1 port, the real
builtin:tiny worker in the background, and API keys made the way `easel apikey create` makes them.

Test modules import what they use: `from tests.http_fixtures import server, settings  # noqa: F401`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters.http import HttpAdapter
from bot.bootstrap import Core
from bot.config import Settings, load_settings
from generation.worker import Worker

MAX_UPLOAD = 300_000  # small, so an oversize upload is cheap to send


@pytest.fixture
def settings(data_dir: Path, models_dir: Path) -> Settings:
    return load_settings(None, storage={"data_dir": data_dir, "models_dir": models_dir},
                         generation={"poll_interval_ms": 50, "progress_every_s": 0},
                         limits={"max_upload_bytes": MAX_UPLOAD},
                         http={"port": 0, "allow_private_webhooks": True, "webhook_backoff_s": 0.05,
                               "webhook_timeout_s": 5})


@dataclass
class Server:
    core: Core
    url: str
    adapter: HttpAdapter

    async def new_key(self, name: str = "tests", daily_images: int | None = None) -> str:
        token, _ = await self.core.apikeys.create(name, daily_images=daily_images)
        return token

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60)


@contextlib.asynccontextmanager
async def serving(core: Core) -> AsyncIterator[Server]:
    adapter = HttpAdapter(core)
    stop = asyncio.Event()
    task = asyncio.create_task(adapter.run(stop))
    started = asyncio.create_task(adapter.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises what stopped it
    try:
        yield Server(core, f"http://127.0.0.1:{adapter.port}", adapter)
    finally:
        stop.set()
        await task


@pytest.fixture
async def server(core: Core) -> AsyncIterator[Server]:
    async with serving(core) as running:
        yield running


@contextlib.asynccontextmanager
async def running_worker(core: Core, generator, image_checker=None) -> AsyncIterator[Worker]:
    """The real worker serving the queue in the background, as under `easel serve` (with the output
    check given, none by default)."""
    worker = Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1",
                    image_checker=image_checker)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await task


async def sse(client: httpx.AsyncClient, job_id: str, headers: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """Every (event, data) of a job's event stream, read to its end."""
    import json

    seen: list[tuple[str, dict]] = []
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                seen.append((kind, json.loads(line[6:])))
    return seen


async def wait_done(client: httpx.AsyncClient, job_id: str) -> dict:
    await sse(client, job_id)
    return (await client.get(f"/v1/jobs/{job_id}")).json()
