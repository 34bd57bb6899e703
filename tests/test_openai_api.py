"""The OpenAI Images API as its users reach it: the real `openai` SDK against the real server (uvicorn on
127.0.0.1, the builtin:tiny worker, SQLite), base URL http://HOST:PORT/v1 and an Easel API key."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from tests import http_fixtures
from tests.conftest import png_bytes
from tests.http_fixtures import Server, running_worker, wait_done

settings, server = http_fixtures.settings, http_fixtures.server  # this module's fixtures


def sdk(server: Server, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=token)


def picture(encoded: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def openai_mask(width: int = 64, height: int = 64) -> bytes:
    """OpenAI's convention: the left half transparent (repaint), the right half opaque (keep)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_generate_answers_with_the_images_as_base64_or_links(server: Server, generator) -> None:
    token = await server.new_key()
    client = sdk(server, token)
    async with running_worker(server.core, generator):
        # Open WebUI and LibreChat send OpenAI's model names; Easel flags in the prompt work too.
        result = await client.images.generate(model="dall-e-3", prompt="a red fox --steps 2 --seed 7", n=2,
                                              size="64x64", quality="hd", style="vivid")
        linked = await client.images.generate(model="tiny", prompt="a blue fox --steps 2", size="auto",
                                              response_format="url")

    images = [picture(item.b64_json) for item in result.data]
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))  # seeds 7 and 8
    assert [item.revised_prompt for item in result.data] == ["a red fox"] * 2
    assert result.size == "64x64" and result.output_format == "png"
    [job] = [job for job in await server.core.service.list_jobs() if job.id == result.easel["job_id"]]
    assert (job.params.model, job.params.steps, job.params.n, job.seeds) == ("tiny", 2, 2, [7, 8])

    [item] = linked.data
    assert item.b64_json is None and item.url.startswith(f"{server.url}/v1/images/")
    async with server.client() as browser:  # the link needs no key, like every image link
        downloaded = await browser.get(item.url)
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(downloaded.content)).size == (64, 64)


async def test_edit_repaints_the_transparent_part_of_the_mask_and_keeps_the_rest(server: Server, generator) -> None:
    token = await server.new_key()
    client = sdk(server, token)
    photo, other = png_bytes(64, 64, (30, 160, 60)), png_bytes(64, 64, (20, 20, 200))
    async with running_worker(server.core, generator):
        # `image[]` with two pictures: the first is the one edited.
        inpainted = await client.images.edit(image=[("photo.png", photo, "image/png"),
                                                    ("other.png", other, "image/png")],
                                             mask=("mask.png", openai_mask(), "image/png"),
                                             prompt="a red door --steps 5 --seed 3", model="gpt-image-1")
        redrawn = await client.images.edit(image=("photo.png", photo, "image/png"), prompt="a forest --steps 4")
        with pytest.raises(openai.BadRequestError) as opaque:
            await client.images.edit(image=("photo.png", photo, "image/png"), prompt="a door",
                                     mask=("mask.png", png_bytes(64, 64, (255, 255, 255)), "image/png"))

    result, original = pixels(picture(inpainted.data[0].b64_json)), pixels(Image.open(io.BytesIO(photo)))
    kept = np.abs(result[:, 40:] - original[:, 40:]).mean()
    repainted = np.abs(result[:, :24] - original[:, :24]).mean()
    assert kept < repainted / 2
    assert picture(redrawn.data[0].b64_json).size == (64, 64)
    kinds = {job.id: job.params.kind.value for job in await server.core.service.list_jobs()}
    assert kinds[inpainted.easel["job_id"]] == "inpaint" and kinds[redrawn.easel["job_id"]] == "edit"
    assert opaque.value.param == "mask" and "transparent pixels" in opaque.value.message
    assert len(kinds) == 2  # the refused mask queued nothing


# The SDK marks create_variation deprecated (OpenAI retired its own endpoint); clients still call it.
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
async def test_a_variation_is_an_image_to_image_pass_over_the_picture(server: Server, generator) -> None:
    token = await server.new_key()
    client = sdk(server, token)
    async with running_worker(server.core, generator):
        varied = await client.images.create_variation(image=("wide.png", png_bytes(128, 64), "image/png"), n=2)

    assert [picture(item.b64_json).size for item in varied.data] == [(128, 64)] * 2  # the picture's shape
    [job] = await server.core.service.list_jobs()
    assert job.params.kind.value == "edit" and job.params.strength == 0.6 and job.init_image_sha is not None


async def test_models_list_and_retrieve_in_openai_shape(server: Server) -> None:
    client = sdk(server, await server.new_key())
    listed = await client.models.list()
    tiny = await client.models.retrieve("tiny")
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("dall-e-3")

    assert [model.id for model in listed.data] == ["tiny"]
    assert tiny.object == "model" and tiny.owned_by == "easel"
    assert (tiny.model_extra["default"], tiny.model_extra["default_width"]) == (True, 64)
    assert "the models are tiny" in missing.value.message


