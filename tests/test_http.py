"""The HTTP API through real HTTP: httpx against the app under uvicorn on 127.0.0.1, the real builtin:tiny
worker, real SQLite; webhooks go to a local receiver."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import socket

import httpx
import numpy as np
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.cli import main
from bot.bootstrap import open_core
from bot.store import read_parameters
from tests import http_fixtures
from tests.conftest import mask_bytes, png_bytes
from tests.http_fixtures import MAX_UPLOAD, running_worker, serving, sse, wait_done

settings, server = http_fixtures.settings, http_fixtures.server  # this module's fixtures


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def submit_and_wait(client: httpx.AsyncClient, command: str) -> dict:
    response = await client.post("/v1/jobs", json={"command": command})
    assert response.status_code == 202, response.text
    return await wait_done(client, response.json()["id"])


async def test_a_job_is_accepted_with_202_then_streams_its_events_in_order_and_serves_pngs(server, generator) -> None:
    """Also: a stream asked for again with Last-Event-ID resumes after that event."""
    token = await server.new_key()
    async with server.client(token) as client, running_worker(server.core, generator):
        response = await client.post("/v1/jobs", json={"kind": "imagine", "prompt": "a lighthouse at dusk",
                                                       "negative": "fog", "seed": 42, "steps": 3, "n": 2})
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "queued" and job["position"] == 1 and job["seeds"] == [42, 43]
        assert response.headers["location"].endswith(f"/v1/jobs/{job['id']}")
        events = await sse(client, job["id"])
        assert [kind for kind, _ in events] == ["queued", "started", "progress", "progress", "progress", "done"]
        assert [data["step"] for kind, data in events if kind == "progress"] == [1, 2, 3]
        done = events[-1][1]
        assert [image["seed"] for image in done["images"]] == [42, 43]
        assert all("path" not in image for image in done["images"])  # no server file paths leak

        job = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert job["status"] == "succeeded" and job["position"] is None and job["negative"] == "fog"
        async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            ids = [int(line[4:]) async for line in response.aiter_lines() if line.startswith("id: ")]
        resumed = await sse(client, job["id"], headers={"Last-Event-ID": str(ids[2])})  # after the 1st progress
        assert [kind for kind, _ in resumed] == ["progress", "progress", "done"]
        assert [image["url"] for image in job["images"]] == [image["url"] for image in done["images"]]
        png = await httpx.AsyncClient().get(job["images"][0]["url"])  # an image link needs no key
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert "Seed: 42" in read_parameters(png.content) and Image.open(io.BytesIO(png.content)).size == (64, 64)


async def test_a_stream_opened_while_the_job_waits_says_how_large_a_batch_it_started_in(server, generator) -> None:
    """The stream reads the job once, while it is queued; its `started` event still carries the batch size."""
    token = await server.new_key()
    async with server.client(token) as client:
        job = (await client.post("/v1/jobs", json={"kind": "imagine", "prompt": "a cat", "steps": 2, "n": 2})).json()
        events: list[tuple[str, dict]] = []
        async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            lines = response.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):  # the `queued` event: the stream has read the job
                    break
            async with running_worker(server.core, generator):
                kind = ""
                async for line in lines:
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        events.append((kind, json.loads(line.removeprefix("data: "))))
    assert events[0] == ("started", {"job_id": job["id"], "batch_size": 2}) and events[-1][0] == "done"


async def test_the_chat_grammar_and_the_json_fields_make_the_same_image(server, generator) -> None:
    token = await server.new_key()
    async with server.client(token) as client, running_worker(server.core, generator):
        by_command = await client.post("/v1/jobs", json={"command": "/imagine a red fox --seed 7 --steps 2 (-blur)"})
        by_fields = await client.post("/v1/jobs", json={"kind": "imagine", "prompt": "a red fox", "seed": 7,
                                                        "steps": 2, "negative": "blur"})
        first = await wait_done(client, by_command.json()["id"])
        second = await wait_done(client, by_fields.json()["id"])
    assert first["params"] == second["params"] and first["negative"] == "blur"
    assert first["images"][0]["url"] == second["images"][0]["url"]  # same sha256: byte-identical


async def test_a_retry_with_the_same_idempotency_key_gets_the_same_job_even_after_a_restart(server, settings) -> None:
    token = await server.new_key()
    body = {"command": "/imagine a cat --steps 2"}
    async with server.client(token) as client:
        first = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-17"})
        again = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-17"})
        other = await client.post("/v1/jobs", json={"command": "/imagine a dog"},
                                  headers={"Idempotency-Key": "order-17"})
        jobs = (await client.get("/v1/jobs")).json()
    assert first.status_code == 202 and again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["replayed"] is True
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert [job["id"] for job in jobs] == [first.json()["id"]]
    assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"

    # Stored with the job, not in memory: a new process answers the retry the same way.
    core = await open_core(settings)
    try:
        async with serving(core) as restarted, restarted.client(token) as client:
            after = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    finally:
        await core.close()
    assert after.status_code == 202 and after.json()["id"] == first.json()["id"]


async def test_cancelling_a_queued_job_ends_its_stream_and_refunds_the_quota(server) -> None:
    token = await server.new_key()
    async with server.client(token) as client:  # no worker: the job stays queued
        before = (await client.get("/v1/quota")).json()
        job = (await client.post("/v1/jobs", json={"command": "/imagine a cat --n 2"})).json()
        charged = (await client.get("/v1/quota")).json()
        cancelled = await client.delete(f"/v1/jobs/{job['id']}")
        events = await sse(client, job["id"])
        again = await client.delete(f"/v1/jobs/{job['id']}")
        after = (await client.get("/v1/quota")).json()
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert [kind for kind, _ in events] == ["queued", "cancelled"]
    assert again.status_code == 409 and "already cancelled" in again.json()["message"]
    assert charged["used"] > before["used"] and after["used"] == before["used"]
    assert charged["images"]["used"] == 2 and after["images"]["used"] == 0


async def test_edit_and_inpaint_take_multipart_uploads_and_base64(server, generator) -> None:
    token = await server.new_key()
    async with server.client(token) as client, running_worker(server.core, generator):
        edit = await client.post("/v1/jobs", data={"command": "/edit make it winter --strength 0.6 --steps 2"},
                                 files={"image": ("photo.png", png_bytes(96, 64), "image/png")})
        inpaint = await client.post("/v1/jobs", json={"kind": "inpaint", "prompt": "a red door", "steps": 2,
                                                      "image": b64(png_bytes(64, 64)), "mask": b64(mask_bytes())})
        assert edit.status_code == 202, edit.text
        assert inpaint.status_code == 202, inpaint.text
        edited = await wait_done(client, edit.json()["id"])
        inpainted = await wait_done(client, inpaint.json()["id"])
        mask = Image.open(io.BytesIO((await client.get(inpainted["inputs"]["mask"])).content))
    assert edited["status"] == "succeeded" and edited["kind"] == "edit" and edited["params"]["strength"] == 0.6
    assert edited["params"]["width"] > edited["params"]["height"]  # the photo's shape is kept
    assert inpainted["status"] == "succeeded" and inpainted["kind"] == "inpaint"
    assert mask.getpixel((2, 30)) == 255 and mask.getpixel((60, 30)) == 0  # white = repaint, as sent


async def test_outpaint_takes_a_command_upload_or_its_json_fields(server, generator) -> None:
    token = await server.new_key()
    async with server.client(token) as client, running_worker(server.core, generator):
        typed = await client.post("/v1/jobs", data={"command": "/outpaint a lake --zoom 2 --steps 2"},
                                  files={"image": ("photo.png", png_bytes(64, 64, (20, 40, 220)), "image/png")})
        fields = await client.post("/v1/jobs", json={"kind": "outpaint", "prompt": "a lake", "left": 32, "up": 8,
                                                     "steps": 2, "image": b64(png_bytes(64, 64))})
        assert typed.status_code == 202, typed.text
        assert fields.status_code == 202, fields.text
        zoomed, widened = [await wait_done(client, r.json()["id"]) for r in (typed, fields)]
        picture = Image.open(io.BytesIO((await client.get(zoomed["images"][0]["url"])).content))
    assert zoomed["kind"] == "outpaint" and (zoomed["params"]["width"], zoomed["params"]["height"]) == (128, 128)
    assert picture.convert("RGB").getpixel((64, 64)) == (20, 40, 220)  # the picture, kept, in the middle
    assert (widened["params"]["width"], widened["params"]["height"]) == (96, 72)


async def test_re_roll_variations_and_upscale_make_new_jobs_from_a_result(server, generator) -> None:
    token = await server.new_key()
    async with server.client(token) as client, running_worker(server.core, generator):
        # 4 steps: an upscale repaints 35% of them, and img2img needs at least one step to run.
        first = await submit_and_wait(client, "/imagine a cat --steps 4")
        rerolled = await client.post(f"/v1/jobs/{first['id']}/reroll")
        varied = await client.post(f"/v1/jobs/{first['id']}/variations", json={"index": 0})
        upscaled = await client.post(f"/v1/jobs/{first['id']}/upscale", json={"index": 0})
        missing = await client.post(f"/v1/jobs/{first['id']}/variations", json={"index": 3})
        assert rerolled.status_code == varied.status_code == upscaled.status_code == 202
        rerolled, varied, upscaled = [await wait_done(client, r.json()["id"]) for r in (rerolled, varied, upscaled)]
        source, varied_from = [Image.open(io.BytesIO((await client.get(url)).content))
                               for url in (first["images"][0]["url"], varied["inputs"]["image"])]
    assert rerolled["prompt"] == "a cat" and rerolled["kind"] == "imagine" and rerolled["seeds"] != first["seeds"]
    assert varied["kind"] == "edit" and (np.asarray(varied_from) == np.asarray(source.convert("RGB"))).all()
    assert (upscaled["params"]["width"], upscaled["params"]["height"]) == (128, 128)
    assert all(job["status"] == "succeeded" for job in (rerolled, varied, upscaled))
    assert missing.status_code == 400 and "no image 4" in missing.json()["message"]


async def test_reframe_zooms_out_or_pans_an_image_of_a_result(server, generator) -> None:
    token = await server.new_key()
    async with server.client(token) as client, running_worker(server.core, generator):
        first = await submit_and_wait(client, "/imagine a cat --steps 2")
        zoomed = await client.post(f"/v1/jobs/{first['id']}/reframe", json={"index": 0, "action": "zoom15"})
        panned = await client.post(f"/v1/jobs/{first['id']}/reframe", json={"action": "up"})
        unknown = await client.post(f"/v1/jobs/{first['id']}/reframe", json={"action": "sideways"})
        assert zoomed.status_code == panned.status_code == 202, (zoomed.text, panned.text)
        zoomed, panned = [await wait_done(client, r.json()["id"]) for r in (zoomed, panned)]
    assert zoomed["kind"] == panned["kind"] == "outpaint" and zoomed["prompt"] == "a cat"
    assert (zoomed["params"]["width"], zoomed["params"]["height"]) == (96, 96)  # 64 x 1.5 each way
    assert (panned["params"]["width"], panned["params"]["height"]) == (64, 96)  # half the height above
    assert all(job["status"] == "succeeded" for job in (zoomed, panned))
    assert unknown.status_code == 422 and "zoom15" in unknown.text


async def test_an_animation_links_its_clip_beside_its_poster(server, generator) -> None:
    """As an MP4, and as a GIF for clients that show pictures but play no video."""
    import av

    token = await server.new_key()
    async with server.client(token) as client, running_worker(server.core, generator):
        job = await submit_and_wait(client, "/animate a cat --frames 4 --fps 4 --zoom 1.1 --steps 4")
        clip = await client.get(job["video"])
        gif = await client.get(job["gif"])
        poster = await client.get(job["images"][0]["url"])
    assert job["kind"] == "animate" and job["status"] == "succeeded" and len(job["images"]) == 1
    assert clip.status_code == 200 and clip.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(clip.content)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (64, 64, 3)
    assert poster.status_code == 200  # the last frame, the clip's picture
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    with Image.open(io.BytesIO(gif.content)) as animation:
        assert (animation.n_frames, animation.size, animation.info["loop"]) == (4, (64, 64), 0)
        animation.seek(3)  # its last frame is the poster
        last = np.asarray(animation.convert("RGB"), dtype=int)
    assert np.abs(last - np.asarray(Image.open(io.BytesIO(poster.content)).convert("RGB"), dtype=int)).mean() < 8


async def test_a_dry_run_validates_and_prices_without_queuing(server) -> None:
    token = await server.new_key()
    async with server.client(token) as client:
        dry = await client.post("/v1/jobs?dry_run=true", json={"command": "/imagine a cat --ar 16:9 --n 2"})
        bad = await client.post("/v1/jobs?dry_run=true", json={"command": "/imagine a cat --steps 500"})
        jobs = (await client.get("/v1/jobs")).json()
        quota = (await client.get("/v1/quota")).json()
    assert dry.status_code == 200, dry.text
    result = dry.json()
    assert result["valid"] is True and result["images"] == 2 and result["cost_units"] > 0
    assert result["params"]["width"] > result["params"]["height"] and result["position"] == 1
    assert bad.status_code == 400 and "--steps must be a whole number from 1 to 50" in bad.json()["message"]
    assert jobs == [] and quota["used"] == 0


class Receiver:
    """A local webhook endpoint that fails the first `failures` calls with 500."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()

    async def hook(self, request: Request) -> Response:
        self.calls.append((dict(request.headers), await request.body()))
        if len(self.calls) <= self.failures:
            return Response("down for maintenance", status_code=500)
        self.arrived.set()
        return Response(status_code=204)


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/hook", receiver.hook, methods=["POST"])]),
                                           log_level="warning", lifespan="off",
                                           # Easel's webhook client may keep its connection open: without a
                                           # bound, uvicorn waits for it to close for ever (seen once in 700).
                                           timeout_graceful_shutdown=3))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        server.should_exit = True
        await task


