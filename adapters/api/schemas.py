"""The API's request and response bodies: Pydantic models that are also its OpenAPI schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bot.domain import JobKind, JobStatus


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://", max_length=2000, description="POSTed once the job is final")
    secret: str = Field(min_length=16, max_length=256,
                        description="HMAC-SHA256 key for the Easel-Signature header; choose a random one")


class JobRequest(BaseModel):
    """Either `command` in the chat grammar, or `kind` and `prompt` with optional fields."""

    model_config = ConfigDict(extra="forbid")

    command: str | None = Field(None, max_length=4000, examples=["/imagine a lighthouse at dusk --seed 42"])
    kind: JobKind | None = None
    prompt: str | None = Field(None, max_length=4000)
    negative: str | None = Field(None, max_length=4000)
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    size: str | None = Field(None, max_length=20, examples=["512x768"])
    ar: str | None = Field(None, max_length=20, examples=["16:9"])
    n: int | None = None
    sampler: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=128)
    strength: float | None = None
    image: str | None = Field(None, description="base64 (or a data: URL) of a PNG, JPEG, WebP, GIF or BMP")
    mask: str | None = Field(None, description="base64 of the mask: white pixels are repainted")
    webhook: Webhook | None = None


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(0, ge=0, description="which image of the job, from 0")


class ImageOut(BaseModel):
    index: int
    seed: int
    url: str
    width: int
    height: int
    spoiler: bool = Field(False, description="flagged by the image check where NSFW is allowed: show it "
                                             "behind a spoiler (blurred, click to show)")


class WithheldOut(BaseModel):
    index: int
    seed: int
    category: str
    message: str = Field(description="what happened, why, and how to appeal; show it instead of the image")


class JobOut(BaseModel):
    id: str
    status: JobStatus
    kind: JobKind
    prompt: str
    negative: str
    params: dict[str, Any]
    seeds: list[int]
    position: int | None = Field(None, description="1 = next to run; null once started")
    progress: dict[str, int]
    images: list[ImageOut] = Field(description="the images that may be shown (withheld ones are not listed)")
    withheld: list[WithheldOut]
    notice: str | None = Field(None, description="every withheld image's message, as one paragraph")
    inputs: dict[str, str | None]
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    links: dict[str, str]


class SubmitOut(JobOut):
    replayed: bool = Field(False, description="true: the Idempotency-Key matched an earlier request")
    others: list[JobOut] = Field(default_factory=list, description="a permutation prompt's further jobs "
                                 "(`a {red, green} circle`: one job per combination, this one the first)")


class ErrorOut(BaseModel):
    code: str
    message: str


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorOut} for status in (400, 401, 404, 422, 429)}
SUBMIT_ERRORS = {**ERRORS, **{status: {"model": ErrorOut} for status in (403, 409, 411, 413, 415)}}
