"""What each surface shows of a job whose images the output check flagged (issue #12).

A real diffusers safety checker that flags every image stands in for a real detection. The worker,
the job service, the HTTP API under uvicorn, the real discord.py and python-telegram-bot clients
against their local fake servers, and the MCP tools' HTTP client are all real. Each test reads what a
user of that surface receives: a withheld image never arrives; a flagged image where NSFW is allowed
arrives behind the platform's spoiler.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web
from sqlalchemy import select

from adapters.mcp_server import EaselApi
from bot.bootstrap import Core
from bot.config import load_settings
from bot.delivery import Deliveries
from bot.domain import AppealCommand, GenerationParams, JobKind, JobStatus, ModResolveCommand, Requester
from bot.events import Event, EventKind
from bot.models import Appeal
from bot.views import ImageView, JobView
from generation.worker import Worker
from tests.http_fixtures import serving, sse

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"


# -- the decision itself ------------------------------------------------------------------------------


def job_with(*flags: tuple[str, ...], nsfw_allowed: bool = False) -> JobView:
    images = tuple(ImageView(index, 100 + index, f"{index:064x}", f"/images/{index}.png", 64, 64, 10, tuple(f))
                   for index, f in enumerate(flags))
    return JobView(id="k7mq2x9a", status=JobStatus.SUCCEEDED, params=GenerationParams(JobKind.IMAGINE, "a statue",
                   n=len(flags), seed=100), platform="console", user_id="alice", display_name="Alice",
                   reply_to={}, attempts=1, progress_step=2, progress_total=2, created_at=datetime.now(UTC),
                   images=images, nsfw_allowed=nsfw_allowed)


def test_withheld_images_become_notices_and_flagged_ones_spoilers() -> None:
    deliveries = Deliveries(load_settings(None, safety={"image_checker": "diffusers"}))
    delivery = deliveries.of_job(job_with((), ("nsfw:withhold",), ("nsfw:spoiler",), ("nsfw:released",)))
    assert [(image.index, image.spoiler) for image in delivery.images] == [(0, False), (2, True), (3, False)]
    assert [notice.index for notice in delivery.withheld] == [1]
    assert "Image 2 was withheld" in delivery.notice and "flagged it as nsfw" in delivery.notice
    assert "/appeal k7mq2x9a" in delivery.notice


@pytest.mark.parametrize(("checker", "nsfw_allowed", "shown", "spoiler"), [
    ("none", False, True, False),  # nothing can be withheld: the preview shows no more than the result
    ("diffusers", True, True, True),  # not yet checked, where NSFW is allowed: behind a spoiler
    ("diffusers", False, False, False),  # the result may be withheld here: no preview at all
])
def test_previews_never_show_more_than_the_final_image_may(checker: str, nsfw_allowed: bool, shown: bool,
                                                           spoiler: bool) -> None:
    deliveries = Deliveries(load_settings(None, safety={"image_checker": checker}))
    event = Event(1, "k7mq2x9a", "console", EventKind.PROGRESS,
                  {"step": 1, "total": 2, "preview": "data:image/jpeg;base64,AAAA"}, datetime.now(UTC))
    delivery = deliveries.of_event(event, job_with((), nsfw_allowed=nsfw_allowed))
    assert (delivery.preview is not None, delivery.preview_spoiler) == (shown, spoiler)
    assert (delivery.step, delivery.total) == (1, 2)


def test_no_adapter_reads_safety_flags_job_images_or_event_payloads() -> None:
    """The trust boundary: adapters render a Delivery; none of them looks at what decides it."""
    offences = []
    for path in sorted(ADAPTERS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("safety_flags", "withheld_images", "payload"):
                offences.append(f"{path.name}:{node.lineno} reads .{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "images" and isinstance(node.value, ast.Name) \
                    and node.value.id == "job":
                offences.append(f"{path.name}:{node.lineno} reads job.images")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.endswith((":withhold", ":spoiler")):
                offences.append(f"{path.name}:{node.lineno} compares a safety flag")
    assert offences == []


# -- the HTTP API, its image route, SSE, webhooks, follow-ups and MCP -----------------------------------


@contextlib.asynccontextmanager
async def checked_worker(core: Core, generator, checker) -> AsyncIterator[None]:
    """The real worker with the output check, serving the queue in the background."""
    worker = Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1",
                    image_checker=checker)
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.stop()
        await task


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[str, asyncio.Queue]]:
    received: asyncio.Queue = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        await received.put(json.loads(await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/hook", received
    finally:
        await runner.cleanup()


@pytest.fixture
def settings(tmp_path: Path, models_dir: Path):
    return load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir},
                         generation={"poll_interval_ms": 50, "progress_every_s": 0},
                         safety={"image_checker": "diffusers"},  # what the fixture's checker is
                         http={"port": 0, "allow_private_webhooks": True, "webhook_backoff_s": 0.05})


async def test_the_http_api_never_hands_out_a_withheld_image_until_an_appeal_releases_it(
        core: Core, generator, flag_all_checker) -> None:
    owner_token, owner_key = await core.apikeys.create("owner")
    other_token, _ = await core.apikeys.create("someone else")
    moderator_token, moderator = await core.apikeys.create("moderator")
    core.settings.moderation.owner_ids.append(f"http:{moderator.public_id}")
    async with serving(core) as server, webhook_receiver() as (hook_url, hooks), \
            checked_worker(core, generator, flag_all_checker):
        owner = server.client(owner_token)
        submitted = await owner.post("/v1/jobs", json={
            "command": "/imagine a statue --steps 2 --seed 3", "webhook": {"url": hook_url, "secret": "s" * 16}})
        job_id = submitted.json()["id"]
        events = await sse(owner, job_id)
        job = (await owner.get(f"/v1/jobs/{job_id}")).json()
        listed = (await owner.get("/v1/jobs")).json()
        webhook = await asyncio.wait_for(hooks.get(), 30)

        # The job JSON, the list, the SSE result and the webhook: a notice, never an image or its link.
        assert job["status"] == "succeeded" and job["images"] == []
        assert [w["index"] for w in job["withheld"]] == [0] and f"/appeal {job_id}" in job["notice"]
        assert listed[0]["images"] == [] and listed[0]["withheld"] == job["withheld"]
        done = dict(events)["done"]
        assert done["images"] == [] and "Image 1 was withheld" in done["notice"]
        assert webhook["event"] == "job.done" and webhook["job"]["images"] == []
        everything = json.dumps([job, listed, events, webhook])
        stored = (await core.service.get_job(job_id)).images[0]
        assert stored.sha256 not in everything

        # The image route: not by its link alone, not to its owner, not to another key; to a moderator.
        link = f"/v1/images/{stored.sha256}"
        async with server.client() as anonymous:
            assert (await anonymous.get(link)).status_code == 403
        assert (await owner.get(link)).status_code == 403
        async with server.client(other_token) as other:
            assert (await other.get(link)).status_code == 403
        async with server.client(moderator_token) as mod:
            seen = await mod.get(link)
            assert seen.status_code == 200 and seen.content == Path(stored.path).read_bytes()

        # No follow-up of a withheld image: refused with the reason, nothing queued, nothing copied.
        refused = await owner.post(f"/v1/jobs/{job_id}/variations", json={"index": 0})
        assert refused.status_code == 403 and "withheld" in refused.json()["message"]
        assert (await owner.post(f"/v1/jobs/{job_id}/upscale", json={"index": 0})).status_code == 403
        assert len(await core.service.list_jobs()) == 1

        # MCP answers are made from the same API: the notice, no link.
        mcp = await EaselApi(server.url, owner_token).run_job({"kind": "imagine", "prompt": "a statue",
                                                                 "steps": 2})
        assert mcp["images"] == [] and "was withheld" in mcp["withheld"][0]

        # The owner appeals, a moderator accepts: the image is released and sent (the webhook again).
        await core.moderation.handle(owner_key.requester(),
                                              AppealCommand(job_id, "it is a statue"))
        async with core.db.unit_of_work(write=False) as uow:
            appeal_id = await uow.session.scalar(select(Appeal.id))
        answer = await core.moderation.handle(moderator.requester(),
                                                       ModResolveCommand(appeal_id, accept=True))
        assert "released" in answer
        released = await asyncio.wait_for(hooks.get(), 30)
        assert released["event"] == "job.released" and released["job"]["images"][0]["index"] == 0
        job = (await owner.get(f"/v1/jobs/{job_id}")).json()
        assert job["withheld"] == [] and job["images"][0]["spoiler"] is False
        async with server.client() as anonymous:
            assert (await anonymous.get(link)).status_code == 200
        await owner.aclose()


async def test_an_accepted_appeal_releases_the_withheld_images_on_each_database(
        any_core: Core, generator, flag_all_checker) -> None:
    core = any_core
    owner = Requester("console", "alice", "Alice")
    job = (await core.service.submit(owner, core.parser.parse("/imagine a statue --steps 2 --n 2"))).job
    await Worker(core.queue, generator, core.store, core.settings, worker_id="test-worker:1",
                 image_checker=flag_all_checker).run(burst=True)
    withheld = core.deliveries.of_job(await core.service.get_job(job.id))
    assert withheld.images == () and len(withheld.withheld) == 2
    assert await core.service.image_withheld((await core.service.get_job(job.id)).images[0].sha256)

    await core.moderation.handle(owner, AppealCommand(job.id, "it is a statue"))
    async with core.db.unit_of_work(write=False) as uow:
        appeal_id = await uow.session.scalar(select(Appeal.id))
    moderator = Requester("console", "mod", "Mod", is_platform_moderator=True)
    before = await core.bus.latest_id()
    await core.moderation.handle(moderator, ModResolveCommand(appeal_id, accept=True))

    [released] = await core.bus.read_after(before, job_id=job.id)  # what the owner's platform follows
    assert released.kind is EventKind.RELEASED
    finished = await core.service.get_job(job.id)
    delivery = core.deliveries.of_event(released, finished)
    assert [image.index for image in delivery.images] == [0, 1] and delivery.withheld == ()
    assert core.deliveries.of_job(finished).withheld == ()
    assert not await core.service.image_withheld(finished.images[0].sha256)

