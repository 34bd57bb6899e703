"""Database tables (SQLAlchemy 2 declarative). Alembic migrations in alembic/ are the only way the
schema is created; tests/test_migrations.py checks the two agree.

The `jobs` table is the queue: a job is durable from the moment `submit` commits, so nothing accepted
is lost if a process dies. `job_events` is an outbox: the worker writes events in the same transaction
as the state change they describe, and each adapter reads the events of its platform.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on every backend (SQLite stores no zone and returns naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: Easel stores aware UTC datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    # Named constraints, so later migrations (SQLite batch mode included) can refer to them.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id", name="uq_users_platform_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    platform_user_id: Mapped[str] = mapped_column(String(128))
    display_name: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(32), default="user")  # user, moderator, owner
    banned_until: Mapped[datetime | None] = mapped_column(default=None)
    ban_reason: Mapped[str | None] = mapped_column(Text, default=None)
    # Round-robin fairness: the user whose job ran longest ago goes next (NULL = never served).
    last_served_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime]
    # This user's images per UTC day; NULL = queue.daily_images_per_user (e.g. `apikey create --quota`).
    daily_images_limit: Mapped[int | None] = mapped_column(Integer, default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_user_seq", "status", "user_id", "seq"),
        Index("ix_jobs_user_created", "user_id", "created_at"),
        Index("ix_jobs_platform_delivery", "platform", "status", "delivered_at"),
    )

    # Submission order, for FIFO within one user; `id` is the short public id users type.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(16), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[str] = mapped_column(Text)
    negative: Mapped[str] = mapped_column(Text, default="")
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    cfg: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    sampler: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(128))
    seed: Mapped[int] = mapped_column(BigInteger)
    strength: Mapped[float | None] = mapped_column(Float, default=None)
    # The job's LoRAs as bot.domain.loras_text writes them: compared as text by the batch key.
    loras: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    # /animate's frames and camera as bot.domain.Motion.to_text writes them; NULL for other kinds.
    motion: Mapped[str | None] = mapped_column(Text, default=None)
    init_image_sha: Mapped[str | None] = mapped_column(String(64), default=None)
    mask_image_sha: Mapped[str | None] = mapped_column(String(64), default=None)
    # Where the answer goes: the owning adapter's own address for it (channel, chat, token...).
    platform: Mapped[str] = mapped_column(String(32))
    reply_to: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128), default=None)  # "host:pid" while running
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    # Claims that served another user's job first because that worker had its model loaded while this
    # was the fairer job (bot/queue.py, choose_head); at queue.affinity_max_passes it is served next.
    passed_over: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    batch_size: Mapped[int | None] = mapped_column(Integer, default=None)  # images in its diffusers call
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    # The quota charge in thousandths of a cost unit (bot/policy.py): reserved while queued or running,
    # committed on success, refunded (no longer counted) when the job fails or is cancelled.
    cost_milli: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Whether the place the job came from allows NSFW results (a flagged image is then spoilered).
    nsfw_allowed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    user: Mapped[User] = relationship(lazy="joined")
    images: Mapped[list[Image]] = relationship(
        back_populates="job", order_by="Image.index", lazy="selectin", cascade="all, delete-orphan"
    )


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_images_job_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    safety_flags: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime]

    job: Mapped[Job] = relationship(back_populates="images")


class QuotaGrant(Base):
    """Extra cost units a moderator gave one user for one UTC day (`/mod quota USER grant N`).
    What a user spent is not stored here: the jobs' `cost_milli` are the ledger."""

    __tablename__ = "quota_grants"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    extra_milli: Mapped[int] = mapped_column(Integer, default=0)


class SafetyFlag(Base):
    """One safety decision: who, about what, why, and what was done."""

    __tablename__ = "safety_flags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    subject: Mapped[str] = mapped_column(String(128))  # "prompt" or "image:<sha256>"
    category: Mapped[str] = mapped_column(String(64))
    reason_code: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32))  # prompt_check, image_check, moderator
    # block, refuse_here, flag, allow_nsfw, spoiler, withhold, ban, unban, quota, appeal_accepted...
    action: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime]
    detail: Mapped[str | None] = mapped_column(Text, default=None)  # the prompt, matched term, or reason
    actor: Mapped[str | None] = mapped_column(String(160), default=None)  # the moderator, "platform:id"