async def test_the_completion_webhook_is_signed_and_retried_until_it_lands(server, generator) -> None:
    token = await server.new_key()
    secret = "whsec-0123456789abcdef"
    receiver = Receiver(failures=2)
    async with receiving(receiver) as url, server.client(token) as client, running_worker(server.core, generator):
        job = (await client.post("/v1/jobs", json={"command": "/imagine a cat --steps 2",
                                                   "webhook": {"url": url, "secret": secret}})).json()
        await asyncio.wait_for(receiver.arrived.wait(), timeout=60)
        for _ in range(100):  # marked delivered right after the receiver's answer
            if (await server.core.service.get_job(job["id"])).delivered_at is not None:
                break
            await asyncio.sleep(0.05)
    assert [headers["easel-delivery-attempt"] for headers, _ in receiver.calls] == ["1", "2", "3"]
    headers, body = receiver.calls[-1]
    timestamp, _, signature = headers["easel-signature"].partition(",v1=")
    expected = hmac.new(secret.encode(), f"{timestamp.removeprefix('t=')}.".encode() + body, hashlib.sha256)
    assert hmac.compare_digest(signature, expected.hexdigest())
    wrong = hmac.new(b"not-the-secret-at-all", f"{timestamp.removeprefix('t=')}.".encode() + body, hashlib.sha256)
    assert signature != wrong.hexdigest()
    payload = json.loads(body)
    assert payload["event"] == "job.done" and headers["easel-event"] == "job.done"
    assert payload["job"]["id"] == job["id"] and payload["job"]["images"][0]["url"].startswith("http://127.0.0.1:")
    assert (await server.core.service.get_job(job["id"])).delivered_at is not None


