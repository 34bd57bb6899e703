"""The policy layer: quotas in cost units, queue caps, safety flag records, strikes and bans.

Cost units measure work: width × height × steps actually run × images, with 512×512 at 20 steps for
one image = 1 unit (`cost_milli` counts thousandths). /edit and /inpaint run `steps × strength` steps,
as diffusers does, so they cost that much. /animate costs per frame: its first frame's steps, then
`steps × strength` for each further frame. A `/teach` training step costs TRAINING_STEP_FACTOR denoising
steps per picture of its batch (a forward pass, and a backward pass of about twice its work).

The jobs are the ledger: each job row carries its charge (`jobs.cost_milli`). It is *reserved* when the
job is queued, *committed* when it succeeds, and *refunded* when it fails or is cancelled: a charge
counts exactly while the job is queued, running or succeeded. So there is no counter to drift, and a
refund is the status change itself. Every check that reads the ledger runs in the submitting unit of
work, after locking the user's row (SQLite: `BEGIN IMMEDIATE` already serialises writers), so
concurrent submissions can never spend the same units twice.

Every refusal says which limit it is, when it lifts, and the setting that raises it. Every safety
decision is a `SafetyFlag` row.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, func, or_, select

from bot.config import QuotaTier, Settings
from bot.database import UnitOfWork
from bot.domain import GenerationParams, JobKind, JobStatus, Requester
from bot.errors import QueueFull, QuotaExceeded, Refused
from bot.models import Appeal, Job, QuotaGrant, SafetyFlag, User
from bot.views import QuotaStatus

UNIT_WORK = 512 * 512 * 20  # pixels × steps of one unit
CHARGED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.SUCCEEDED.value)
# A training that failed or was cancelled keeps the charge of the steps it ran (finish_job lowers its
# cost_milli to that); the rest is refunded.
PARTLY_CHARGED = (JobStatus.FAILED.value, JobStatus.CANCELLED.value)
TRAINING_STEP_FACTOR = 3
MINUTE = timedelta(seconds=60)
PERMANENT = datetime(9999, 1, 1, tzinfo=UTC)  # a ban "forever"


def steps_run(params: GenerationParams) -> int:
    """Denoising steps the model actually runs: /edit and /inpaint skip the first (1 - strength); an
    animation runs its first frame's (counted also when the first frame is an attached picture), then a
    frame's img2img each; a training step counts TRAINING_STEP_FACTOR; an upscale without an img2img pass
    counts one."""
    if params.kind is JobKind.TEACH:
        return params.steps * TRAINING_STEP_FACTOR
    redraw = params.steps if params.strength is None else max(1, min(params.steps, int(params.steps * params.strength)))
    if params.kind is JobKind.ANIMATE and params.motion is not None:
        return params.steps + (params.motion.frames - 1) * redraw
    if params.kind is JobKind.UPSCALE and params.strength is None:
        return 1  # the upscale model alone: one pass over the picture, less work than one denoising step
    if params.kind is JobKind.IMAGINE or params.strength is None:
        return params.steps
    return redraw


def cost_milli(params: GenerationParams) -> int:
    """The job's charge in thousandths of a unit, rounded up (so no job is free). A training's `n` is
    the pictures of each of its steps."""
    work = params.width * params.height * steps_run(params) * params.n
    return max(1, -(-work * 1000 // UNIT_WORK))


@functools.cache  # built once: every submission's quota check asks for it
def is_charged() -> ColumnElement[bool]:
    """The jobs whose cost_milli counts against their owner's quota."""
    return or_(Job.status.in_(CHARGED), and_(Job.kind == JobKind.TEACH.value, Job.status.in_(PARTLY_CHARGED)))


