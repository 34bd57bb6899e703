"""The AUTOMATIC1111 API (/sdapi/v1) as its users reach it: the real `webuiapi` client (what A1111 scripts
use) against Easel's app under uvicorn, with the real builtin:tiny worker. webuiapi is synchronous
(requests), so each call runs on a thread while the server and the worker run on the event loop."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image

from bot.apikeys import PLATFORM
from bot.config import GenerationConfig, ModelConfig, Settings, load_settings
from bot.domain import JobStatus
from bot.events import EventKind
from tests import http_fixtures
from tests.conftest import mask_bytes
from tests.http_fixtures import MAX_UPLOAD, running_worker

server = http_fixtures.server  # this module's server, on its own settings below

MODELS = {"tiny": {"source": "builtin:tiny", "default_width": 64, "default_height": 64},
          "sketch": {"source": "builtin:tiny", "default_width": 64, "default_height": 64}}
TIERS = {"user": {}, "owner": {"daily_units": float("inf"), "per_minute_units": float("inf")},
         # 64x64 at 3 steps costs 0.003 units: one such image fits in a day on this tier, two do not.
         "lan": {"daily_units": 0.005, "per_minute_units": 5}}


@pytest.fixture
def settings(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, data_dir: Path,
             models_dir: Path) -> Settings:
    """Two models, live previews every step, the image check as the test's parameter says (default off)."""
    monkeypatch.setenv("EASEL_MODELS", json.dumps(MODELS))
    return load_settings(None, storage={"data_dir": data_dir, "models_dir": models_dir},
                         generation={"poll_interval_ms": 50, "progress_every_s": 0, "previews": True,
                                     "preview_every_steps": 1},
                         limits={"max_upload_bytes": MAX_UPLOAD}, http={"port": 0},
                         safety={"image_checker": getattr(request, "param", "none")}, quota={"tiers": TIERS})


@pytest.fixture(scope="module")
def generator(models_dir: Path):
    """The real diffusers generator on both models, with live previews every step."""
    from generation.pipelines import DiffusersGenerator

    return DiffusersGenerator({name: ModelConfig(**model) for name, model in MODELS.items()}, device="cpu",
                              dtype="float32", cache_dir=models_dir,
                              options=GenerationConfig(previews=True, preview_every_steps=1))


class HeldAfterFirstStep:
    """The real generator, paused after its first step (once that step's progress is reported) until
    `release` is set: the job is then running, for as long as the test needs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.release = threading.Event()

    def generate(self, tasks, on_step=None):
        def held(step: int, total: int, *previews: Any) -> None:
            on_step(step, total, *previews)
            if step == 1:
                self.release.wait(120)

        return self.inner.generate(tasks, held)

    def warm(self, model_name: str) -> None:
        self.inner.warm(model_name)


async def webui(server, password: str | None = None) -> webuiapi.WebUIApi:
    """webuiapi's client for this server, as a script makes it: the key as the Basic password."""
    return await asyncio.to_thread(webuiapi.WebUIApi, baseurl=f"{server.url}/sdapi/v1", username="easel",
                                   password=password, sampler="Euler", steps=3)


async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(method, *args, **kwargs)


async def first_event(core, kind: EventKind):
    """The first event of this kind on the HTTP API's jobs (waits for it)."""
    async for event in core.bus.follow(PLATFORM, after_id=0):
        if event.kind is kind:
            return event
    raise AssertionError("the event stream ended")


def png_of(result: webuiapi.WebUIApiResult, index: int = 0) -> bytes:
    return base64.b64decode(result.json["images"][index])


SMALL = {"width": 64, "height": 64, "steps": 3}


async def test_txt2img_answers_with_the_images_the_request_and_info_in_a1111s_shapes(server, generator) -> None:
    api = await webui(server, await server.new_key())
    async with running_worker(server.core, generator):
        result = await call(api.txt2img, prompt="a lighthouse at dusk", negative_prompt="fog", seed=42,
                            batch_size=2, cfg_scale=6.5, sampler_name="Euler a", **SMALL)
        random = await call(api.txt2img, prompt="a lighthouse at dusk", seed=-1, **SMALL)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.info["seed"] == 42 and result.info["all_seeds"] == [42, 43]
    assert result.info["sampler_name"] == "Euler a" and result.info["cfg_scale"] == 6.5
    assert result.parameters["prompt"] == "a lighthouse at dusk" and result.parameters["batch_size"] == 2
    # Each infotext is the PNG's own `parameters` chunk, as A1111 writes both.
    assert [image.info["parameters"] for image in result.images] == result.info["infotexts"]
    assert result.info["infotexts"][1].startswith("a lighthouse at dusk\nNegative prompt: fog\nSteps: 3, "
                                                  "Sampler: Euler a, CFG scale: 6.5, Seed: 43, Size: 64x64")
    assert random.info["seed"] != -1 and random.info["all_seeds"] == [random.info["seed"]]
    job = (await server.core.service.get_job(result.info["job_id"]))
    assert job.params.sampler == "euler_a" and job.params.n == 2 and job.params.negative == "fog"