async def test_webhooks_to_private_addresses_are_refused_unless_allowed(server) -> None:
    server.core.settings.http.allow_private_webhooks = False
    token = await server.new_key()
    async with server.client(token) as client:
        response = await client.post("/v1/jobs", json={"command": "/imagine a cat", "webhook": {
            "url": "http://127.0.0.1:9/hook", "secret": "0123456789abcdef"}})
        short = await client.post("/v1/jobs", json={"command": "/imagine a cat", "webhook": {
            "url": "https://example.com/hook", "secret": "short"}})
    assert response.status_code == 400 and "non-public address" in response.json()["message"]
    assert short.status_code == 422 and "webhook.secret" in short.json()["message"]


async def test_auth_failures_are_401_and_other_keys_jobs_are_not_found(server) -> None:
    alice, bob = await server.new_key("alice"), await server.new_key("bob")
    async with server.client() as anonymous, server.client("esk_not-a-real-key") as forged, \
            server.client(alice) as as_alice, server.client(bob) as as_bob:
        missing = await anonymous.post("/v1/jobs", json={"command": "/imagine a cat"})
        wrong = await forged.get("/v1/quota")
        job = (await as_alice.post("/v1/jobs", json={"command": "/imagine a cat"})).json()
        peeked = await as_bob.get(f"/v1/jobs/{job['id']}")
        streamed = await as_bob.get(f"/v1/jobs/{job['id']}/events")
        cancelled = await as_bob.delete(f"/v1/jobs/{job['id']}")
        rerolled = await as_bob.post(f"/v1/jobs/{job['id']}/reroll")
        still = await as_alice.get(f"/v1/jobs/{job['id']}")
    assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer" and "apikey create" in missing.json()["message"]
    assert wrong.status_code == 401 and "esk_not-a-real-key" not in wrong.text
    for response in (peeked, streamed, cancelled, rerolled):
        assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert still.json()["status"] == "queued"


