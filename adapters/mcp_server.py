"""`easel mcp`: Easel as tools for assistants, over the Model Context Protocol (stdio).

Three tools, imagine, edit and inpaint, each queue a job through Easel's HTTP API with an API key,
wait for it, and answer with the job id, the seeds and image links. It is a client of the HTTP API
(not of the database), so an assistant's jobs get that key's quota and safety checks, and its links
open in any browser. Run `easel serve` somewhere, then point an MCP client at:

    {"command": "easel", "args": ["mcp", "--url", "http://127.0.0.1:8000"],
     "env": {"EASEL_API_KEY": "esk_..."}}
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from typing import Any

import httpx
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from bot.config import Settings
from bot.errors import EaselError

INSTRUCTIONS = (
    "Easel generates images with Stable Diffusion. `imagine` draws from a prompt; `edit` redraws a picture "
    "guided by a prompt; `inpaint` repaints only the white area of a mask. Each answers with image links "
    "and seeds: the same seed and settings make the same picture again. Pictures go in as base64 or as a "
    "link from an earlier answer."
)


class EaselApi:
    """The few calls the tools make, over HTTP with one API key."""

    def __init__(self, url: str, key: str, *, timeout_s: float = 900.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {key}"}
        self._timeout = httpx.Timeout(30.0, read=timeout_s)
        self._transport = transport

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout,
                                 transport=self._transport)

    async def run_job(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Queue a job, follow its events to the end, and return what an assistant needs."""
        async with self._client() as client:
            # One key per tool call: if the connection drops after the server took the job, a retry of
            # this request cannot queue (and charge) it twice.
            response = await client.post("/v1/jobs", json={k: v for k, v in fields.items() if v is not None},
                                         headers={"Idempotency-Key": f"mcp-{uuid.uuid4()}"})
            job = _json_or_raise(response)
            async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
                if events.is_error:
                    await events.aread()
                    _json_or_raise(events)
                async for line in events.aiter_lines():
                    if line.startswith("event: ") and line[7:] in ("done", "failed", "cancelled"):
                        break
            job = _json_or_raise(await client.get(f"/v1/jobs/{job['id']}"))
        if job["status"] != "succeeded":
            raise ToolError(f"Job {job['id']} {job['status']}: {job.get('error') or 'no images'}")
        # Only what the server lets this key see: withheld images come as their notices, never as links.
        answer = {"job_id": job["id"], "prompt": job["prompt"], "params": job["params"],
                  "images": [{"url": i["url"], "seed": i["seed"], "width": i["width"], "height": i["height"],
                              "flagged": i.get("spoiler", False)} for i in job["images"]]}
        if job.get("withheld"):
            answer["withheld"] = [w["message"] for w in job["withheld"]]
        return answer

    async def picture(self, value: str, what: str) -> str:
        """Base64 of a picture given as base64, a data: URL, or a link to an Easel image of this server."""
        if value.startswith(f"{self.url}/v1/images/"):
            async with self._client() as client:
                response = await client.get(value)
            if response.is_error:
                raise ToolError(f"{what}: {value} could not be read ({response.status_code})")
            return base64.b64encode(response.content).decode()
        if value.startswith(("http://", "https://")):
            raise ToolError(f"{what}: only links to this Easel server ({self.url}/v1/images/...) can be used; "
                            "send other pictures as base64")
        return value


def _json_or_raise(response: httpx.Response) -> dict[str, Any]:
    if response.is_error:
        try:
            error = response.json()
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, json.JSONDecodeError):
            message = f"Easel answered {response.status_code}"
        raise ToolError(message)
    return response.json()


def build_mcp_server(api: EaselApi) -> MCPServer:
    server = MCPServer(name="easel", instructions=INSTRUCTIONS)

    @server.tool(description="Make images from a text prompt. Returns image links and their seeds.")
    async def imagine(prompt: str, negative: str | None = None, seed: int | None = None, steps: int | None = None,
                      size: str | None = None, n: int | None = None, model: str | None = None) -> dict[str, Any]:
        """prompt: what to draw; negative: what to keep out; size: WIDTHxHEIGHT, e.g. 512x768; n: images."""
        return await api.run_job({"kind": "imagine", "prompt": prompt, "negative": negative, "seed": seed,
                                  "steps": steps, "size": size, "n": n, "model": model})

    @server.tool(description="Redraw a picture guided by a prompt (img2img). `image`: base64, or an image "
                             "link from an earlier answer. `strength` 0.05-1: how much to change.")
    async def edit(image: str, prompt: str, strength: float | None = None, negative: str | None = None,
                   seed: int | None = None, steps: int | None = None, n: int | None = None) -> dict[str, Any]:
        return await api.run_job({"kind": "edit", "prompt": prompt, "image": await api.picture(image, "image"),
                                  "strength": strength, "negative": negative, "seed": seed, "steps": steps,
                                  "n": n})

    @server.tool(description="Repaint the white area of a mask (same aspect ratio as the picture), keeping "
                             "the black area. `image` and `mask`: base64, or image links from earlier answers.")
    async def inpaint(image: str, mask: str, prompt: str, strength: float | None = None,
                      negative: str | None = None, seed: int | None = None, steps: int | None = None,
                      n: int | None = None) -> dict[str, Any]:
        return await api.run_job({"kind": "inpaint", "prompt": prompt, "image": await api.picture(image, "image"),
                                  "mask": await api.picture(mask, "mask"), "strength": strength,
                                  "negative": negative, "seed": seed, "steps": steps, "n": n})

    return server


def default_url(settings: Settings) -> str:
    http = settings.http
    return http.public_url or f"http://{http.host}:{http.port}"


def run_mcp(settings: Settings, *, url: str | None = None, key: str | None = None) -> int:
    """Serve the tools on stdin/stdout until the client disconnects."""
    key = key or os.environ.get("EASEL_API_KEY")
    if not key:
        raise EaselError("easel mcp needs an API key: pass --key or set EASEL_API_KEY "
                         "(make one with `easel apikey create --name assistant`)")
    build_mcp_server(EaselApi(url or default_url(settings), key)).run()
    return 0