class Appeal(Base):
    """A user's `/appeal`: about a job (a withheld image), a refused prompt (its flag) or a ban."""

    __tablename__ = "appeals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    flag_id: Mapped[int | None] = mapped_column(ForeignKey("safety_flags.id", ondelete="SET NULL"),
                                                default=None)
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open, accepted, rejected
    created_at: Mapped[datetime]
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)
    resolved_by: Mapped[str | None] = mapped_column(String(160), default=None)
    resolution: Mapped[str | None] = mapped_column(Text, default=None)

    user: Mapped[User] = relationship(lazy="joined")


class JobEvent(Base):
    """Outbox of job events; adapters read their platform's rows in id order."""

    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_platform_id", "platform", "id"),
        Index("ix_job_events_kind_created", "kind", "created_at"),  # pruning old progress events
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    platform: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))  # queued, started, progress, done, failed, cancelled
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime]


class ApiKey(Base):
    """A bearer token for the HTTP API (or one browser's web chat session). Each key is its own user
    (platform "http") for quotas and safety. Only the SHA-256 of the token is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)  # shown in lists and logs; not secret
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # "api" (easel apikey create) or "web" (a browser session)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    user: Mapped[User] = relationship(lazy="joined")


class WorkerRow(Base):
    """One running worker, as it last reported itself (bot/workers.py): written by the worker at start,
    at each batch and every lease_s/4; deleted when it stops, or by another once it is stale."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(160), primary_key=True)  # "host:pid", as jobs.worker
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))  # "cuda:0", "cpu", "mps"
    device_name: Mapped[str] = mapped_column(String(255))  # "NVIDIA H100 80GB HBM3", the CPU's model
    memory_used_mb: Mapped[int] = mapped_column(Integer)  # the device's memory in use by this worker
    memory_total_mb: Mapped[int] = mapped_column(Integer)
    models: Mapped[list[str]] = mapped_column(JSON, default=list)  # loaded, least recently used first
    loras: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16))  # idle, busy, draining (bot.workers.WorkerStatus)
    batch: Mapped[list[str]] = mapped_column(JSON, default=list)  # the job ids in hand
    images_done: Mapped[int] = mapped_column(Integer, default=0)
    batches_done: Mapped[int] = mapped_column(Integer, default=0)
    busy_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime] = mapped_column(index=True)  # expiry looks for old ones


class IdempotencyKey(Base):
    """A client's `Idempotency-Key`: a retry with the same key and request gets the same job back."""

    __tablename__ = "idempotency_keys"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # SHA-256 of the request, to spot a reused key
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime]


class Training(Base):
    """A `/teach` training: what it learns from and where its LoRA goes. Its job (kind "teach") is the
    queue entry, requeued after each slice of steps; the job's status and progress are the training's."""

    __tablename__ = "trainings"
    __table_args__ = (Index("ix_trainings_user_name", "user_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(64))  # unique per owner among trainings not failed or cancelled
    kind: Mapped[str] = mapped_column(String(16), default="lora")
    trigger: Mapped[str] = mapped_column(String(64))  # the word that calls it in the owner's prompts
    rank: Mapped[int] = mapped_column(Integer)
    # [{"sha": sha256 of the stored PNG, "caption": "..."}], in the order they were given
    pictures: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # Mean loss of each finished slice, for progress messages and the closing note.
    losses: Mapped[list[float]] = mapped_column(JSON, default=list)
    # When a moderator shared it (`/mod share`: copied into lora_dir, so everyone can use it); NULL: private.
    shared_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime]

    job: Mapped[Job] = relationship(lazy="joined")
    user: Mapped[User] = relationship(lazy="joined")
