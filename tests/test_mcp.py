"""`easel mcp`: an MCP client calls imagine, edit and inpaint and gets image links back, through the real
HTTP API (uvicorn on 127.0.0.1) and the real builtin:tiny worker."""

from __future__ import annotations

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
from adapters.mcp_server import EaselApi, build_mcp_server
from tests import http_fixtures
from tests.conftest import mask_bytes, png_bytes
from tests.http_fixtures import running_worker

settings, server = http_fixtures.settings, http_fixtures.server  # this module's fixtures


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_an_assistant_gets_image_links_and_seeds_from_the_three_tools(server, generator) -> None:
    token = await server.new_key("assistant")
    tools = build_mcp_server(EaselApi(server.url, token))
    async with Client(tools) as client, running_worker(server.core, generator):
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
        imagined = await client.call_tool("imagine", {"prompt": "a lighthouse", "seed": 5, "steps": 2, "n": 2})
        link = imagined.structured_content["images"][0]["url"]
        edited = await client.call_tool("edit", {"image": link, "prompt": "in winter", "strength": 0.6,
                                                 "steps": 2})
        inpainted = await client.call_tool("inpaint", {"image": b64(png_bytes()), "mask": b64(mask_bytes()),
                                                       "prompt": "a red door", "steps": 2})
        refused = await client.call_tool("imagine", {"prompt": "a cat", "steps": 500})
        elsewhere = await client.call_tool("edit", {"image": "https://example.com/cat.png", "prompt": "x"})
    assert set(listed) == {"imagine", "edit", "inpaint"}
    assert {"image", "prompt"} <= set(listed["edit"].input_schema["required"])
    assert not imagined.is_error, imagined.content
    result = imagined.structured_content
    assert [image["seed"] for image in result["images"]] == [5, 6] and result["prompt"] == "a lighthouse"
    async with httpx.AsyncClient() as browser:  # the links open without the key, as an assistant shows them
        png = await browser.get(link)
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    assert not edited.is_error and edited.structured_content["params"]["strength"] == 0.6
    assert not inpainted.is_error and len(inpainted.structured_content["images"]) == 1
    assert refused.is_error and "--steps must be a whole number from 1 to 50" in refused.content[0].text
    assert elsewhere.is_error and "only links to this Easel server" in elsewhere.content[0].text
    jobs = await server.core.service.list_jobs()
    assert {job.params.kind.value for job in jobs} == {"imagine", "edit", "inpaint"}
    assert {job.platform for job in jobs} == {"http"}


async def test_easel_mcp_serves_the_tools_over_stdio(server, generator) -> None:
    token = await server.new_key("assistant")
    executable = Path(sys.executable).parent / "easel"
    params = StdioServerParameters(command=str(executable), args=["mcp", "--url", server.url],
                                   env={**os.environ, "EASEL_API_KEY": token})
    async with Client(params) as client, running_worker(server.core, generator):
        names = {tool.name for tool in (await client.list_tools()).tools}
        result = await client.call_tool("imagine", {"prompt": "a red fox", "seed": 9, "steps": 2})
    assert names == {"imagine", "edit", "inpaint"}
    assert not result.is_error and result.structured_content["images"][0]["seed"] == 9


def test_easel_mcp_without_a_key_says_how_to_make_one(monkeypatch, capsys) -> None:
    monkeypatch.delenv("EASEL_API_KEY", raising=False)
    assert main(["mcp"]) == 2
    assert "EASEL_API_KEY" in capsys.readouterr().err
