"""/openapi.json tells the truth: every route is called by schemathesis, with requests generated from the
document (valid and invalid ones), against the real app under uvicorn with the builtin:tiny worker, and
every answer is checked against what the document declares: status codes, media types, bodies,
headers. Nothing needs a GPU or the network.

The operations are run with schemathesis's documented `as_strategy` under hypothesis (derandomized, a
bounded number of examples) rather than its pytest plugin, whose `from_fixture` reads a pytest
internal (`Function._nodeid`) that pytest 9 no longer has."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import Config, GenerationMode

from adapters.http import build_app
from bot.bootstrap import Core, open_core
from bot.config import Settings
from bot.domain import SAMPLERS
from tests import http_fixtures
from tests.http_fixtures import running_worker, serving

settings = http_fixtures.settings  # this module's fixture

EXAMPLES_PER_OPERATION = 10  # valid and as many invalid requests per route: about 30 s for all of them


@dataclass
class LiveApi:
    url: str
    token: str


@contextlib.contextmanager
def api_in_a_thread(settings: Settings, generator: Any) -> Iterator[LiveApi]:
    """The real app under uvicorn and the real builtin:tiny worker, in a thread with its own event loop:
    schemathesis's client is synchronous, so it must not run on the loop that serves it."""
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        core = await open_core(settings)
        try:
            async with serving(core) as server, running_worker(core, generator):
                box["api"] = LiveApi(server.url, await server.new_key("schemathesis"))
                box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
                started.set()
                await box["stop"].wait()
        finally:
            await core.close()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as error:  # handed to the test, which raises it
            box["error"] = error
            started.set()

    thread = threading.Thread(target=run, name="easel-api-under-test")
    thread.start()
    started.wait(60)
    try:
        if "error" in box:
            raise box["error"]
        yield box["api"]
    finally:
        if "stop" in box:
            box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)


@pytest.fixture
def live_api(settings: Settings, generator: Any) -> Iterator[LiveApi]:
    # Small limits, so that every job the run asks for is a quick one for builtin:tiny: /openapi.json
    # documents the limits, so the generated requests keep within them.
    limits = settings.limits
    limits.max_side, limits.max_pixels, limits.max_steps, limits.default_steps, limits.max_n = 128, 128 * 128, 3, 2, 2
    with api_in_a_thread(settings, generator) as api:
        yield api


def schema_of(api: LiveApi) -> schemathesis.BaseSchema:
    """The document the server serves, with the run's settings: its key, both generation modes."""
    config = Config.from_dict({
        "auth": {"openapi": {"HTTPBearer": {"bearer": api.token}}},
        "generation": {"mode": "all"},
        "operations": [{
            # `command` is a sentence in the chat grammar, and `image` must decode to a picture: no schema
            # can say which strings are valid, so a schema-valid body may be refused with a 400 that names
            # the flag or the file. Every other check stays on.
            "include-name": "POST /v1/jobs",
            "checks": {"positive_data_acceptance": {"expected-statuses": [
                "2xx", "400", "401", "403", "409", "429"]}}}, {
            # The same for a training: its `command`, a name its owner already used, the pictures' captions
            # against the prompt check, and steps and rank within the [teach] ranges, which the document
            # does not carry.
            "include-name": "POST /v1/trainings",
            "checks": {"positive_data_acceptance": {"expected-statuses": [
                "2xx", "400", "401", "403", "409", "429"]}}}],
    })
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=config)
    schema.hook(map_body)
    return schema


# Where generated webhooks go: a closed port on this machine. A generated host name would be looked up in
# the DNS (the tests use no network), and a finished job's webhook is really POSTed.
LOCAL_HOOK = "http://127.0.0.1:9/hook"


def picture(image_format: str) -> bytes:
    """An 8x8 picture whose left half is transparent where the format keeps transparency (a mask)."""
    image = Image.new("RGBA", (8, 8), (200, 40, 40, 255))
    image.paste((0, 0, 0, 0), (0, 0, 4, 8))
    buffer = io.BytesIO()
    keeps_alpha = image_format in ("PNG", "WEBP", "GIF")
    (image if keeps_alpha else image.convert("RGB")).save(buffer, image_format)
    return buffer.getvalue()


# A multipart part the document declares as a picture (`encoding: {contentType: image/png, ...}`, the
# OpenAI routes' `image` and `mask`) is made as a picture of that type; without these, schemathesis sends
# random bytes under an image's content type.
for _media_type, _format in {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF",
                             "image/bmp": "BMP"}.items():
    schemathesis.openapi.media_type(_media_type, st.just(picture(_format)))


def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    if not isinstance(body, dict):
        return body
    webhook = body.get("webhook")
    if isinstance(webhook, dict) and str(webhook.get("url")).startswith(("http://", "https://")):
        body = {**body, "webhook": {**webhook, "url": LOCAL_HOOK}}
    if str(body.get("webhook_url")).startswith(("http://", "https://")):
        body = {**body, "webhook_url": LOCAL_HOOK}
    return body


