"""Quotas in cost units: pricing, reserve / commit / refund (also under concurrent submissions, on
SQLite and PostgreSQL), the daily and per-minute windows per tier, /quota, and the queue caps."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from bot.bootstrap import Core
from bot.config import BusySizeCap
from bot.domain import GenerationParams, JobKind, JobStatus, Requester
from bot.errors import QueueFull, QuotaExceeded
from bot.policy import cost_milli, describe_quota, steps_run
from tests.conftest import alice, bob

TINY = 16  # milli-units of one 64x64, 20-step image: 64*64*20 / (512*512*20) = 1/64, rounded up


@pytest.fixture
def core(any_core: Core) -> Core:
    """Every test here runs on SQLite and on PostgreSQL."""
    any_core.settings.queue.max_queued_per_user = 1000
    return any_core


async def submit(core: Core, text: str, who=alice):
    return await core.service.submit(who(), core.parser.parse(text))


def user(name: str) -> Requester:
    return Requester(platform="console", user_id=name, display_name=name)


# -- pricing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "units"), [
    (GenerationParams(JobKind.IMAGINE, "x", width=512, height=512, steps=20, n=1), 1.0),
    (GenerationParams(JobKind.IMAGINE, "x", width=512, height=512, steps=40, n=2), 4.0),
    (GenerationParams(JobKind.IMAGINE, "x", width=1024, height=512, steps=10, n=1), 1.0),
    # img2img runs steps × strength: 20 steps at 0.5 run 10
    (GenerationParams(JobKind.EDIT, "x", width=512, height=512, steps=20, n=1, strength=0.5), 0.5),
    (GenerationParams(JobKind.INPAINT, "x", width=512, height=512, steps=20, n=1, strength=1.0), 1.0),
    (GenerationParams(JobKind.IMAGINE, "x", width=64, height=64, steps=20, n=1), TINY / 1000),
])
def test_cost_is_pixels_times_steps_run_times_images(params: GenerationParams, units: float) -> None:
    assert cost_milli(params) / 1000 == pytest.approx(units)


def test_img2img_counts_the_steps_it_actually_runs() -> None:
    assert steps_run(GenerationParams(JobKind.EDIT, "x", steps=30, strength=0.6)) == 18
    assert steps_run(GenerationParams(JobKind.EDIT, "x", steps=3, strength=0.05)) == 1  # never free


# -- reserve, commit, refund -----------------------------------------------------------------------------


async def test_reserved_at_submit_committed_on_success_refunded_on_fail_and_cancel(core: Core) -> None:
    done = (await submit(core, "/imagine a cat")).job
    failed = (await submit(core, "/imagine a cat --n 2")).job
    cancelled_running = (await submit(core, "/imagine a cat --n 3")).job
    cancelled_queued = (await submit(core, "/imagine a cat --n 4")).job
    status = await core.service.quota(alice())
    assert status.used == pytest.approx((16 + 32 + 47 + 63) / 1000)  # 1/64 unit an image, rounded up per job
    assert status.reserved == status.used

    await core.queue.claim_batch("test:1", max_images=6)  # the first three jobs
    assert await core.queue.complete(done.id, [])
    await core.queue.fail(failed.id, "boom")
    await core.service.cancel(alice(), cancelled_running.id)
    await core.service.cancel(alice(), cancelled_queued.id)

    status = await core.service.quota(alice())
    assert status.used == pytest.approx(TINY / 1000)  # only the success is still charged...
    assert status.reserved == 0  # ...and it is committed, no longer reserved
    assert (await core.service.get_job(done.id)).cost_milli == TINY


async def test_concurrent_submissions_never_spend_the_same_units_twice(core: Core) -> None:
    core.settings.quota.tiers["user"].daily_units = 10 * TINY / 1000  # room for exactly ten images
    results = await asyncio.gather(*(submit(core, f"/imagine cat {i}") for i in range(25)),
                                   return_exceptions=True)
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(accepted) == 10
    assert all(isinstance(error, QuotaExceeded) for error in refused) and len(refused) == 15
    status = await core.service.quota(alice())
    assert status.used == pytest.approx(status.limit) and status.remaining == 0

    # Refunds under concurrency: cancelling everything at once leaves exactly zero, never less.
    await asyncio.gather(*(core.service.cancel(alice(), r.job.id) for r in accepted))
    status = await core.service.quota(alice())
    assert status.used == 0 and status.remaining == status.limit
    assert len(await asyncio.gather(*(submit(core, f"/imagine dog {i}") for i in range(10)))) == 10


async def test_concurrent_submissions_of_many_users_are_each_charged_once(core: Core) -> None:
    core.settings.quota.tiers["user"].daily_units = 3 * TINY / 1000
    names = [f"user{i}" for i in range(6)]
    results = await asyncio.gather(*(core.service.submit(user(name), core.parser.parse("/imagine a cat"))
                                     for name in names for _ in range(5)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 18  # three for each of six users
    for name in names:
        assert (await core.service.quota(user(name))).used == pytest.approx(3 * TINY / 1000)


# -- windows ---------------------------------------------------------------------------------------------


async def test_the_daily_window_names_itself_and_resets_at_midnight(core: Core) -> None:
    core.settings.quota.tiers["user"].daily_units = 2 * TINY / 1000
    now = core.clock()
    core.clock.set(now)
    await submit(core, "/imagine a cat --n 2")
    with pytest.raises(QuotaExceeded, match=r"Daily quota reached \(user tier\).*resets at 00:00 UTC \(in "):
        await submit(core, "/imagine a cat")
    core.clock.set(now + timedelta(days=1))
    assert (await submit(core, "/imagine a cat")).job.status is JobStatus.QUEUED


async def test_a_job_bigger_than_the_whole_window_says_to_make_it_smaller(core: Core) -> None:
    core.settings.quota.tiers["user"].daily_units = 0.5
    with pytest.raises(QuotaExceeded, match=r"This job alone costs 1 unit, more than.*fewer --n, a smaller --size"):
        await submit(core, "/imagine a cat --size 512x512")


async def test_the_per_minute_window_lifts_when_old_charges_age_out(core: Core) -> None:
    core.settings.quota.tiers["user"].per_minute_units = 2 * TINY / 1000
    now = core.clock()
    core.clock.set(now)
    await submit(core, "/imagine a cat")
    core.clock.set(now + timedelta(seconds=20))
    await submit(core, "/imagine a cat")
    with pytest.raises(QuotaExceeded, match=r"Per-minute quota reached.*Try again in 40 s"):
        await submit(core, "/imagine a cat")
    core.clock.set(now + timedelta(seconds=61))  # the first charge has aged out
    assert (await submit(core, "/imagine a cat")).job.status is JobStatus.QUEUED


async def test_tiers_come_from_owner_ids_platform_moderators_and_roles(core: Core) -> None:
    core.settings.quota.tiers["user"].daily_units = TINY / 1000
    core.settings.moderation.owner_ids = ["console:boss"]
    for _ in range(3):
        await core.service.submit(user("boss"), core.parser.parse("/imagine a cat"))
    boss = await core.service.quota(user("boss"))
    assert boss.tier == "owner" and boss.limit == float("inf")
    moderator = Requester("console", "mod", is_platform_moderator=True)
    assert (await core.service.quota(moderator)).tier == "moderator"
    assert (await core.service.quota(alice())).tier == "user"


# -- /quota ----------------------------------------------------------------------------------------------


async def test_quota_shows_what_is_left_what_a_command_costs_and_when_it_resets(core: Core) -> None:
    await submit(core, "/imagine a cat --n 2")
    command = core.parser.parse("/quota /imagine a castle --size 512x512 --n 2")
    status = await core.service.quota(alice(), command.command)
    text = describe_quota(status)
    assert status.cost == 2.0
    assert "49.97 of 50 units left today" in text and "reserved by jobs in progress" in text
    assert "resets at 00:00 UTC (in " in text
    assert "/imagine 512x512, 20 steps, 2 images costs 2 units" in text
    plain = describe_quota(await core.service.quota(bob()))  # never submitted: a default /imagine's price
    assert "50 of 50 units left today" in plain and "/imagine 64x64, 20 steps, 1 image costs 0.02 units" in plain


# -- queue caps ------------------------------------------------------------------------------------------


async def test_the_global_queue_cap_answers_busy_and_when_to_retry(core: Core) -> None:
    core.settings.quota.max_queued_total = 3
    for name in ("a", "b", "c"):
        await core.service.submit(user(name), core.parser.parse("/imagine a cat"))
    with pytest.raises(QueueFull, match=r"Easel is busy: 3 jobs are waiting.*Try again in a few minutes"):
        await submit(core, "/imagine a cat")
    await core.queue.claim_batch("test:1", max_images=1)  # one starts: there is room again
    assert (await submit(core, "/imagine a cat")).job.status is JobStatus.QUEUED


async def test_the_size_cap_tightens_as_the_queue_grows(core: Core) -> None:
    core.settings.quota.busy_size_caps = [BusySizeCap(queued_jobs=2, max_pixels=64 * 64)]
    await submit(core, "/imagine a cat --size 128x128")  # a short queue: any size
    await submit(core, "/imagine a cat", who=bob)
    with pytest.raises(QueueFull, match=r"busy \(2 jobs waiting\).*at most 4096 pixels.*yours is 128x128.*"
                                        r"fewer than 2 jobs are waiting"):
        await submit(core, "/imagine a cat --size 128x128")
    assert (await submit(core, "/imagine a cat --size 64x64")).job.status is JobStatus.QUEUED