async def test_the_same_request_with_a_fixed_seed_gives_the_same_png_bytes(server, generator) -> None:
    api = await webui(server, await server.new_key())
    async with running_worker(server.core, generator):
        first = await call(api.txt2img, prompt="a red fox", seed=7, **SMALL)
        second = await call(api.txt2img, prompt="a red fox", seed=7, **SMALL)
        other = await call(api.txt2img, prompt="a red fox", seed=8, **SMALL)
    assert png_of(first) == png_of(second) and png_of(first) != png_of(other)


async def test_img2img_edits_and_with_a_mask_repaints_only_the_white_part(server, generator) -> None:
    api = await webui(server, await server.new_key())
    red = Image.new("RGB", (64, 64), (200, 30, 30))
    left_half = Image.open(io.BytesIO(mask_bytes()))  # white (repaint) on the left
    async with running_worker(server.core, generator):
        edited = await call(api.img2img, images=[red], prompt="make it winter", denoising_strength=0.5, seed=5,
                            **(SMALL | {"steps": 4}))
        inpainted = await call(api.img2img, images=[red], mask_image=left_half, prompt="a door", seed=5,
                               inpainting_fill=1, mask_blur=4, **(SMALL | {"steps": 4}))
        inverted = await call(api.img2img, images=[red], mask_image=left_half, prompt="a door", seed=5,
                              inpainting_mask_invert=1, **(SMALL | {"steps": 4}))
    assert edited.image.size == (64, 64) and edited.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in edited.info["infotexts"][0]
    assert edited.parameters["init_images"] is None  # not echoed back unless include_init_images asks
    kept_right, kept_left = inpainted.image.convert("RGB"), inverted.image.convert("RGB")
    assert kept_right.getpixel((60, 32)) == (200, 30, 30) != kept_right.getpixel((3, 32))
    assert kept_left.getpixel((3, 32)) == (200, 30, 30) != kept_left.getpixel((60, 32))
    kinds = [job.params.kind.value for job in await server.core.service.list_jobs()]
    assert kinds == ["inpaint", "inpaint", "edit"]


async def test_options_set_the_model_per_key_and_a_request_may_override_it(server, generator) -> None:
    api = await webui(server, await server.new_key("alice"))
    other = await webui(server, await server.new_key("bob"))
    assert await call(api.util_get_model_names) == ["sketch", "tiny"]
    assert (await call(api.get_options))["sd_model_checkpoint"] == "tiny"
    await call(api.util_set_model, "sketch")  # GET sd-models, then POST options, as webuiapi does it
    assert await call(api.util_get_current_model) == "sketch"
    assert (await call(other.get_options))["sd_model_checkpoint"] == "tiny"  # each key has its own
    refused = await call(api.set_options, {"sd_model_checkpoint": "sdxl-turbo"})
    assert "sdxl-turbo" in refused["detail"] and "tiny" in refused["detail"]
    assert await call(api.util_get_current_model) == "sketch"
    async with running_worker(server.core, generator):
        remembered = await call(api.txt2img, prompt="a cat", seed=1, **SMALL)
        overridden = await call(api.txt2img, prompt="a cat", seed=1, override_settings={"sd_model_checkpoint": "tiny"},
                                **SMALL)
    assert remembered.info["sd_model_name"] == "sketch" and "Model: sketch" in remembered.info["infotexts"][0]
    assert overridden.info["sd_model_name"] == "tiny"


async def test_the_lists_a1111_clients_read(server) -> None:
    api = await webui(server, await server.new_key())
    samplers = await call(api.util_get_sampler_names)
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC"} <= set(samplers)
    assert await call(api.util_get_scheduler_names) == ["automatic", "karras"]
    assert [model["title"] for model in await call(api.get_sd_models)] == ["tiny", "sketch"]
    for empty in (api.get_loras, api.get_prompt_styles, api.get_upscalers, api.get_latent_upscale_modes,
                  api.get_sd_vae):
        assert await call(empty) == []
    assert await call(api.get_scripts) == {"txt2img": [], "img2img": []}
    assert await call(api.custom_get, "extensions", baseurl=True) == []


