"""/openapi.json as the API really behaves: FastAPI's document, plus the schemas it cannot find itself.

FastAPI documents a route from its signature. POST /v1/jobs reads its body itself (JSON or multipart,
size-capped before reading), as do the OpenAI Images API's routes, and the job event stream is written by
hand, so those routes declare their schemas by reference (`#/components/schemas/JobRequest`) and this
module adds the referenced schemas, the error bodies of `schemas.errors` among them. The requests' ranges
and choices are this server's (settings.limits, its models, the samplers): the same numbers the grammar
enforces and GET /v1/help's `limits` lists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from adapters.api.openai_images import OpenAIErrorOut, documented_requests
from adapters.api.schemas import EVENT_DATA, ErrorOut, LimitsOut, documented_job_form, documented_job_request
from bot.config import Settings


def referenced_schemas(settings: Settings) -> dict[str, Any]:
    """The component schemas that routes reference by hand, by name."""
    limits = LimitsOut.of(settings)
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (documented_job_request(limits), "validation"), (documented_job_form(limits), "validation"),
        *((model, "validation") for model in documented_requests(limits)),
        (ErrorOut, "serialization"), (OpenAIErrorOut, "serialization"),
        *((model, "serialization") for model in dict.fromkeys(EVENT_DATA.values()))]
    _, definitions = models_json_schema(models, ref_template="#/components/schemas/{model}")
    return definitions["$defs"]


def openapi_of(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """`app.openapi`: FastAPI's document, made once, with the hand-referenced schemas added."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in referenced_schemas(settings).items():
                schemas.setdefault(name, schema)
        return app.openapi_schema

    return openapi
