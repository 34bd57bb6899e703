"""`easel mcp`: an MCP client (the `mcp` SDK's own Client) calls imagine, edit and inpaint and gets the
pictures back, through the real HTTP API (uvicorn on 127.0.0.1) and the real builtin:tiny worker."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sys
from pathlib import Path

import httpx
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from PIL import Image

from adapters.cli import main
from adapters.mcp_server import EaselApi, build_mcp_server, server_limits
from bot.bootstrap import open_core
from bot.config import Settings, load_settings
from bot.domain import SAMPLERS
from generation.worker import Worker
from tests import http_fixtures
from tests.conftest import mask_bytes, png_bytes
from tests.http_fixtures import Server, running_worker, serving

settings, server = http_fixtures.settings, http_fixtures.server  # this module's fixtures


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pictures(result) -> list[Image.Image]:
    """The image content blocks of a tool's answer, decoded: what an assistant shows inline."""
    return [Image.open(io.BytesIO(base64.b64decode(block.data))) for block in result.content if block.type == "image"]


async def tools_for(server: Server) -> tuple[EaselApi, object]:
    api = EaselApi(server.url, await server.new_key("assistant"))
    return api, build_mcp_server(api, await api.limits())


async def test_the_tools_schemas_offer_exactly_what_the_server_allows(server, settings: Settings) -> None:
    _, tools = await tools_for(server)
    async with Client(tools) as client:
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
    imagine, inpaint = listed["imagine"].input_schema, listed["inpaint"].input_schema
    limits = settings.limits
    assert set(listed) == {"imagine", "edit", "inpaint"}
    assert imagine["additionalProperties"] is False and imagine["required"] == ["prompt"]
    assert (imagine["properties"]["steps"]["minimum"], imagine["properties"]["steps"]["maximum"]) == (
        limits.min_steps, limits.max_steps)
    assert (imagine["properties"]["cfg"]["minimum"], imagine["properties"]["cfg"]["maximum"]) == (
        limits.min_cfg, limits.max_cfg)
    assert imagine["properties"]["n"]["maximum"] == limits.max_n
    assert imagine["properties"]["sampler"]["enum"] == list(SAMPLERS)
    assert imagine["properties"]["model"]["enum"] == list(settings.models)
    assert f"each side {limits.min_side} to {limits.max_side}" in imagine["properties"]["size"]["description"]
    assert "strength" not in imagine["properties"]
    assert inpaint["properties"]["strength"]["maximum"] == limits.max_strength
    assert set(inpaint["required"]) == {"image", "mask", "prompt"}
    # A typed answer: the images with their links and seeds, and the notices of withheld ones.
    answer = listed["imagine"].output_schema
    assert {"job_id", "images", "withheld", "params"} <= set(answer["properties"])


async def test_an_assistant_gets_the_pictures_inline_with_links_and_seeds(server, generator) -> None:
    _, tools = await tools_for(server)
    async with Client(tools) as client, running_worker(server.core, generator):
        imagined = await client.call_tool("imagine", {"prompt": "a lighthouse", "seed": 5, "steps": 2, "n": 2,
                                                      "size": "96x64", "sampler": "euler_a", "cfg": 5.5})
        link = imagined.structured_content["images"][0]["url"]
        edited = await client.call_tool("edit", {"image": link, "prompt": "in winter", "strength": 0.6,
                                                 "steps": 2})
        inpainted = await client.call_tool("inpaint", {"image": b64(png_bytes()), "mask": b64(mask_bytes()),
                                                       "prompt": "a red door", "steps": 2, "ar": "1:1"})
        elsewhere = await client.call_tool("edit", {"image": "https://example.com/cat.png", "prompt": "x"})
    assert not imagined.is_error, imagined.content
    result = imagined.structured_content
    assert [image["seed"] for image in result["images"]] == [5, 6] and result["prompt"] == "a lighthouse"
    assert (result["params"]["sampler"], result["params"]["cfg"]) == ("euler_a", 5.5)
    assert [picture.size for picture in pictures(imagined)] == [(96, 64), (96, 64)]
    assert link in imagined.content[0].text
    async with httpx.AsyncClient() as browser:  # the links open without the key, as an assistant shows them
        png = await browser.get(link)
    assert Image.open(io.BytesIO(png.content)).size == (96, 64)
    assert not edited.is_error and edited.structured_content["params"]["strength"] == 0.6
    assert [picture.size for picture in pictures(edited)] == [(96, 64)]  # the edit keeps the picture's shape
    assert not inpainted.is_error and len(pictures(inpainted)) == 1
    assert elsewhere.is_error and "only links to this Easel server" in elsewhere.content[0].text
    jobs = await server.core.service.list_jobs()
    assert {job.params.kind.value for job in jobs} == {"imagine", "edit", "inpaint"}
    assert {job.platform for job in jobs} == {"http"}