@pytest.mark.parametrize(("settings", "preview_shown"), [("none", True), ("diffusers", False)],
                         indirect=["settings"])
async def test_progress_shows_the_running_job_and_a_preview_only_where_it_may(
        server, generator, flag_all_checker, preview_shown: bool) -> None:
    """With the image check on (and NSFW not allowed, as for every API key), the final image might be
    withheld, so no preview of it may be shown before."""
    api = await webui(server, await server.new_key())
    assert (await call(api.get_progress))["state"]["job_count"] == 0
    held = HeldAfterFirstStep(generator)
    async with running_worker(server.core, held, None if preview_shown else flag_all_checker):
        try:
            answer = asyncio.create_task(call(api.txt2img, prompt="a statue", seed=3, **SMALL))
            await first_event(server.core, EventKind.PROGRESS)
            progress = await call(api.get_progress)
        finally:
            held.release.set()
        await answer
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 3
    assert progress["state"]["sampling_step"] == 1 and 0 < progress["progress"] < 1
    assert progress["textinfo"].endswith("step 1 of 3")
    if preview_shown:
        with Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))) as preview:
            assert preview.size[0] > 0
    else:
        assert progress["current_image"] is None


async def test_interrupt_cancels_the_running_job_and_its_answer_has_no_images(server, generator) -> None:
    api = await webui(server, await server.new_key())
    held = HeldAfterFirstStep(generator)
    async with running_worker(server.core, held):
        try:
            answer = asyncio.create_task(call(api.txt2img, prompt="a long one", seed=3, **SMALL))
            started = await first_event(server.core, EventKind.STARTED)
            assert await call(api.interrupt) == {}
            result = await answer
        finally:
            held.release.set()
    assert result.images == [] and result.info["job_id"] == started.job_id
    assert (await server.core.service.get_job(started.job_id)).status is JobStatus.CANCELLED
    assert await call(api.skip) == {}  # nothing left to skip: answered all the same, as A1111 does


async def test_png_info_reads_back_what_txt2img_wrote(server, generator) -> None:
    api = await webui(server, await server.new_key())
    async with running_worker(server.core, generator):
        made = await call(api.txt2img, prompt="a bowl of ramen, studio photo", negative_prompt="text", seed=11,
                          sampler_name="DPM++ 2M", scheduler="Karras", **SMALL)
    read = await call(api.png_info, made.image)
    assert read.info == made.info["infotexts"][0]
    assert read.parameters["Prompt"] == "a bowl of ramen, studio photo"  # the comma survives the round trip
    assert (read.parameters["Negative prompt"], read.parameters["Seed"]) == ("text", "11")
    assert (read.parameters["Sampler"], read.parameters["Size-1"]) == ("DPM++ 2M Karras", "64")


async def test_a_key_is_required_as_the_basic_password_or_a_bearer_token(server) -> None:
    token = await server.new_key()
    nobody = await webui(server)
    with pytest.raises(RuntimeError) as refused:
        await call(nobody.txt2img, prompt="a cat", **SMALL)
    assert refused.value.args[0] == 401 and "HTTP Basic password" in refused.value.args[1]
    async with httpx.AsyncClient(base_url=f"{server.url}/sdapi/v1") as client:
        missing = await client.get("/sd-models")
        blank = await client.get("/sd-models", auth=("", ""))  # a client whose auth field was left empty
        wrong = await client.get("/sd-models", auth=("easel", "esk_not-a-real-key"))
        basic = await client.get("/sd-models", auth=("any-name", token))
        bearer = await client.get("/sd-models", headers={"Authorization": f"Bearer {token}"})
    assert missing.status_code == blank.status_code == wrong.status_code == 401
    assert missing.json()["error"] == "unauthorized" and "easel apikey create" in missing.json()["detail"]
    assert set(missing.json()) == {"error", "detail", "body", "errors"}  # A1111's error shape
    assert "esk_not-a-real-key" not in wrong.text
    assert basic.status_code == bearer.status_code == 200