@functools.cache  # built once, run with its values bound: every submission's quota check runs it
def _usage_query() -> Select[Any]:
    """Policy.usage's statement: :user_id's charges since :day and since :minute_ago (reading from
    :since, the earlier of the two), and their grant of the :date."""
    today, last_minute = Job.created_at >= bindparam("day"), Job.created_at > bindparam("minute_ago")
    granted = select(QuotaGrant.extra_milli).where(
        QuotaGrant.user_id == bindparam("user_id"), QuotaGrant.day == bindparam("date")).scalar_subquery()
    return select(
        func.coalesce(func.sum(Job.cost_milli).filter(today), 0),
        func.coalesce(func.sum(Job.n).filter(today, Job.kind != JobKind.TEACH.value), 0),  # images
        func.coalesce(func.sum(Job.cost_milli).filter(today, Job.status != JobStatus.SUCCEEDED.value), 0),
        func.coalesce(func.sum(Job.cost_milli).filter(last_minute), 0),
        func.min(Job.created_at).filter(last_minute),
        func.coalesce(granted, 0),
    ).where(Job.user_id == bindparam("user_id"), is_charged(), Job.created_at >= bindparam("since"))


def used_part_milli(cost: int, steps_done: int, steps: int) -> int:
    """What a training that stopped after `steps_done` of `steps` keeps charging (rounded up)."""
    return -(-cost * max(0, min(steps_done, steps)) // max(steps, 1))


def units(milli: float) -> str:
    """A number of units for people: `units(1500)` is "1.5", `units(16)` is "0.02"."""
    if math.isinf(milli):
        return "unlimited"
    return f"{milli / 1000:.2f}".rstrip("0").rstrip(".") or "0"


def units_of(milli: float) -> str:
    """`units_of(1000)` is "1 unit", `units_of(2500)` is "2.5 units"."""
    shown = units(milli)
    return f"{shown} unit" if shown == "1" else f"{shown} units"


def user_key(platform: str, user_id: str) -> str:
    return f"{platform}:{user_id}"


def start_of_day(now: datetime) -> datetime:
    return datetime.combine(now.date(), time(0), tzinfo=UTC)


def next_midnight(now: datetime) -> datetime:
    return start_of_day(now) + timedelta(days=1)


def humanize(delta: timedelta) -> str:
    """`humanize(timedelta(minutes=125))` is "2 h 5 min"; at least "1 min"; days past 48 h."""
    minutes = max(1, math.ceil(delta.total_seconds() / 60))
    hours, minutes = divmod(minutes, 60)
    if hours >= 48:
        return f"{round(hours / 24)} days"
    return f"{hours} h {minutes} min" if hours and minutes else f"{hours} h" if hours else f"{minutes} min"


def when(moment: datetime, now: datetime) -> str:
    """"2026-05-01 14:00 UTC (in 3 h)", or "permanently" for a ban forever."""
    if moment >= PERMANENT:
        return "permanently"
    return f"until {moment:%Y-%m-%d %H:%M} UTC (in {humanize(moment - now)})"


@dataclass(frozen=True)
class Usage:
    """What a user's jobs have charged, read in one statement (every submission pays for it)."""

    daily_milli: int
    daily_images: int
    reserved_milli: int  # the part of daily_milli held by jobs still queued or running
    minute_milli: int  # charged in the last 60 s
    minute_oldest: datetime | None  # when the oldest charge of the last 60 s was made
    granted_milli: int = 0  # extra units a moderator granted for today (/mod quota USER grant N)


NO_USAGE = Usage(0, 0, 0, 0, None)


class Policy:
    """Decisions the job service and the moderators share. Methods take the caller's unit of work: a
    check and the change it allows happen in one transaction."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # -- who is who ----------------------------------------------------------------------------------

    def is_owner(self, platform: str, user_id: str) -> bool:
        return user_key(platform, user_id) in self.settings.moderation.owner_ids

    def is_moderator(self, requester: Requester) -> bool:
        return self.is_owner(requester.platform, requester.user_id) or requester.is_platform_moderator

    def tier_name(self, user: User, requester: Requester | None = None) -> str:
        tiers = self.settings.quota.tiers
        if self.is_owner(user.platform, user.platform_user_id) and "owner" in tiers:
            return "owner"
        if requester is not None and requester.is_local_operator:
            return self.settings.console.tier  # Settings checked that the tier exists
        if requester is not None and requester.quota_tier is not None:
            return requester.quota_tier  # a setting that Settings checked names a tier
        if requester is not None and requester.is_platform_moderator and "moderator" in tiers \
                and user.role in ("user", "moderator"):
            return "moderator"
        return user.role if user.role in tiers else "user"

    def tier(self, name: str) -> QuotaTier:
        return self.settings.quota.tiers[name]

    # -- bans and strikes ----------------------------------------------------------------------------

    @staticmethod
    def check_not_banned(user: User, now: datetime) -> None:
        if user.banned_until is not None and user.banned_until > now:
            reason = f" Reason: {user.ban_reason}." if user.ban_reason else ""
            raise Refused(f"You are banned {when(user.banned_until, now)}.{reason} "
                          "If you think this is a mistake: /appeal ban <why>")

    async def record(self, uow: UnitOfWork, user: User, *, subject: str, category: str,
                     reason_code: str, source: str, action: str, now: datetime, job_id: str | None = None,
                     detail: str | None = None, actor: str | None = None) -> SafetyFlag:
        """Write one safety decision (flushed, so it has an id)."""
        flag = SafetyFlag(user_id=user.id, job_id=job_id, subject=subject[:128], category=category[:64],
                          reason_code=reason_code[:64], source=source, action=action, created_at=now,
                          detail=detail[:2000] if detail else None, actor=actor)
        uow.session.add(flag)
        await uow.session.flush()
        return flag

    async def ban(self, uow: UnitOfWork, user: User, until: datetime, reason: str, now: datetime, *,
                  source: str, actor: str | None = None) -> None:
        user.banned_until = until
        user.ban_reason = reason
        await self.record(uow, user, subject="user", category="moderation", reason_code=source,
                          source=source, action="ban", now=now, actor=actor,
                          detail=f"{reason} ({when(until, now)})")

    async def strike(self, uow: UnitOfWork, user: User, now: datetime) -> str:
        """Count the user's strikes after a new one was recorded; ban at the configured number.
        Returns the sentence that tells the user where they stand."""
        config = self.settings.moderation
        if config.strikes_to_ban == 0:
            return ""
        count = await self.strike_count(uow, user, now)
        window = humanize(timedelta(hours=config.strike_window_hours))
        length = timedelta(hours=config.strike_ban_hours)
        if count < config.strikes_to_ban:
            return (f" This is strike {count} of {config.strikes_to_ban} within {window}; at "
                    f"{config.strikes_to_ban} you are banned for {humanize(length)}.")
        reason = f"{count} refused requests within {window}"
        await self.ban(uow, user, now + length, reason, now, source="strikes")
        return f" That is strike {count} of {config.strikes_to_ban} within {window}, so you are banned " \
               f"for {humanize(length)}, {when(now + length, now)}."

    async def strike_count(self, uow: UnitOfWork, user: User, now: datetime) -> int:
        """Strikes in the window, since the last ban, leaving out those a moderator accepted an appeal for."""
        config = self.settings.moderation
        since = now - timedelta(hours=config.strike_window_hours)
        last_ban = await uow.session.scalar(select(func.max(SafetyFlag.created_at)).where(
            SafetyFlag.user_id == user.id, SafetyFlag.action == "ban"))
        if last_ban is not None and last_ban > since:
            since = last_ban
        accepted = select(Appeal).where(Appeal.status == "accepted", Appeal.user_id == user.id)
        voided_flags = accepted.with_only_columns(Appeal.flag_id).where(Appeal.flag_id.is_not(None))
        voided_jobs = accepted.with_only_columns(Appeal.job_id).where(Appeal.job_id.is_not(None))
        return await uow.session.scalar(select(func.count()).select_from(SafetyFlag).where(
            SafetyFlag.user_id == user.id, SafetyFlag.action.in_(config.strike_actions),
            SafetyFlag.created_at > since, SafetyFlag.id.not_in(voided_flags),
            or_(SafetyFlag.job_id.is_(None), SafetyFlag.job_id.not_in(voided_jobs)))) or 0

    # -- the queue -----------------------------------------------------------------------------------

    async def check_queue_room(self, uow: UnitOfWork, params: GenerationParams, now: datetime, *,
                               mine: int, waiting: int) -> None:
        """Per-user concurrency, the global queue cap ("busy") and the busy size cap, given the user's
        unfinished jobs (`mine`) and all waiting jobs (`waiting`), as `uow.jobs.queue_load` counts them."""
        cap = self.settings.queue.max_queued_per_user
        if mine >= cap:
            raise QueueFull(f"You already have {mine} jobs waiting or running (the limit is {cap}, "
                            "queue.max_queued_per_user); wait for one to finish or /cancel one")
        total_cap = self.settings.quota.max_queued_total
        if total_cap and waiting >= total_cap:
            lifts = await self._lift_estimate(uow, waiting - total_cap + 1, now)
            raise QueueFull(f"Easel is busy: {waiting} jobs are waiting, the most it takes at once "
                            f"(quota.max_queued_total). Try again {lifts}.")
        caps = [c for c in self.settings.quota.busy_size_caps if waiting >= c.queued_jobs]
        if caps:
            tightest = min(caps, key=lambda c: c.max_pixels)
            if params.width * params.height > tightest.max_pixels:
                side = int(math.sqrt(tightest.max_pixels)) // 8 * 8
                raise QueueFull(
                    f"Easel is busy ({waiting} jobs waiting), so images may have at most {tightest.max_pixels} "
                    f"pixels for now (e.g. --size {side}x{side}); yours is {params.width}x{params.height}. "
                    f"Use a smaller --size or --ar, or try again when fewer than {tightest.queued_jobs} "
                    "jobs are waiting (quota.busy_size_caps).")

    async def _lift_estimate(self, uow: UnitOfWork, jobs_to_finish: int, now: datetime) -> str:
        """'in about N min' from how fast jobs finished in the last 15 minutes, when that is known."""
        finished = await uow.session.scalar(select(func.count()).select_from(Job).where(
            Job.finished_at > now - timedelta(minutes=15))) or 0
        if not finished:
            return "in a few minutes, when some of them have finished"
        return f"in about {humanize(timedelta(minutes=jobs_to_finish * 15 / finished))}"

    # -- quota ---------------------------------------------------------------------------------------

    async def usage(self, uow: UnitOfWork, user: User, now: datetime) -> Usage:
        """The day's and the last minute's charges and today's grant, in one statement."""
        day, minute_ago = start_of_day(now), now - MINUTE
        row = (await uow.session.execute(_usage_query(), {
            "user_id": user.id, "day": day, "date": now.date(), "minute_ago": minute_ago,
            "since": min(day, minute_ago)})).one()
        daily_milli, daily_images, reserved, minute_milli, minute_oldest, granted_milli = row
        return Usage(int(daily_milli), int(daily_images), int(reserved), int(minute_milli), minute_oldest,
                     int(granted_milli))

    async def minute_charges(self, uow: UnitOfWork, user: User, now: datetime) -> list[tuple[datetime, int]]:
        """(created_at, cost_milli) of the user's charges in the last 60 s, oldest first: read only to
        say when a per-minute refusal lifts."""
        return [(created_at, cost) for created_at, cost in (await uow.session.execute(
            select(Job.created_at, Job.cost_milli).where(
                Job.user_id == user.id, is_charged(), Job.created_at > now - MINUTE)
            .order_by(Job.created_at))).all()]

    @staticmethod
    def daily_limit_milli(tier: QuotaTier, usage: Usage) -> float:
        return tier.daily_units * 1000 + usage.granted_milli

    def images_limit(self, user: User) -> int:
        """The plain images-per-day cap: the user's own (set with an API key), else queue's; 0 = none."""
        return user.daily_images_limit if user.daily_images_limit is not None \
            else self.settings.queue.daily_images_per_user

    @staticmethod
    def images_limit_setting(user: User) -> str:
        """Where `images_limit` comes from: what a user reads to know who can raise it."""
        return "this API key's --quota (easel apikey create)" if user.daily_images_limit is not None \
            else "queue.daily_images_per_user"

    async def reserve(self, uow: UnitOfWork, user: User, requester: Requester,
                      params: GenerationParams, now: datetime) -> int:
        """Check every window for this job's cost; return the charge to store on the job (which is
        the reservation). Raises QuotaExceeded naming the window and when it lifts."""
        # Lock the user's row: concurrent submissions of one user then check and charge one at a time.
        # (SQLite has no row locks; its BEGIN IMMEDIATE already lets one writer in at a time.)
        if uow.session.get_bind().dialect.name != "sqlite":
            await uow.session.execute(select(User.id).where(User.id == user.id).with_for_update())
        return await self.check_quota(uow, user, requester, params, now)

    async def check_quota(self, uow: UnitOfWork, user: User | None, requester: Requester,
                          params: GenerationParams, now: datetime) -> int:
        """`reserve` without the lock, for dry runs (`user` None: someone new). Returns the cost."""
        if user is None:
            user = User(platform=requester.platform, platform_user_id=requester.user_id, role="user")
        cost = cost_milli(params)
        name = self.tier_name(user, requester)
        tier = self.tier(name)
        usage = await self.usage(uow, user, now) if user.id is not None else NO_USAGE
        too_big = (f"this job alone costs {units_of(cost)}, more than the whole window; make it smaller "
                   + ("(fewer --steps)" if params.kind is JobKind.TEACH else
                      "(fewer --n, a smaller --size, fewer --steps)"))
        daily = self.daily_limit_milli(tier, usage)
        if usage.daily_milli + cost > daily:
            lifts = next_midnight(now)
            raise QuotaExceeded(
                f"Daily quota reached ({name} tier): {units(usage.daily_milli)} of {units(daily)} units used "
                f"today, this job needs {units(cost)}. " + (
                    too_big[0].upper() + too_big[1:] + "." if cost > daily else
                    f"It resets at {lifts:%H:%M} UTC (in {humanize(lifts - now)}); /quota shows what is left.")
                + f" {_raised_by(f'quota.tiers.{name}.daily_units')}",
                retry_after_s=None if cost > daily else (lifts - now).total_seconds())
        if params.kind is JobKind.TEACH:  # its steps run a slice at a time: no burst, and no images
            return cost
        per_minute = tier.per_minute_units * 1000
        if usage.minute_milli + cost > per_minute:
            raised_by = _raised_by(f"quota.tiers.{name}.per_minute_units")
            if cost > per_minute:
                raise QuotaExceeded(f"Per-minute quota ({name} tier, {units(per_minute)} units a minute): "
                                    f"{too_big}. {raised_by}")
            lifts = _minute_lifts_at(await self.minute_charges(uow, user, now), cost, per_minute, now)
            raise QuotaExceeded(
                f"Per-minute quota reached ({name} tier): {units(usage.minute_milli)} of {units(per_minute)} "
                f"units used in the last minute, this job needs {units(cost)}. Try again in "
                f"{max(1, math.ceil((lifts - now).total_seconds()))} s. {raised_by}",
                retry_after_s=(lifts - now).total_seconds())
        images_cap = self.images_limit(user)
        if images_cap and usage.daily_images + params.n > images_cap:
            lifts = next_midnight(now)
            raise QuotaExceeded(
                f"Daily image limit reached: {usage.daily_images} of {images_cap} images used today, this "
                f"job needs {params.n}. It resets at {lifts:%H:%M} UTC (in {humanize(lifts - now)}). "
                + _raised_by(self.images_limit_setting(user)),
                retry_after_s=None if params.n > images_cap else (lifts - now).total_seconds())
        return cost

    async def status(self, uow: UnitOfWork, user: User | None, requester: Requester,
                     now: datetime, params: GenerationParams | None = None) -> QuotaStatus:
        """What /quota shows. `user` is None for someone who never submitted anything."""
        if user is None:  # a newcomer: nothing used, no grants, the default tier
            user = User(platform=requester.platform, platform_user_id=requester.user_id, role="user")
            usage = NO_USAGE
        else:
            usage = await self.usage(uow, user, now)
        name = self.tier_name(user, requester)
        tier = self.tier(name)
        daily = self.daily_limit_milli(tier, usage)
        return QuotaStatus(
            used=usage.daily_milli / 1000, limit=daily / 1000, resets_at=next_midnight(now), tier=name,
            reserved=usage.reserved_milli / 1000, minute_used=usage.minute_milli / 1000,
            minute_limit=tier.per_minute_units, images_used=usage.daily_images,
            images_limit=self.images_limit(user), images_limit_setting=self.images_limit_setting(user),
            minute_resets_at=usage.minute_oldest + MINUTE if usage.minute_oldest else None,
            cost=cost_milli(params) / 1000 if params is not None else None,
            cost_of=describe_params(params) if params is not None else "",
        )


def _raised_by(setting: str) -> str:
    """The sentence every quota refusal ends with: which setting the operator changes to lift it."""
    return f"(Set by the operator: {setting}.)"


def _minute_lifts_at(charges: list[tuple[datetime, int]], cost: int, limit: float, now: datetime) -> datetime:
    """When enough of the last minute's `charges` (oldest first) have aged out for `cost` to fit."""
    remaining = sum(charge for _, charge in charges)
    for created_at, charge in charges:
        remaining -= charge
        if remaining + cost <= limit:
            return created_at + MINUTE
    return now + MINUTE


def describe_params(params: GenerationParams) -> str:
    if params.kind is JobKind.TEACH:
        return f"/teach {params.steps} steps of {params.n} pictures at {params.width}x{params.height}"
    steps = steps_run(params)
    if params.motion is not None:
        return f"/animate {params.width}x{params.height}, {params.motion.frames} frames, {steps} steps in all"
    ran = f"{steps} of {params.steps} steps" if steps != params.steps else f"{steps} steps"
    return (f"/{params.kind.value} {params.width}x{params.height}, {ran}, {params.n} "
            f"image{'s' if params.n != 1 else ''}")


def describe_quota(status: QuotaStatus, now: datetime | None = None) -> str:
    """The /quota answer every adapter can show as it is.

    Example: "Quota (user tier): 48.5 of 50 units left today (0.5 reserved by jobs in progress);
    resets at 00:00 UTC (in 5 h 3 min). Per minute: 4.5 of 5 units left. /imagine 512x512, 20 steps,
    1 image costs 1 unit (512x512, 20 steps, 1 image = 1 unit)."
    """
    now = now or datetime.now(UTC)
    lines = []
    reserved = f" ({units(status.reserved * 1000)} reserved by jobs in progress)" if status.reserved else ""
    if math.isinf(status.limit):
        lines.append(f"Quota ({status.tier} tier): no daily limit on units; {units(status.used * 1000)} units used "
                     f"today{reserved}.")
    else:
        lines.append(f"Quota ({status.tier} tier): {units(status.remaining * 1000)} of {units(status.limit * 1000)} "
                     f"units left today{reserved}; resets at {status.resets_at:%H:%M} UTC "
                     f"(in {humanize(status.resets_at - now)}).")
    if not math.isinf(status.minute_limit):
        left = max(0.0, status.minute_limit - status.minute_used)
        lines.append(f"Per minute: {units(left * 1000)} of {units(status.minute_limit * 1000)} units left"
                     + (f" (more from {status.minute_resets_at:%H:%M:%S} UTC)."
                        if status.minute_resets_at and left < status.minute_limit else "."))
    if status.images_limit:
        # A cap of its own, apart from the tier's units: say which setting it is, so "no daily limit on units"
        # and "2 of 200" do not read as a contradiction.
        lines.append(f"Images today: {status.images_used} of {status.images_limit} "
                     f"(the daily image cap, {status.images_limit_setting}).")
    if status.cost is not None:
        lines.append(f"{status.cost_of} costs {units_of(status.cost * 1000)} "
                     "(512x512, 20 steps, 1 image = 1 unit).")
    return "\n".join(lines)
