"""Read-only views of jobs and quotas: what adapters show and what the worker receives.

They are plain frozen dataclasses built from rows inside a unit of work, so nothing outside `bot/`
ever holds a live ORM object or a session.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from bot.domain import GenerationParams, JobKind, JobStatus, Motion, loras_of_text
from bot.models import Image, Job, Training
from bot.safety import WITHHOLD, flagged_category


@dataclass(frozen=True)
class ImageView:
    index: int
    seed: int
    sha256: str
    path: str
    width: int
    height: int
    size_bytes: int
    safety_flags: tuple[str, ...] = ()  # "category:action", e.g. "nsfw:spoiler" (bot/safety.py)

    @property
    def withheld(self) -> bool:
        """Flagged by the image check where NSFW is not allowed (and not released by a moderator)."""
        return flagged_category(self.safety_flags, WITHHOLD) is not None



@dataclass(frozen=True)
class JobView:
    id: str
    status: JobStatus
    params: GenerationParams
    platform: str
    user_id: str  # the platform's user id
    display_name: str
    reply_to: dict[str, Any]
    attempts: int
    progress_step: int
    progress_total: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    delivered_at: datetime | None = None
    batch_size: int | None = None
    error: str | None = None
    init_image_sha: str | None = None
    mask_image_sha: str | None = None
    # Every image, withheld ones included: what may be shown is bot/delivery.py's decision, never an adapter's.
    images: tuple[ImageView, ...] = ()
    nsfw_allowed: bool = False  # the place the job came from allows NSFW (a flagged image is spoilered)
    cost_milli: int = 0  # the quota charge, thousandths of a cost unit (bot/policy.py)

    @property
    def seeds(self) -> list[int]:
        return self.params.image_seeds()

    @property
    def queue_wait_s(self) -> float | None:
        return (self.started_at - self.created_at).total_seconds() if self.started_at else None

    @property
    def generation_s(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None

    def timings(self) -> list[str]:
        """How long the job waited and ran, in words every surface shows as they are. Only a job that
        succeeded was "generated"; a cancelled or failed one says how long it ran before it stopped."""
        timings = [] if self.queue_wait_s is None else [f"waited {self.queue_wait_s:.1f} s"]
        ran = self.generation_s
        if ran is not None:
            batch = f" (batch of {self.batch_size} images)" if (self.batch_size or 1) > 1 else ""
            if self.status is JobStatus.SUCCEEDED:
                timings.append(f"generated in {ran:.1f} s{batch}")
            else:
                timings.append(f"{self.status.value} after {ran:.1f} s running{batch}")
        return timings


@dataclass(frozen=True)
class TrainingView:
    """What a worker needs to run a slice of a `/teach` training, and what /mod trained lists."""

    job_id: str
    owner_id: int  # users.id
    owner: str  # "platform:user id", as moderators name users
    name: str
    kind: str
    trigger: str
    rank: int
    pictures: tuple[tuple[str, str], ...]  # (sha256 of the stored PNG, caption)
    losses: tuple[float, ...]
    status: JobStatus
    step: int
    steps: int
    shared: bool = False

    @property
    def lora_name(self) -> str:
        """The name jobs of its owner use for it (bot/extra_networks.trained_lora_name)."""
        return f"trained/u{self.owner_id}/{self.name}"


@dataclass(frozen=True)
class QuotaStatus:
    """A user's quota in cost units (bot/policy.py; `describe_quota` renders it). `limit` may be inf."""

    used: float  # units charged today: reserved by jobs in progress plus committed by finished ones
    limit: float  # the daily window, grants included
    resets_at: datetime  # when the daily window starts again (UTC midnight)
    tier: str = "user"
    reserved: float = 0.0  # the part of `used` held by jobs still queued or running
    minute_used: float = 0.0
    minute_limit: float = float("inf")
    minute_resets_at: datetime | None = None  # when the oldest charge of the last minute ages out
    cost: float | None = None  # what the asked-about command costs, when one was given
    cost_of: str = ""  # that command, described
    images_used: int = 0
    images_limit: int = 0  # the plain images-per-day cap; 0 = none
    images_limit_setting: str = ""  # the setting behind that cap, as Policy.images_limit_setting names it

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


def params_of(job: Job | Row[Any]) -> GenerationParams:
    return GenerationParams(
        kind=JobKind(job.kind), prompt=job.prompt, negative=job.negative, width=job.width,
        height=job.height, steps=job.steps, cfg=job.cfg, n=job.n, sampler=job.sampler, model=job.model,
        seed=job.seed, strength=job.strength, loras=loras_of_text(job.loras), motion=Motion.of_text(job.motion),
    )


def image_view(image: Image, path: str) -> ImageView:
    return ImageView(image.index, image.seed, image.sha256, path, image.width, image.height,
                     image.size_bytes, tuple(image.safety_flags or ()))


def job_view(job: Job, image_path: Any) -> JobView:
    """`image_path` maps a sha256 to where the image lives (the image store's `location_of`)."""
    images = tuple(image_view(image, str(image_path(image.sha256))) for image in job.images)
    return job_view_of(job, job.user.platform_user_id, job.user.display_name, images)


def job_view_of(job: Job | Row[Any], owner_id: str, owner_name: str, images: tuple[ImageView, ...] = ()) -> JobView:
    """The view of a job's columns, whether read as an ORM object or as a row (a worker's claim reads
    rows); the owner's platform user id and display name and the images are given apart."""
    return JobView(
        id=job.id, status=JobStatus(job.status), params=params_of(job), platform=job.platform,
        user_id=owner_id, display_name=owner_name,
        reply_to=dict(job.reply_to or {}), attempts=job.attempts, progress_step=job.progress_step,
        progress_total=job.progress_total, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, delivered_at=job.delivered_at, batch_size=job.batch_size,
        error=job.error, init_image_sha=job.init_image_sha, mask_image_sha=job.mask_image_sha,
        images=images, nsfw_allowed=bool(job.nsfw_allowed), cost_milli=job.cost_milli or 0,
    )


def training_view(training: Training) -> TrainingView:
    job = training.job
    return TrainingView(
        job_id=training.job_id, owner_id=training.user_id,
        owner=f"{training.user.platform}:{training.user.platform_user_id}", name=training.name, kind=training.kind,
        trigger=training.trigger, rank=training.rank,
        pictures=tuple((picture["sha"], picture["caption"]) for picture in training.pictures),
        losses=tuple(training.losses), status=JobStatus(job.status), step=job.progress_step, steps=job.steps,
        shared=training.shared_at is not None)
