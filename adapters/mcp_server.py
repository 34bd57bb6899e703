"""`easel mcp`: Easel as tools for assistants, over the Model Context Protocol (stdio).

Three tools, imagine, edit and inpaint, each queue a job through Easel's HTTP API with an API key,
wait for it, and answer with the pictures themselves (PNG image blocks, which assistants show inline),
their links and seeds, and the same as structured content (`ToolAnswer`). It is a client of the HTTP
API (not of the database), so an assistant's jobs get that key's quota and safety checks, and its
links open in any browser. Run `easel serve` somewhere, then point an MCP client at:

    {"command": "easel", "args": ["mcp", "--url", "http://127.0.0.1:8000"],
     "env": {"EASEL_API_KEY": "esk_..."}}

Every argument's range and choices come from the server's own limits (GET /v1/help's `limits`: steps,
cfg, n, sizes, the samplers and models it has), read when `easel mcp` starts; an unknown argument is
refused by name. What the image check withheld is never sent, as a picture or as a link: the tool
answers its notice (what happened and how to appeal). A picture flagged where NSFW is allowed is a
link only (marked `spoiler`), since an assistant cannot show it behind a spoiler.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import uuid
from typing import Any

import anyio
import httpx
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import CoreSchema

from adapters.api.errors import describe_errors
from adapters.api.schemas import HelpOut, LimitsOut, ParamsOut, generation_fields
from bot.config import Settings
from bot.errors import EaselError

INSTRUCTIONS = (
    "Easel generates images with Stable Diffusion. `imagine` draws from a prompt; `edit` redraws a picture "
    "guided by a prompt; `inpaint` repaints only the white area of a mask. Each answers with the pictures, "
    "their links and seeds: the same seed and settings make the same picture again. Pictures go in as "
    "base64 or as a link from an earlier answer."
)


# -- what a tool answers -----------------------------------------------------------------------------


class ToolImage(BaseModel):
    url: str = Field(description="the PNG; the link opens without a key")
    seed: int = Field(description="this picture's seed: the same seed and settings draw it again")
    width: int
    height: int
    spoiler: bool = Field(description="flagged by the image check where NSFW is allowed: sent as a link "
                                      "only, not as a picture; show it only to someone who wants to see it")


class ToolAnswer(BaseModel):
    """A finished job: its pictures (also sent as image content), and a notice for each one withheld."""

    job_id: str
    prompt: str
    params: ParamsOut
    images: list[ToolImage] = Field(description="the pictures that may be shown")
    withheld: list[str] = Field(description="for each picture the image check withheld: what happened, why, "
                                            "and how its owner can appeal; tell the user")


# -- the HTTP API the tools call ---------------------------------------------------------------------


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

    async def limits(self) -> LimitsOut:
        """The server's limits, models and samplers (GET /v1/help), which the tools' arguments follow."""
        async with self._client() as client:
            return HelpOut.model_validate(_json_or_raise(await client.get("/v1/help"))).limits

    async def run_job(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Queue a job, follow its events to the end, and return what an assistant needs (a ToolAnswer)."""
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
        return {"job_id": job["id"], "prompt": job["prompt"], "params": job["params"],
                "images": [{"url": i["url"], "seed": i["seed"], "width": i["width"], "height": i["height"],
                            "spoiler": i["spoiler"]} for i in job["images"]],
                "withheld": [w["message"] for w in job["withheld"]]}

    async def png(self, url: str) -> bytes:
        async with self._client() as client:
            response = await client.get(url)
        if response.is_error:
            raise ToolError(f"{url} could not be read ({response.status_code})")
        return response.content

    async def picture(self, value: str, what: str) -> str:
        """Base64 of a picture given as base64, a data: URL, or a link to an Easel image of this server."""
        if value.startswith(f"{self.url}/v1/images/"):
            return base64.b64encode(await self.png(value)).decode()
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


# -- the tools ---------------------------------------------------------------------------------------


class _Arguments(ArgModelBase):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class _AssistantSchema(GenerateJsonSchema):
    """An optional argument as its own type (`{"type": "integer", "minimum": 1, ...}`), not `anyOf` with
    null and a null default: leaving it out means the server's default, which its description names."""

    def nullable_schema(self, schema: CoreSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])  # type: ignore[typeddict-item]

    def default_schema(self, schema: CoreSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)  # type: ignore[arg-type]
        if json_schema.get("default", 0) is None:
            del json_schema["default"]
        return json_schema


class _EaselTool(Tool):
    """A tool whose wrong arguments are answered in one line that names them (pydantic's own message is
    several lines with links)."""

    async def run(self, arguments: dict[str, Any], context: Any, convert_result: bool = False) -> Any:
        try:
            self.fn_metadata.arg_model.model_validate(arguments)
        except ValidationError as error:
            raise ToolError(_argument_error(self.name, error, self.fn_metadata.arg_model)) from None
        return await super().run(arguments, context, convert_result)


