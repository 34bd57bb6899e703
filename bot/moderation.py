"""/mod and /appeal: the same moderator tools on every platform, answered as plain text.

    reply = await core.moderation.handle(requester, core.parser.parse("/mod ban 1234 7d spam"))

Who may moderate: the owners in `moderation.owner_ids` ("platform:user_id"), on every platform, and
users the platform itself calls moderators (`Requester.is_platform_moderator`: Discord roles or
permissions, Telegram chat admins), for users of their own platform only. Everyone else is refused
with a message saying so. Users name other users by id: `1234` (the moderator's platform),
`telegram:1234`, or a Discord mention `<@1234>`.

Every moderator decision is also a safety flag row (source "moderator", with the moderator as actor),
so `/mod flags USER` tells a user's whole story.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select

from bot.config import Settings
from bot.database import Database, UnitOfWork
from bot.domain import (
    AppealCommand,
    Command,
    ModAppealsCommand,
    ModBanCommand,
    ModFlagsCommand,
    ModQuotaCommand,
    ModResolveCommand,
    ModShareCommand,
    ModTrainedCommand,
    ModUnbanCommand,
    Requester,
)
from bot.errors import InvalidCommand, NotFound, Refused
from bot.events import EventBus, EventKind
from bot.models import Appeal, QuotaGrant, SafetyFlag, User
from bot.policy import PERMANENT, Policy, describe_quota, units, user_key, when
from bot.safety import WITHHOLD, flagged_category, released_flags
from bot.teach import TeachService, describe_trained

_MENTION = re.compile(r"<@!?(\d+)>")
_PLATFORM_ID = re.compile(r"([a-z][a-z0-9_-]{0,31}):(\S+)")
LIST_LIMIT = 20


class Moderation:
    """Answers /mod and /appeal commands. Built once by `bot.bootstrap.open_core`, sharing the job
    service's policy, event bus and clock."""

    def __init__(self, settings: Settings, db: Database, policy: Policy, bus: EventBus,
                 clock: Callable[[], datetime], teach: TeachService | None = None) -> None:
        """`teach`: the trained words /mod share and /mod trained act on (None: those commands say so)."""
        self.teach = teach
        self.settings = settings
        self.db = db
        self.policy = policy
        self.bus = bus
        self.clock = clock

    async def handle(self, requester: Requester, command: Command) -> str:
        """The text to show the requester. Raises an EaselError (a one-line refusal) like the service."""
        if isinstance(command, AppealCommand):
            return await self.appeal(requester, command)
        handlers = {ModFlagsCommand: self.flags, ModBanCommand: self.ban, ModUnbanCommand: self.unban,
                    ModQuotaCommand: self.quota, ModAppealsCommand: self.appeals, ModResolveCommand: self.resolve,
                    ModShareCommand: self.share, ModTrainedCommand: self.trained}
        handler = handlers.get(type(command))
        if handler is None:
            raise InvalidCommand(f"{type(command).__name__} is not a /mod or /appeal command")
        if not self.policy.is_moderator(requester):
            raise Refused("/mod is for moderators: the bot's owners, and the platform's own moderators "
                          "(server roles, chat admins)")
        return await handler(requester, command)

    # -- permission and users ------------------------------------------------------------------------

    def _target(self, requester: Requester, reference: str) -> tuple[str, str]:
        """("platform", "user id") for `1234`, `<@1234>` or `telegram:1234`; checks the requester may act."""
        reference = reference.strip()
        if (mention := _MENTION.fullmatch(reference)) is not None:
            platform, user_id = requester.platform, mention[1]
        elif (qualified := _PLATFORM_ID.fullmatch(reference)) is not None:
            platform, user_id = qualified[1], qualified[2]
        elif reference.startswith("@"):
            raise InvalidCommand(f"name the user by id, not by {reference}: e.g. 1234, <@1234> or "
                                 f"{requester.platform}:1234")
        else:
            platform, user_id = requester.platform, reference
        if not self.policy.is_owner(requester.platform, requester.user_id) and platform != requester.platform:
            raise Refused(f"{requester.platform} moderators act on {requester.platform} users only; "
                          f"{platform}:{user_id} is for the bot's owners")
        return platform, user_id

    def _scope(self, requester: Requester) -> str | None:
        """The platform whose records a moderator sees: None (all) for owners."""
        return None if self.policy.is_owner(requester.platform, requester.user_id) else requester.platform

    @staticmethod
    async def _user(uow: UnitOfWork, platform: str, user_id: str, *, create_at: datetime | None = None) -> User:
        """The user; made at `create_at` if new and that is given (a moderator may act on someone who
        never used Easel), else NotFound."""
        if create_at is not None:
            return await uow.users.get_or_create(platform, user_id, now=create_at)
        user = await uow.users.get_by_platform(platform, user_id)
        if user is None:
            raise NotFound(f"{platform}:{user_id} has never used Easel")
        return user

    # -- /mod ----------------------------------------------------------------------------------------

    async def _trained_owner(self, requester: Requester, reference: str | None) -> int | None:
        """The users.id of the user named, whose trained word is meant; None: whoever trained it."""
        if reference is None:
            return None
        platform, user_id = self._target(requester, reference)
        async with self.db.unit_of_work(write=False) as uow:
            return (await self._user(uow, platform, user_id)).id

    async def share(self, requester: Requester, command: ModShareCommand) -> str:
        """/mod share NAME [user]: a trained word for everyone (bot/teach.py)."""
        if self.teach is None:
            raise InvalidCommand("/teach is not set up on this server")
        return await self.teach.share(command.name, await self._trained_owner(requester, command.user))

    async def trained(self, requester: Requester, command: ModTrainedCommand) -> str:
        """/mod trained: every trained word; /mod trained delete NAME [user]: forget one."""
        if self.teach is None:
            raise InvalidCommand("/teach is not set up on this server")
        if command.delete is not None:
            return await self.teach.delete(command.delete, await self._trained_owner(requester, command.user))
        scope = self._scope(requester)
        return describe_trained([each for each in await self.teach.trained()
                                 if scope is None or each.owner.startswith(f"{scope}:")])

    async def flags(self, requester: Requester, command: ModFlagsCommand) -> str:
        query = select(SafetyFlag, User).join(User, User.id == SafetyFlag.user_id)
        if command.user is not None:
            platform, user_id = self._target(requester, command.user)
            query = query.where(User.platform == platform, User.platform_user_id == user_id)
        elif (scope := self._scope(requester)) is not None:
            query = query.where(User.platform == scope)
        async with self.db.unit_of_work(write=False) as uow:
            rows = (await uow.session.execute(query.order_by(SafetyFlag.id.desc()).limit(LIST_LIMIT))).all()
            if not rows:
                return "No safety flags" + (f" for {command.user}." if command.user else ".")
            lines = [f"Latest {len(rows)} safety flags, newest first:"]
            for flag, user in rows:
                about = f"job {flag.job_id}" if flag.job_id else flag.subject
                by = f" by {flag.actor}" if flag.actor else ""
                lines.append(f"f{flag.id} {flag.created_at:%Y-%m-%d %H:%M} {_who(user)} {flag.action}{by}: "
                             f"{flag.category}/{flag.reason_code} ({about}) {_short(flag.detail or '')}")
            return "\n".join(lines)

    async def ban(self, requester: Requester, command: ModBanCommand) -> str:
        platform, user_id = self._target(requester, command.user)
        if self.policy.is_owner(platform, user_id):
            raise Refused(f"{platform}:{user_id} is an owner (moderation.owner_ids) and cannot be banned")
        if (platform, user_id) == (requester.platform, requester.user_id):
            raise Refused("you cannot ban yourself")
        now = self.clock()
        if command.forever:
            until = PERMANENT
        else:
            until = now + (command.duration or timedelta(hours=self.settings.moderation.default_ban_hours))
        reason = command.reason or "banned by a moderator"
        async with self.db.unit_of_work() as uow:
            user = await self._user(uow, platform, user_id, create_at=now)
            await self.policy.ban(uow, user, until, reason, now, source="moderator",
                                  actor=user_key(requester.platform, requester.user_id))
            await uow.commit()
            who = _who(user)
        return f"Banned {who} {when(until, now)}. Reason: {reason}. They are told this, and how to appeal, " \
               "when they next use Easel."

    async def unban(self, requester: Requester, command: ModUnbanCommand) -> str:
        platform, user_id = self._target(requester, command.user)
        now = self.clock()
        async with self.db.unit_of_work() as uow:
            user = await self._user(uow, platform, user_id)
            if user.banned_until is None or user.banned_until <= now:
                raise InvalidCommand(f"{_who(user)} is not banned")
            await self._lift_ban(uow, user, now, requester, "unbanned by a moderator")
            await uow.commit()
            return f"Unbanned {_who(user)}."

    async def _lift_ban(self, uow: UnitOfWork, user: User, now: datetime, requester: Requester, why: str) -> None:
        user.banned_until = None
        user.ban_reason = None
        await self.policy.record(uow, user, subject="user", category="moderation", reason_code="moderator",
                                 source="moderator", action="unban", now=now, detail=why,
                                 actor=user_key(requester.platform, requester.user_id))

    async def quota(self, requester: Requester, command: ModQuotaCommand) -> str:
        platform, user_id = self._target(requester, command.user)
        now = self.clock()
        actor = user_key(requester.platform, requester.user_id)
        async with self.db.unit_of_work() as uow:
            changes = command.tier is not None or command.grant_units is not None
            user = await self._user(uow, platform, user_id, create_at=now if changes else None)
            done = ""
            if command.tier is not None:
                tiers = self.settings.quota.tiers
                if command.tier not in tiers or command.tier == "owner":
                    choices = ", ".join(t for t in tiers if t != "owner")
                    raise InvalidCommand(f"tier {command.tier!r} is not one of {choices} (owners come from "
                                         "moderation.owner_ids)")
                user.role = command.tier
                done = f"Tier set to {command.tier}. "
                await self.policy.record(uow, user, subject="user", category="moderation",
                                         reason_code="tier", source="moderator", action="quota", now=now,
                                         detail=f"tier {command.tier}", actor=actor)
            if command.grant_units is not None:
                extra = round(command.grant_units * 1000)
                grant = await uow.session.get(QuotaGrant, (user.id, now.date()))
                if grant is None:
                    uow.session.add(QuotaGrant(user_id=user.id, day=now.date(), extra_milli=extra))
                else:
                    grant.extra_milli += extra
                done += f"Granted {units(extra)} extra units for today. "
                await self.policy.record(uow, user, subject="user", category="moderation",
                                         reason_code="grant", source="moderator", action="quota", now=now,
                                         detail=f"+{units(extra)} units on {now:%Y-%m-%d}", actor=actor)
            await uow.session.flush()
            status = await self.policy.status(uow, user, Requester(platform, user_id), now)
            await uow.commit()
            return f"{done}{_who(user)}: {describe_quota(status, now)}"

    async def appeals(self, requester: Requester, command: ModAppealsCommand) -> str:
        query = select(Appeal).where(Appeal.status == "open").order_by(Appeal.id).limit(LIST_LIMIT)
        if (scope := self._scope(requester)) is not None:
            query = query.join(User, User.id == Appeal.user_id).where(User.platform == scope)
        async with self.db.unit_of_work(write=False) as uow:
            rows = (await uow.session.scalars(query)).unique().all()
            if not rows:
                return "No open appeals."
            lines = [f"{len(rows)} open appeal(s), oldest first (decide with /mod appeal <id> accept|reject):"]
            for appeal in rows:
                lines.append(f"#{appeal.id} {appeal.created_at:%Y-%m-%d %H:%M} {_who(appeal.user)} about "
                             f"{_subject(appeal)}: {_short(appeal.text)}")
            return "\n".join(lines)

    async def resolve(self, requester: Requester, command: ModResolveCommand) -> str:
        now = self.clock()
        async with self.db.unit_of_work() as uow:
            appeal = await uow.session.get(Appeal, command.appeal_id)
            if appeal is None:
                raise NotFound(f"No appeal #{command.appeal_id}; /mod appeals lists the open ones")
            self._target(requester, f"{appeal.user.platform}:{appeal.user.platform_user_id}")
            if appeal.status != "open":
                raise InvalidCommand(f"appeal #{appeal.id} was already {appeal.status} by {appeal.resolved_by}")
            appeal.status = "accepted" if command.accept else "rejected"
            appeal.resolved_at, appeal.resolved_by = now, user_key(requester.platform, requester.user_id)
            appeal.resolution = command.note or None
            effect = ""
            if command.accept and appeal.job_id is None and appeal.flag_id is None:  # a ban appeal
                if appeal.user.banned_until is not None and appeal.user.banned_until > now:
                    await self._lift_ban(uow, appeal.user, now, requester, f"appeal #{appeal.id} accepted")
                    effect = " The ban is lifted."
            elif command.accept:
                effect = " Its strike no longer counts."
                released = await self._release_images(uow, appeal.job_id) if appeal.job_id else []
                if released:
                    effect += (f" Image(s) {', '.join(str(i + 1) for i in released)} of job {appeal.job_id} are "
                               "released and sent to their owner.")
            await self.policy.record(uow, appeal.user, subject=f"appeal:{appeal.id}", category="moderation",
                                     reason_code="appeal", source="moderator", action=f"appeal_{appeal.status}",
                                     now=now, job_id=appeal.job_id, detail=command.note or None,
                                     actor=appeal.resolved_by)
            await uow.commit()  # also wakes the watchers of a job whose images it released
            return f"Appeal #{appeal.id} by {_who(appeal.user)} {appeal.status}.{effect}"

    async def _release_images(self, uow: UnitOfWork, job_id: str) -> list[int]:
        """An accepted appeal about a job: its withheld images may be shown now (a moderator looked at
        them). Their flags become CATEGORY:released, and a `released` event sends them to the owner."""
        job = await uow.jobs.find(job_id)
        if job is None:
            return []
        released = []
        for image in job.images:
            if flagged_category(image.safety_flags or (), WITHHOLD) is not None:
                image.safety_flags = released_flags(image.safety_flags)
                released.append(image.index)
        if released:
            self.bus.stage(uow, job, EventKind.RELEASED, {"indexes": released})
        return released

    # -- /appeal -------------------------------------------------------------------------------------

    async def appeal(self, requester: Requester, command: AppealCommand) -> str:
        """Anyone, banned users included, may appeal a withheld image (job id), a refused prompt (fNN
        from the refusal) or their ban."""
        now = self.clock()
        async with self.db.unit_of_work() as uow:
            user = await uow.users.get_by_platform(requester.platform, requester.user_id)
            if user is None:
                raise NotFound("You have nothing to appeal: no job, refusal or ban of yours is on record")
            appeal = Appeal(user_id=user.id, text=command.text, status="open", created_at=now)
            if command.subject == "ban":
                if user.banned_until is None or user.banned_until <= now:
                    raise InvalidCommand("You are not banned; to appeal a refusal give its fNN or the job id")
                same = Appeal.job_id.is_(None) & Appeal.flag_id.is_(None)
            elif re.fullmatch(r"f[0-9]{1,9}", command.subject):
                flag = await uow.session.get(SafetyFlag, int(command.subject[1:]))
                if flag is None or flag.user_id != user.id:
                    raise NotFound(f"No safety flag {command.subject} of yours; the refusal message names it")
                appeal.flag_id, same = flag.id, Appeal.flag_id == flag.id
            else:
                job = await uow.jobs.find(command.subject)
                if job is None or job.user_id != user.id:
                    raise NotFound(f"No job {command.subject!r} of yours; give the id from the job's reply")
                appeal.job_id, same = job.id, Appeal.job_id == job.id
            earlier = await uow.session.scalar(select(Appeal.id).where(
                Appeal.user_id == user.id, Appeal.status == "open", same))
            if earlier is not None:
                raise InvalidCommand(f"Your appeal #{earlier} about this is still open; a moderator will look at it")
            uow.session.add(appeal)
            await uow.session.flush()
            await uow.commit()
            return f"Appeal #{appeal.id} recorded. A moderator will review it; thank you for explaining."


def _who(user: User) -> str:
    name = f" ({user.display_name})" if user.display_name else ""
    return f"{user.platform}:{user.platform_user_id}{name}"


def _subject(appeal: Appeal) -> str:
    if appeal.job_id:
        return f"job {appeal.job_id}"
    if appeal.flag_id:
        return f"flag f{appeal.flag_id}"
    return "their ban" + (f" ({when(appeal.user.banned_until, appeal.created_at)})"
                          if appeal.user.banned_until else "")


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