def failures_of(operation: schemathesis.APIOperation) -> list[str]:
    """Runs valid and invalid requests for one operation; what went wrong, one report per mode."""
    reports = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, database=None,
                             deadline=None, suppress_health_check=list(HealthCheck),
                             phases=[Phase.explicit, Phase.generate])
        @given(operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate()

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid: the route takes no parameters and no body
            continue
        except BaseExceptionGroup as failure:  # schemathesis's report: the failed checks and a curl command
            reports.append(f"{mode.value} {operation.label}: {failure}")
    return reports


# The routes by the API they belong to (the compatible APIs answer errors in their own dialect), so that
# a failure says whose routes it is about. Easel's own API is every other route.
COMPATIBLE_APIS = {
    "openai": ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/models"),
    "a1111": ("/sdapi/",),
}


def in_family(path: str, family: str) -> bool:
    if family == "easel":
        return not any(path.startswith(prefix) for prefixes in COMPATIBLE_APIS.values() for prefix in prefixes)
    return path.startswith(COMPATIBLE_APIS[family])


@pytest.mark.parametrize("family", ["easel", "openai", "a1111"])
def test_every_route_answers_as_openapi_json_says(live_api: LiveApi, family: str) -> None:
    schema = schema_of(live_api)
    operations = [result.ok() for result in schema.get_all_operations() if in_family(result.ok().path, family)]
    failures = [report for operation in operations for report in failures_of(operation)]
    assert operations != []
    assert failures == [], "\n\n".join(failures)


def test_real_answers_match_the_document_a_job_its_events_its_image_a_dry_run_and_an_error(
        live_api: LiveApi) -> None:
    """What generated requests rarely reach: a job that runs to the end, its event stream (each event
    against its declared schema), its PNG, a dry run's answer, and a wrong field's 422."""
    schema = schema_of(live_api)
    submit, events = schema["/v1/jobs"]["POST"], schema["/v1/jobs/{job_id}/events"]["GET"]
    job, image = schema["/v1/jobs/{job_id}"]["GET"], schema["/v1/images/{sha256}"]["GET"]
    fox = {"kind": "imagine", "prompt": "a red fox", "steps": 2, "n": 2, "seed": 7}
    key = {"Authorization": f"Bearer {live_api.token}"}

    as_json = "application/json"
    priced = submit.Case(body=fox, query={"dry_run": True}, media_type=as_json).call_and_validate(headers=key)
    queued = submit.Case(body=fox, media_type=as_json).call_and_validate(headers=key)
    job_id = queued.json()["id"]
    stream = events.Case(path_parameters={"job_id": job_id}).call_and_validate(headers=key)  # read to its end
    done = job.Case(path_parameters={"job_id": job_id}).call_and_validate(headers=key).json()
    sha256 = done["images"][0]["url"].rsplit("/", 1)[1]
    png = image.Case(path_parameters={"sha256": sha256}).call_and_validate(headers=key)
    wrong = submit.Case(body={**fox, "stepz": 3}, media_type=as_json).call_and_validate(headers=key)

    assert priced.status_code == 200 and priced.json()["valid"] is True and priced.json()["params"]["n"] == 2
    assert queued.status_code == 202 and queued.headers["location"] == [f"{live_api.url}/v1/jobs/{job_id}"]
    kinds = [line.removeprefix("event: ") for line in stream.text.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "queued" and kinds[-1] == "done"
    assert done["status"] == "succeeded" and done["seeds"] == [7, 8]
    assert png.headers["content-type"] == ["image/png"]
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    assert wrong.status_code == 422 and wrong.json() == {"code": "invalid_command",
                                                         "message": "stepz: unknown field (see /openapi.json)"}


@pytest.mark.parametrize("family", ["easel", "openai", "a1111"])
async def test_no_route_documents_fastapis_422_body(core: Core, family: str) -> None:
    """FastAPI documents its own 422 body for any route with parameters; no route answers it: the error
    hook writes every error in the route's dialect (Easel's `{"code", "message"}`)."""
    document = build_app(core).openapi()
    documented = [f"{method.upper()} {path}" for path, operations in document["paths"].items()
                  for method, operation in operations.items() if in_family(path, family)
                  and "HTTPValidationError" in json.dumps(operation["responses"].get("422", {}))]
    assert documented == []


async def test_openapi_json_has_no_dangling_reference_and_gives_the_job_request_this_servers_limits(
        core: Core) -> None:
    core.settings.limits.max_steps = 30
    document = build_app(core).openapi()
    references = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document)))
    request_body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    properties = document["components"]["schemas"]["JobRequest"]["properties"]
    steps = next(option for option in properties["steps"]["anyOf"] if option["type"] == "integer")
    sampler = next(option for option in properties["sampler"]["anyOf"] if option["type"] == "string")
    assert references - set(document["components"]["schemas"]) == set()  # `Webhook` pointed nowhere
    assert set(request_body) == {"application/json", "multipart/form-data"}
    assert (steps["minimum"], steps["maximum"]) == (1, 30)  # the grammar enforces the same numbers
    assert sampler["enum"] == list(SAMPLERS)