def _argument_error(tool: str, error: ValidationError, arguments: type[BaseModel]) -> str:
    unknown = [str(e["loc"][0]) for e in error.errors() if e["type"] == "extra_forbidden"]
    if unknown:
        return (f"{tool} has no argument {', '.join(unknown)}; its arguments are "
                f"{', '.join(arguments.model_fields)}")
    return f"{tool}: {describe_errors(error.errors())}"


IMAGE_ARGUMENT = "the picture: base64 (PNG, JPEG, WebP), a data: URL, or an image link from an earlier answer"
MASK_ARGUMENT = ("the mask, the picture's shape: white pixels are repainted, black ones kept; base64, a data: "
                 "URL, or an image link")
# Each tool's arguments besides the generation parameters (which all three take), in order.
TOOLS: dict[str, tuple[str, dict[str, Any]]] = {
    "imagine": ("Make pictures from a text prompt.", {}),
    "edit": ("Redraw a picture guided by a prompt (img2img); `strength` sets how much changes.",
             {"image": (str, Field(description=IMAGE_ARGUMENT))}),
    "inpaint": ("Repaint the white area of a mask, keeping the rest of the picture.",
                {"image": (str, Field(description=IMAGE_ARGUMENT)),
                 "mask": (str, Field(description=MASK_ARGUMENT))}),
}


def build_mcp_server(api: EaselApi, limits: LimitsOut) -> MCPServer:
    """The MCP server: one tool per kind of job, its arguments within `limits` (the server's)."""
    return MCPServer(name="easel", instructions=INSTRUCTIONS,
                     tools=[_tool(api, kind, limits) for kind in TOOLS])


def _tool(api: EaselApi, kind: str, limits: LimitsOut) -> Tool:
    description, pictures = TOOLS[kind]
    parameters = generation_fields(limits, required=("prompt",))
    if kind == "imagine":
        del parameters["strength"]
    arguments = create_model(f"{kind}Arguments", __base__=_Arguments, **pictures, **parameters)

    async def run(**fields: Any) -> CallToolResult:
        for name in pictures:
            fields[name] = await api.picture(fields[name], name)
        return await answer(api, await api.run_job({"kind": kind, **fields}))

    return _EaselTool(
        fn=run, name=kind, title=f"Easel {kind}", is_async=True, context_kwarg=None,
        description=f"{description} Answers with the pictures (PNG), their links and seeds.",
        parameters=arguments.model_json_schema(schema_generator=_AssistantSchema),
        fn_metadata=FuncMetadata(arg_model=arguments, output_model=ToolAnswer),
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                    open_world_hint=False))


async def answer(api: EaselApi, job: dict[str, Any]) -> CallToolResult:
    """The job as content an assistant shows (a line of text, then each picture that may be shown
    inline) and as structured content."""
    result = ToolAnswer.model_validate(job)
    lines = [f"Job {result.job_id}: {len(result.images)} picture(s), {result.params.width}x{result.params.height}"]
    lines += [f"- seed {image.seed}: {image.url}" + (" (flagged by the image check: a link only, open it "
                                                     "only if wanted)" if image.spoiler else "")
              for image in result.images]
    lines += result.withheld
    content: list[ContentBlock] = [TextContent(type="text", text="\n".join(lines))]
    for image in result.images:
        if not image.spoiler:
            content.append(ImageContent(type="image", data=base64.b64encode(await api.png(image.url)).decode(),
                                        mime_type="image/png"))
    return CallToolResult(content=content, structured_content=result.model_dump(mode="json"))


# -- `easel mcp` -------------------------------------------------------------------------------------


def default_url(settings: Settings) -> str:
    http = settings.http
    return http.public_url or f"http://{http.host}:{http.port}"


async def server_limits(api: EaselApi, settings: Settings) -> LimitsOut:
    """The limits of the server the tools call; this machine's config when that server is not up yet
    (an MCP client starts `easel mcp` with the app, maybe before `easel serve`)."""
    try:
        return await api.limits()
    except httpx.TransportError as error:
        print(f"easel mcp: {api.url} does not answer yet ({error.__class__.__name__}); the tools take this "
              "machine's config's limits until then", file=sys.stderr)
        return LimitsOut.of(settings)
    except ToolError as error:  # the server answered with an error: most likely the key
        raise EaselError(f"easel mcp: {api.url} refused to list its limits: {error}") from None


def run_mcp(settings: Settings, *, url: str | None = None, key: str | None = None) -> int:
    """Serve the tools on stdin/stdout until the client disconnects."""
    key = key or os.environ.get("EASEL_API_KEY")
    if not key:
        raise EaselError("easel mcp needs an API key: pass --key or set EASEL_API_KEY "
                         "(make one with `easel apikey create --name assistant`)")
    api = EaselApi(url or default_url(settings), key)

    async def serve() -> None:
        await build_mcp_server(api, await server_limits(api, settings)).run_stdio_async()

    anyio.run(serve)
    return 0
