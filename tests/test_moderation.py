"""Moderators and appeals: every /mod command's permission check, bans, quota changes, flags,
appeals and their effects, through the real parser, service and SQLite database."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest

from adapters.console import ConsoleChat
from bot.bootstrap import Core
from bot.domain import JobStatus, Requester
from bot.errors import InvalidCommand, NotFound, Refused
from generation.worker import Worker
from tests.conftest import alice, bob

OWNER = Requester("console", "boss", display_name="Boss")
DISCORD_MOD = Requester("discord", "42", display_name="Mod", is_platform_moderator=True)
DISCORD_USER = Requester("discord", "7", display_name="Dee")
TELEGRAM_USER = Requester("telegram", "9", display_name="Tee")

MOD_COMMANDS = [
    "/mod flags", "/mod flags console:alice", "/mod ban console:alice 1h spam", "/mod unban console:alice",
    "/mod quota console:alice", "/mod quota console:alice tier trusted", "/mod quota console:alice grant 5",
    "/mod appeals", "/mod appeal 1 accept",
]


@pytest.fixture
def core(core: Core) -> Core:
    core.settings.moderation.owner_ids = ["console:boss"]
    return core


async def mod(core: Core, who: Requester, text: str) -> str:
    return await core.moderation.handle(who, core.parser.parse(text))


async def submit(core: Core, text: str, who: Requester | None = None):
    return await core.service.submit(who or alice(), core.parser.parse(text))


@pytest.mark.parametrize("text", MOD_COMMANDS)
async def test_every_mod_command_is_refused_to_ordinary_users(core: Core, text: str) -> None:
    await submit(core, "/imagine a cat")
    with pytest.raises(Refused, match="/mod is for moderators"):
        await mod(core, bob(), text)
    with pytest.raises(Refused, match="/mod is for moderators"):  # a moderator elsewhere is not one here
        await mod(core, Requester("console", "bob", is_platform_moderator=False), text)


@pytest.mark.parametrize("text", MOD_COMMANDS)
async def test_every_mod_command_is_refused_to_other_platforms_moderators(core: Core, text: str) -> None:
    await submit(core, "/imagine a cat")
    if text in ("/mod flags", "/mod appeals"):  # lists: allowed, but only their platform's records show
        answer = await mod(core, DISCORD_MOD, text)
        assert "console:" not in answer
        return
    with pytest.raises((Refused, NotFound), match=r"discord moderators act on discord users only|No appeal"):
        await mod(core, DISCORD_MOD, text)


@pytest.mark.parametrize("text", MOD_COMMANDS)
async def test_every_mod_command_works_for_an_owner(core: Core, text: str) -> None:
    await submit(core, "/imagine a cat")
    if text.startswith("/mod unban"):
        await mod(core, OWNER, "/mod ban console:alice")
    if text.startswith("/mod appeal "):
        await mod(core, OWNER, "/mod ban console:alice")
        await mod(core, alice(), "/appeal ban I was only drawing cats")
    assert await mod(core, OWNER, text)


async def test_a_platform_moderator_bans_and_unbans_users_of_their_platform(core: Core) -> None:
    await submit(core, "/imagine a cat", DISCORD_USER)
    answer = await mod(core, DISCORD_MOD, "/mod ban <@7> 2d spamming the channel")
    assert "Banned discord:7 (Dee) until" in answer and "(in 2 days)" in answer
    with pytest.raises(Refused, match=r"banned until .*\(in 2 days\)\. Reason: spamming the channel\. .*/appeal ban"):
        await submit(core, "/imagine a cat", DISCORD_USER)
    assert "Unbanned discord:7" in await mod(core, DISCORD_MOD, "/mod unban 7")
    assert (await submit(core, "/imagine a cat", DISCORD_USER)).job.status is JobStatus.QUEUED
    with pytest.raises(InvalidCommand, match="is not banned"):
        await mod(core, DISCORD_MOD, "/mod unban 7")


async def test_owners_act_on_every_platform_and_bans_can_be_permanent(core: Core) -> None:
    await submit(core, "/imagine a cat", TELEGRAM_USER)
    assert "permanently" in await mod(core, OWNER, "/mod ban telegram:9 forever abuse")
    ten_years_on = core.clock() + timedelta(days=3650)
    core.clock.set(ten_years_on)
    with pytest.raises(Refused, match=r"You are banned permanently\. Reason: abuse"):
        await submit(core, "/imagine a cat", TELEGRAM_USER)


async def test_owners_and_yourself_cannot_be_banned(core: Core) -> None:
    with pytest.raises(Refused, match="is an owner"):
        await mod(core, OWNER, "/mod ban boss")
    with pytest.raises(Refused, match="cannot ban yourself"):
        await mod(core, DISCORD_MOD, "/mod ban 42")


async def test_mod_flags_shows_the_story_of_a_user(core: Core) -> None:
    with pytest.raises(Refused):
        await submit(core, "/imagine l.o.l.i")
    await submit(core, "/imagine a cat", bob())
    await mod(core, OWNER, "/mod ban console:alice 1h repeated refusals")
    answer = await mod(core, OWNER, "/mod flags console:alice")
    lines = answer.splitlines()
    assert lines[0] == "Latest 2 safety flags, newest first:"
    assert "ban by console:boss: moderation/moderator" in lines[1] and "repeated refusals" in lines[1]
    assert "block: minors/matched_word (prompt)" in lines[2] and "l.o.l.i" in lines[2]
    assert await mod(core, OWNER, "/mod flags console:bob") == "No safety flags for console:bob."


async def test_mod_quota_shows_sets_the_tier_and_grants_units(core: Core) -> None:
    core.settings.quota.tiers["user"].daily_units = 16 / 1000  # one tiny image a day
    await submit(core, "/imagine a cat")
    with pytest.raises(Exception, match="Daily quota reached"):
        await submit(core, "/imagine a cat")
    assert "0 of 0.02 units left today" in await mod(core, OWNER, "/mod quota console:alice")
    answer = await mod(core, OWNER, "/mod quota console:alice grant 0.016")
    assert answer.startswith("Granted 0.02 extra units for today.")
    assert (await submit(core, "/imagine a cat")).job.status is JobStatus.QUEUED
    answer = await mod(core, OWNER, "/mod quota console:alice tier trusted")
    assert "Tier set to trusted" in answer and "(trusted tier)" in answer
    with pytest.raises(InvalidCommand, match="tier 'gold' is not one of user, trusted, moderator"):
        await mod(core, OWNER, "/mod quota console:alice tier gold")
    assert [line.split(": ")[1] for line in (await mod(core, OWNER, "/mod flags console:alice")).splitlines()[1:3]] \
        == ["moderation/tier (user) tier trusted", "moderation/grant (user) +0.02 units on " +
            f"{core.clock():%Y-%m-%d}"]


async def test_appeals_are_recorded_listed_and_decided(core: Core) -> None:
    core.settings.moderation.strikes_to_ban = 2
    with pytest.raises(Refused) as refused:
        await submit(core, "/imagine loli")
    flag = refused.value.message.rsplit("/appeal ", 1)[1].split()[0]
    assert flag.startswith("f")
    answer = await mod(core, alice(), f"/appeal {flag} it was about the Nabokov novel cover")
    assert answer.startswith("Appeal #1 recorded")
    with pytest.raises(InvalidCommand, match="appeal #1 about this is still open"):
        await mod(core, alice(), f"/appeal {flag} again")
    job = (await submit(core, "/imagine a cat", bob())).job
    with pytest.raises(NotFound, match="No safety flag"):
        await mod(core, bob(), f"/appeal {flag} not mine")
    with pytest.raises(NotFound, match="No job"):
        await mod(core, alice(), f"/appeal {job.id} not mine either")

    listing = await mod(core, OWNER, "/mod appeals")
    assert "#1 " in listing and f"about flag {flag}" in listing and "Nabokov" in listing
    assert "accepted. Its strike no longer counts." in await mod(core, OWNER, "/mod appeal 1 accept fair")
    # The voided strike is not counted: the next refusal is strike 1 again, not 2 (which would ban).
    with pytest.raises(Refused, match="strike 1 of 2"):
        await submit(core, "/imagine loli")
    assert await mod(core, OWNER, "/mod appeals") == "No open appeals."
    with pytest.raises(InvalidCommand, match="already accepted by console:boss"):
        await mod(core, OWNER, "/mod appeal 1 reject")


async def test_accepting_a_ban_appeal_lifts_the_ban(core: Core) -> None:
    await submit(core, "/imagine a cat")
    with pytest.raises(InvalidCommand, match="You are not banned"):
        await mod(core, alice(), "/appeal ban why not")
    await mod(core, OWNER, "/mod ban console:alice 7d")
    await mod(core, alice(), "/appeal ban I was only drawing cats")  # banned users may still appeal
    assert "The ban is lifted" in await mod(core, OWNER, "/mod appeal 1 accept")
    assert (await submit(core, "/imagine a cat")).job.status is JobStatus.QUEUED


async def test_the_console_answers_mod_and_appeal_commands(core: Core) -> None:
    await submit(core, "/imagine a cat", bob())
    out = io.StringIO()
    await ConsoleChat(core, out, requester=OWNER, progress=False).handle("/mod ban bob 1h spam")
    await ConsoleChat(core, out, requester=bob(), progress=False).handle("/mod unban bob")
    await ConsoleChat(core, out, requester=bob(), progress=False).handle("/appeal ban I am sorry")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Banned console:bob (Bob) until")
    assert lines[1].startswith("error: /mod is for moderators")
    assert lines[2].startswith("Appeal #1 recorded")


@pytest.mark.parametrize(("text", "error"), [
    ("/mod", "moderator commands: /mod flags"),
    ("/mod bna 12", "unknown /mod command bna (did you mean ban?)"),
    ("/mod ban", "/mod ban needs a user"),
    ("/mod ban 12 0m", "a ban lasts at least 1 minute"),
    ("/mod ban 12 99999w", "over ten years; use forever"),
    ("/mod quota 12 grant lots", "needs a number of units"),
    ("/mod appeal x accept", "usage: /mod appeal <id> accept|reject"),
    ("/appeal k7mq2x9a", "/appeal needs what you appeal and why"),
])
async def test_mod_and_appeal_mistakes_get_a_one_line_error_naming_the_fix(core: Core, text: str, error: str) -> None:
    with pytest.raises(InvalidCommand) as raised:
        core.parser.parse(text)
    assert error in raised.value.message and "\n" not in raised.value.message


async def test_a_withheld_image_is_a_strike_only_where_configured_and_bans_at_the_limit(
        any_core: Core, generator, flag_all_checker) -> None:
    any_core.settings.moderation.strikes_to_ban = 1
    worker = Worker(any_core.queue, generator, any_core.store, any_core.settings, worker_id="test-worker:1",
                    image_checker=flag_all_checker)
    # By default only a blocked prompt is a strike: Bob's withheld picture leaves him free to go on.
    await submit(any_core, "/imagine a red circle --steps 2", bob())
    await worker.run(burst=True)
    await submit(any_core, "/imagine a blue square --steps 2", bob())
    # With "withhold" among the strike actions, Alice's withheld picture is her one allowed strike.
    any_core.settings.moderation.strike_actions = ["block", "withhold"]
    first = await submit(any_core, "/imagine a red circle --steps 2")
    await worker.run(burst=True)
    job = await any_core.service.get_job(first.job.id)
    assert job.status is JobStatus.SUCCEEDED and any_core.deliveries.of_job(job).images == ()
    with pytest.raises(Refused, match="You are banned"):
        await submit(any_core, "/imagine a blue square --steps 2")