async def test_bad_requests_are_refused_naming_the_field_and_queue_nothing(server: Server) -> None:
    client = sdk(server, await server.new_key())
    with pytest.raises(openai.BadRequestError) as too_big:
        await client.images.generate(prompt="a fox", size="4096x4096")
    with pytest.raises(openai.BadRequestError) as not_a_size:
        await client.images.generate(prompt="a fox", size="huge")
    with pytest.raises(openai.BadRequestError) as too_many:
        await client.images.generate(prompt="a fox", n=9)
    with pytest.raises(openai.BadRequestError) as unknown_model:
        await client.images.generate(prompt="a fox", model="tinny")
    with pytest.raises(openai.BadRequestError) as unknown_field:
        await client.images.generate(prompt="a fox", extra_body={"colour": "red"})
    with pytest.raises(openai.BadRequestError) as no_prompt:
        await client.images.generate(prompt="  ")
    with pytest.raises(openai.AuthenticationError):
        await sdk(server, "not-a-key").images.generate(prompt="a fox")

    assert too_big.value.param == "size" and "`size` sides must each be from 64 to 1024" in too_big.value.message
    assert not_a_size.value.param == "size" and "WIDTHxHEIGHT" in not_a_size.value.message
    assert too_many.value.param == "n" and "from 1 to 4" in too_many.value.message
    assert unknown_model.value.param == "model" and "one of tiny" in unknown_model.value.message
    assert "`colour`: unknown parameter" in unknown_field.value.message
    # An example the default model (builtin:tiny here) is suggested with, as /imagine's own error does.
    assert no_prompt.value.param == "prompt" and no_prompt.value.message.endswith(
        f'e.g. "{server.core.parser.example_prompts()[0]}"')
    assert await server.core.service.list_jobs() == []


async def test_an_exhausted_quota_is_a_rate_limit_error_saying_when_to_retry(server: Server, generator) -> None:
    client = sdk(server, await server.new_key(daily_images=1))
    async with running_worker(server.core, generator):
        await client.images.generate(prompt="a fox --steps 2")
        with pytest.raises(openai.RateLimitError) as refused:
            await client.images.generate(prompt="another fox --steps 2")

    headers = refused.value.response.headers
    assert "Daily image limit reached" in refused.value.message and refused.value.code == "quota_exceeded"
    assert int(headers["retry-after"]) > 0 and headers["x-should-retry"] == "false"  # hours away: no retry
    assert len(await server.core.service.list_jobs()) == 1


async def test_a_withheld_image_is_never_returned(server: Server, generator, flag_all_checker) -> None:
    client = sdk(server, await server.new_key())
    async with running_worker(server.core, generator, image_checker=flag_all_checker):
        with pytest.raises(openai.BadRequestError) as withheld:
            await client.images.generate(prompt="a statue --steps 2", n=2)

    [job] = await server.core.service.list_jobs()
    assert job.status.value == "succeeded" and len(job.images) == 2  # made, checked, withheld
    assert withheld.value.code == "content_policy_violation"
    assert "Image 1 was withheld" in withheld.value.message and f"/appeal {job.id}" in withheld.value.message
    body = withheld.value.response.text
    for image in job.images:
        stored = Path(image.path).read_bytes()
        assert image.sha256 not in body and base64.b64encode(stored).decode()[:200] not in body


async def test_a_job_that_outlasts_the_wait_is_named_and_still_finishes(server: Server, generator) -> None:
    server.core.settings.http.openai_wait_s = 0.3
    token = await server.new_key()
    client = sdk(server, token)
    with pytest.raises(openai.InternalServerError) as late:  # no worker yet: the job waits in the queue
        await client.images.generate(prompt="a slow fox --steps 2", extra_headers={"Idempotency-Key": "fox-1"})
    [job] = await server.core.service.list_jobs()  # the SDK did not retry and queue a second job
    assert late.value.status_code == 504 and late.value.response.headers["x-should-retry"] == "false"
    assert f"Job {job.id} is still queued" in late.value.message and f"/v1/jobs/{job.id}" in late.value.message

    server.core.settings.http.openai_wait_s = 60
    async with running_worker(server.core, generator), server.client(token) as http:
        done = await wait_done(http, job.id)
        # A retry with the same Idempotency-Key answers with that job's images instead of queuing another.
        retried = await client.images.generate(prompt="a slow fox --steps 2",
                                               extra_headers={"Idempotency-Key": "fox-1"})
    assert done["status"] == "succeeded" and len(done["images"]) == 1
    assert retried.easel["job_id"] == job.id and picture(retried.data[0].b64_json).size == (64, 64)
    assert len(await server.core.service.list_jobs()) == 1