async def test_keyless_requests_are_served_only_when_configured_as_one_user_on_their_tier(
        server, generator) -> None:
    nobody = await webui(server)
    assert (await call(nobody.get_options))["error"] == "unauthorized"
    server.core.settings.http.a1111_anonymous_tier = "lan"
    async with running_worker(server.core, generator):
        served = await call(nobody.txt2img, prompt="a cat", seed=1, **SMALL)
        with pytest.raises(RuntimeError) as over_quota:  # the same user again: the "lan" tier's day is spent
            await call(nobody.txt2img, prompt="a dog", seed=2, **SMALL)
    async with httpx.AsyncClient(base_url=f"{server.url}/sdapi/v1") as client:
        blank = await client.get("/options", auth=("", ""))  # a client whose auth field was left empty
    assert len(served.images) == 1 and blank.status_code == 200
    assert over_quota.value.args[0] == 429 and "(lan tier)" in over_quota.value.args[1]
    [job] = await server.core.service.list_jobs()
    assert (job.platform, job.user_id) == ("http", "a1111-anonymous")
    wrong = await webui(server, "esk_not-a-real-key")  # a wrong key is refused, not taken as anonymous
    assert (await call(wrong.get_options))["error"] == "unauthorized"


BAD_REQUESTS = [  # (fields, what the one-line message must say)
    ({"sampler_name": "Euler Turbo"}, "sampler_name 'Euler Turbo' is not one of Easel's samplers: Euler, Euler a"),
    ({"sampler_name": "Euler", "scheduler": "Karras"}, "scheduler 'karras' goes with DPM++ 2M only"),
    ({"batch_size": 3, "n_iter": 2}, "batch_size × n_iter is 3 × 2 = 6 images; a request makes 1 to 4"),
    ({"width": 65}, "width and height must be multiples of 8 (got 65x64); try 64x64"),
    ({"steps": 500}, "steps must be a whole number from 1 to 50 (got 500)"),
    ({"cfg_scale": 35}, "cfg_scale must be a number from 1 to 20"),
    ({"prompt": "  "}, "prompt is empty"),
    ({"override_settings": {"sd_model_checkpoint": "sdxl"}}, "sd_model_checkpoint 'sdxl' is not one of"),
]


async def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(server, generator) -> None:
    api = await webui(server, await server.new_key())
    for fields, message in BAD_REQUESTS:
        with pytest.raises(RuntimeError) as refused:
            await call(api.txt2img, **{"prompt": "a cat", **SMALL, **fields})
        status, body = refused.value.args
        assert status == 400 and message in json.loads(body)["detail"], (fields, body)
    async with httpx.AsyncClient(base_url=f"{server.url}/sdapi/v1", auth=("easel", api.session.auth[1])) as client:
        typed = await client.post("/txt2img", json={"prompt": "a cat", "steps": "many"})
        pictureless = await client.post("/img2img", json={"prompt": "a cat", "init_images": []})
        promptless = await client.post("/txt2img", json={"steps": 3})
    assert typed.status_code == 422 and "steps" in typed.json()["detail"]
    assert pictureless.status_code == 422 and "init_images: List should have at least 1 item" in \
        pictureless.json()["detail"]
    assert promptless.status_code == 422 and "prompt: Field required" in promptless.json()["detail"]
    async with running_worker(server.core, generator):
        assert len((await call(api.txt2img, prompt="a cat", **SMALL)).images) == 1


@pytest.mark.parametrize("settings", ["diffusers"], indirect=True)
async def test_a_withheld_image_is_never_returned_only_the_notice(server, generator, flag_all_checker) -> None:
    api = await webui(server, await server.new_key())
    async with running_worker(server.core, generator, flag_all_checker):
        result = await call(api.txt2img, prompt="a statue", seed=9, **SMALL)
    assert result.images == [] and result.info["infotexts"] == []
    assert "Image 1 was withheld" in result.info["withheld"][0] and result.info["all_seeds"] == [9]
    stored = (await server.core.service.get_job(result.info["job_id"])).images[0]
    assert stored.sha256 not in json.dumps(result.json)


async def test_a_job_longer_than_the_wait_answers_with_its_id_and_goes_on(server) -> None:
    api = await webui(server, await server.new_key())
    server.core.settings.http.a1111_wait_s = 0.2  # and no worker runs: the job stays queued
    with pytest.raises(RuntimeError) as late:
        await call(api.txt2img, prompt="a cat", **SMALL)
    assert late.value.args[0] == 504 and "http.a1111_wait_s" in late.value.args[1]
    [job] = await server.core.service.list_jobs()
    assert f"Job {job.id} is still queued" in late.value.args[1] and job.status is JobStatus.QUEUED