def _text_file() -> dict:
    return {"files": {"image": ("notes.png", b"just some text\n", "image/png")},
            "data": {"command": "/edit winter"}}


BAD_PAYLOADS = [  # (request, status, code, words the message must contain)
    ({"json": {"kind": "imagine", "prompt": "a cat", "steps": "many"}}, 422, "invalid_command", "steps"),
    ({"json": {"kind": "imagine", "prompt": "a cat", "n": [2]}}, 422, "invalid_command", "n"),
    ({"json": {"kind": "paint", "prompt": "a cat"}}, 422, "invalid_command", "kind"),
    ({"json": {"command": "/imagine a cat", "colour": "red"}}, 422, "invalid_command", "colour: unknown field"),
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422, "invalid_command",
     "not valid JSON"),
    ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "invalid_command", "application/json"),
    ({"json": {"command": "/imagine a cat --steps 500"}}, 400, "invalid_command", "--steps must be a whole number"),
    ({"json": {"command": "/imagine a cat", "prompt": "a dog"}}, 400, "invalid_command", "not both"),
    ({"json": {"prompt": "a dog"}}, 400, "invalid_command", "`kind`"),
    ({"json": {}}, 400, "invalid_command", "(imagine, edit, inpaint, outpaint, animate, upscale)"),  # every kind
    ({"json": {"command": "/quota"}}, 400, "invalid_command", "GET /v1/quota"),
    ({"json": {"command": "/edit winter", "image": "!!!not base64!!!"}}, 400, "invalid_image", "not valid base64"),
    ({"json": {"command": "/edit winter", "image": "A" * (MAX_UPLOAD * 2)}}, 413, "invalid_image", "over"),
    ({"json": {"command": "/edit winter", "image": b64(b"just some text\n")}}, 400, "invalid_image", "not a PNG"),
    (_text_file(), 400, "invalid_image", "not a PNG"),
    ({"files": {"image": ("big.png", b"\x89PNG" + b"0" * MAX_UPLOAD, "image/png")}, "data": {"command": "/edit x"}},
     413, "invalid_image", "over"),
    ({"json": {"command": "/inpaint a door", "image": b64(png_bytes()), "mask": b64(mask_bytes(128, 64))}},
     400, "invalid_image", "aspect ratio"),
]