async def test_wrong_arguments_are_refused_in_one_line_that_names_them(server) -> None:
    _, tools = await tools_for(server)
    async with Client(tools) as client:
        unknown = await client.call_tool("imagine", {"prompt": "a cat", "stepz": 4})
        too_many = await client.call_tool("imagine", {"prompt": "a cat", "steps": 500})
        no_such_model = await client.call_tool("imagine", {"prompt": "a cat", "model": "sdxl"})
        refused_by_the_server = await client.call_tool("imagine", {"prompt": "a cat", "size": "100x100"})
    assert unknown.is_error and unknown.content[0].text.startswith("imagine has no argument stepz; its arguments "
                                                                   "are prompt, negative, seed, steps")
    assert too_many.is_error and too_many.content[0].text == ("imagine: steps: Input should be less than or "
                                                              "equal to 50")
    assert no_such_model.is_error and "model:" in no_such_model.content[0].text
    assert refused_by_the_server.is_error and "multiples of 8" in refused_by_the_server.content[0].text
    for refused in (unknown, too_many, no_such_model, refused_by_the_server):
        assert "\n" not in refused.content[0].text
    assert await server.core.service.list_jobs() == []


async def test_a_withheld_picture_is_never_sent_only_its_notice(tmp_path: Path, models_dir: Path, generator,
                                                                flag_all_checker) -> None:
    checked = load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir},
                            generation={"poll_interval_ms": 50, "progress_every_s": 0},
                            safety={"image_checker": "diffusers"}, http={"port": 0})
    core = await open_core(checked)
    worker = Worker(core.queue, generator, core.store, checked, worker_id="test-worker:1",
                    image_checker=flag_all_checker)
    try:
        async with serving(core) as running:
            _, tools = await tools_for(running)
            working = asyncio.create_task(worker.run())
            try:
                async with Client(tools) as client:
                    result = await client.call_tool("imagine", {"prompt": "a statue", "steps": 2})
            finally:
                worker.stop()
                await working
    finally:
        await core.close()
    answer = result.structured_content
    assert not result.is_error and answer["images"] == [] and pictures(result) == []
    assert "Image 1 was withheld" in answer["withheld"][0] and "/appeal" in result.content[0].text
    assert "/v1/images/" not in result.content[0].text + str(answer)  # no link to it either


async def test_easel_mcp_serves_the_tools_over_stdio(server, generator) -> None:
    token = await server.new_key("assistant")
    executable = Path(sys.executable).parent / "easel"
    params = StdioServerParameters(command=str(executable), args=["mcp", "--url", server.url],
                                   env={**os.environ, "EASEL_API_KEY": token})
    async with Client(params) as client, running_worker(server.core, generator):
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        result = await client.call_tool("imagine", {"prompt": "a red fox", "seed": 9, "steps": 2})
    assert set(tools) == {"imagine", "edit", "inpaint"}
    assert tools["imagine"].input_schema["properties"]["model"]["enum"] == list(server.core.settings.models)
    assert not result.is_error and result.structured_content["images"][0]["seed"] == 9
    assert [picture.format for picture in pictures(result)] == ["PNG"]


async def test_before_the_server_is_up_the_tools_follow_this_machines_config(settings: Settings) -> None:
    limits = await server_limits(EaselApi("http://127.0.0.1:9", "esk_x"), settings)  # nothing listens on 9
    assert limits.steps.max == settings.limits.max_steps and [m.name for m in limits.models] == ["tiny"]


def test_easel_mcp_without_a_key_says_how_to_make_one(monkeypatch, capsys) -> None:
    monkeypatch.delenv("EASEL_API_KEY", raising=False)
    assert main(["mcp"]) == 2
    assert "EASEL_API_KEY" in capsys.readouterr().err