async def test_bad_payloads_get_a_4xx_with_a_code_and_the_server_keeps_serving(server) -> None:
    token = await server.new_key()
    async with server.client(token) as client:
        for request_kwargs, status, code, expected in BAD_PAYLOADS:
            response = await client.post("/v1/jobs", **request_kwargs)
            assert (response.status_code, response.json()["code"]) == (status, code), (request_kwargs, response.text)
            assert expected in response.json()["message"], (request_kwargs, response.text)
        assert (await client.get("/v1/jobs")).json() == []
        assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_oversize_bodies_are_refused_before_they_are_read(server) -> None:
    token = await server.new_key()
    async with server.client(token) as client:
        response = await client.post("/v1/jobs", content=b"x" * (MAX_UPLOAD * 4), headers={
            "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["code"] == "invalid_image"


async def test_quota_models_help_health_metrics_and_openapi(server, generator) -> None:
    token = await server.new_key()
    async with server.client(token) as client:
        async with running_worker(server.core, generator):
            await submit_and_wait(client, "/imagine a cat --steps 2")
        (await client.post("/v1/jobs", json={"command": "/imagine a dog"})).raise_for_status()  # stays queued
        quota = (await client.get("/v1/quota")).json()
        models = (await client.get("/v1/models")).json()
        help_text = (await client.get("/v1/help")).json()["text"]
        metrics = (await client.get("/metrics"))
        openapi = (await client.get("/openapi.json")).json()
        unknown = await client.get("/v1/nothing-here")
    assert quota["images"]["used"] == 2 and quota["used"] > 0 and "units left today" in quota["text"]
    assert models["data"] == [{"id": "tiny", "object": "model", "created": 0, "owned_by": "easel", "default": True,
                               "default_width": 64, "default_height": 64, "family": "sd1", "family_name": "SD 1.x",
                               "defaults": {"steps": 20, "cfg": 7.0, "sampler": "euler", "negative_prompt": ""},
                               "description": "untrained, draws noise: for testing Easel itself", "origin": "config"}]
    assert models["object"] == "list" and models["refused"] == [] and "tiny (default)  SD 1.x" in models["text"]
    assert "/imagine" in help_text and "--steps N" in help_text
    lines = metrics.text.splitlines()
    assert metrics.headers["content-type"].startswith("text/plain")
    # prometheus_client writes every sample as a float: 1 is "1.0".
    assert "easel_queue_length 1.0" in lines and 'easel_jobs{status="succeeded"} 1.0' in lines
    assert "easel_generation_seconds_count 1.0" in lines
    assert float(next(line.split()[1] for line in lines if line.startswith("easel_worker_busy_ratio "))) > 0
    assert float(next(line.split()[1] for line in lines if line.startswith("easel_images_per_second "))) > 0
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/images/{sha256}", "/v1/quota",
            "/v1/models", "/healthz", "/metrics"} <= set(openapi["paths"])
    assert "multipart/form-data" in openapi["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"


async def test_web_sessions_give_each_browser_a_key_unless_turned_off(server) -> None:
    async with server.client() as client:
        session = await client.post("/v1/sessions")
        token = session.json()["token"]
        quota = await client.get("/v1/quota", headers={"Authorization": f"Bearer {token}"})
        server.core.settings.http.web_sessions = False
        refused = await client.post("/v1/sessions")
        page = await client.get("/")
    assert session.status_code == 201 and token.startswith("esk_") and quota.status_code == 200
    assert refused.status_code == 403 and "apikey create" in refused.json()["message"]
    assert page.status_code == 200 and "<title>Easel</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


async def test_apikey_create_prints_a_key_once_with_its_own_daily_image_limit(
        server, settings, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EASEL_STORAGE__DATA_DIR", str(settings.storage.data_dir))
    monkeypatch.setenv("EASEL_STORAGE__MODELS_DIR", str(settings.storage.models_dir))
    assert await asyncio.to_thread(main, ["apikey", "create", "--name", "support-bot", "--quota", "2"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("esk_") and "support-bot" in err and token not in err
    async with server.client(token) as client:
        first = await client.post("/v1/jobs", json={"command": "/imagine a cat --n 2"})
        over = await client.post("/v1/jobs", json={"command": "/imagine a cat"})
    assert first.status_code == 202
    assert over.status_code == 429 and over.json()["code"] == "quota_exceeded" and "2 of 2" in over.json()["message"]


async def test_easel_serve_runs_the_http_adapter_when_no_chat_platform_is_configured(core) -> None:
    from adapters.cli import configured_adapters
    from adapters.http import HttpAdapter

    assert [type(adapter) for adapter in configured_adapters(core)] == [HttpAdapter]
    core.settings.http.enabled = False
    assert configured_adapters(core) == []


async def test_styles_are_listed_and_a_permutation_prompt_answers_with_every_job(server, generator) -> None:
    server.core.settings.storage.styles_path.write_text("name,prompt,negative_prompt\nNight Sky,{prompt} at night,"
                                                        "day\n", encoding="utf-8")
    token = await server.new_key()
    async with server.client(token) as client, running_worker(server.core, generator):
        styles = (await client.get("/v1/styles")).json()
        response = await client.post("/v1/jobs", json={
            "command": "/imagine a {red, green} fox --style night_sky --steps 2 --seed 5"})
        assert response.status_code == 202, response.text
        first = response.json()
        done = [await wait_done(client, job["id"]) for job in (first, *first["others"])]
    assert styles["styles"] == [{"name": "Night Sky", "flag": "night_sky", "prompt": "{prompt} at night",
                                 "negative_prompt": "day"}]
    assert styles["text"].splitlines()[1] == "  night_sky: {prompt} at night  (not: day)"
    assert [(job["prompt"], job["negative"], job["seeds"], job["status"]) for job in done] == [
        ("a red fox at night", "day", [5], "succeeded"), ("a green fox at night", "day", [6], "succeeded")]
