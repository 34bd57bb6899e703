"""The job service and the queue on a real SQLite database (no model needed: the worker's side is
driven by hand here; tests/test_end_to_end.py runs the real worker)."""

import asyncio
from datetime import timedelta

import pytest

from bot import events
from bot.bootstrap import Core, open_core
from bot.clock import utcnow
from bot.config import Settings
from bot.domain import InputImages, JobKind, JobStatus, Requester
from bot.errors import InvalidCommand, InvalidImage, NotFound, QueueFull, QuotaExceeded, Refused
from bot.events import EventKind
from tests.conftest import alice, bob, mask_bytes, png_bytes


@pytest.fixture
def core(any_core: Core) -> Core:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_core


async def submit(core: Core, text: str, who=alice, inputs: InputImages | None = None):
    return await core.service.submit(who(), core.parser.parse(text), inputs)


async def test_a_submitted_job_is_stored_with_every_parameter_and_a_seed(core: Core) -> None:
    result = await submit(core, "/imagine a lighthouse at dusk --no fog --steps 12 --n 2")
    job = await core.service.get_job(result.job.id)
    assert job.status is JobStatus.QUEUED
    assert (job.params.prompt, job.params.negative, job.params.steps, job.params.n) == (
        "a lighthouse at dusk", "fog", 12, 2)
    assert job.params.seed is not None
    assert job.seeds == [job.params.seed, job.params.seed + 1]
    assert result.position == 1


async def test_queue_position_counts_other_users_turns(core: Core) -> None:
    for _ in range(3):
        await submit(core, "/imagine a cat", who=alice)
    first_of_bob = await submit(core, "/imagine a dog", who=bob)
    # Round robin: only Alice's first job runs before Bob's first.
    assert first_of_bob.position == 2


async def test_round_robin_runs_bobs_first_job_before_alices_tenth(core: Core) -> None:
    alice_jobs = [(await submit(core, f"/imagine cat {i} --steps 5")).job.id for i in range(10)]
    bob_job = (await submit(core, "/imagine dog --steps 5", who=bob)).job.id
    order = []
    while batch := await core.queue.claim_batch("test:1", max_images=1):
        order += [job.id for job in batch]
        for job in batch:
            await core.queue.fail(job.id, "not generating in this test")
    assert order.index(bob_job) == 1
    assert order.index(bob_job) < order.index(alice_jobs[9])
    assert [j for j in order if j != bob_job] == alice_jobs  # each user's own jobs stay in order


async def test_a_batch_gathers_compatible_jobs_from_different_users(core: Core) -> None:
    a = (await submit(core, "/imagine a cat --steps 5")).job.id
    odd = (await submit(core, "/imagine a cat --steps 6")).job.id
    b = (await submit(core, "/imagine a dog --steps 5", who=bob)).job.id
    batch = await core.queue.claim_batch("test:1", max_images=4)
    assert {job.id for job in batch} == {a, b}
    assert all(job.status is JobStatus.RUNNING for job in batch)
    assert (await core.service.get_job(odd)).status is JobStatus.QUEUED


async def test_the_daily_quota_refuses_with_the_numbers_and_the_reset_time(core: Core) -> None:
    # Issue 6 turned the daily image count into cost units: a 64x64, 20-step image costs 1/64 unit.
    core.settings.quota.tiers["user"].daily_units = 0.05
    await submit(core, "/imagine a cat --n 2")  # 0.032 units
    with pytest.raises(QuotaExceeded, match=r"0\.03 of 0\.05 units used today, this job needs 0\.03.*"
                                            r"resets at 00:00"):
        await submit(core, "/imagine a cat --n 2")
    assert (await core.service.quota(alice())).remaining == pytest.approx(0.018)
    assert (await core.service.quota(bob())).remaining == pytest.approx(0.05)


async def test_the_plain_daily_image_cap_still_applies(core: Core) -> None:
    core.settings.queue.daily_images_per_user = 3
    await submit(core, "/imagine a cat --n 2")
    with pytest.raises(QuotaExceeded, match=r"2 of 3 images used today, this job needs 2.*resets at 00:00"):
        await submit(core, "/imagine a cat --n 2")
    assert (await core.service.quota(alice())).images_used == 2
    assert (await core.service.quota(bob())).images_used == 0


async def test_cancelling_and_failing_refund_the_quota(core: Core) -> None:
    job = (await submit(core, "/imagine a cat --n 3")).job
    assert (await core.service.quota(alice())).used == pytest.approx(0.047)  # 3 × 1/64 unit, rounded up
    await core.service.cancel(alice(), job.id)
    assert (await core.service.quota(alice())).used == 0
    second = (await submit(core, "/imagine a cat --n 2")).job
    await core.queue.claim_batch("test:1", 4)
    await core.queue.fail(second.id, "boom")
    assert (await core.service.quota(alice())).used == 0
    assert (await core.service.get_job(second.id)).error == "boom"


async def test_a_user_may_not_queue_more_than_the_cap(core: Core) -> None:
    core.settings.queue.max_queued_per_user = 2
    await submit(core, "/imagine a")
    await submit(core, "/imagine b")
    with pytest.raises(QueueFull, match="already have 2 jobs waiting"):
        await submit(core, "/imagine c")
    await submit(core, "/imagine d", who=bob)  # others are not affected


async def test_only_the_owner_cancels_and_only_unfinished_jobs(core: Core) -> None:
    job = (await submit(core, "/imagine a cat")).job
    with pytest.raises(Refused, match="not yours"):
        await core.service.cancel(bob(), job.id)
    cancelled = await core.service.cancel(alice())  # no id: the newest unfinished job
    assert cancelled.id == job.id and cancelled.status is JobStatus.CANCELLED
    with pytest.raises(InvalidCommand, match="already cancelled"):
        await core.service.cancel(alice(), job.id)
    with pytest.raises(NotFound):
        await core.service.cancel(alice(), "nosuchid")


async def test_a_caller_waiting_for_the_result_gets_the_job_when_it_ends_or_as_it_is_at_the_deadline(
        core: Core) -> None:
    job = (await submit(core, "/imagine a cat")).job
    waiting = asyncio.create_task(core.service.wait_until_final(job.id, timeout_s=60))
    await core.service.cancel(alice(), job.id)
    assert (await waiting).status is JobStatus.CANCELLED

    other = (await submit(core, "/imagine a dog")).job
    assert (await core.service.wait_until_final(other.id, timeout_s=0.05)).status is JobStatus.QUEUED


async def test_cancelling_a_running_job_tells_the_worker_to_drop_it(core: Core) -> None:
    job = (await submit(core, "/imagine a cat")).job
    await core.queue.claim_batch("test:1", 4)
    await core.service.cancel(alice(), job.id)
    assert await core.queue.report_progress([job.id], 1, 20) == {job.id}
    assert await core.queue.complete(job.id, []) is False
    assert (await core.service.get_job(job.id)).status is JobStatus.CANCELLED


async def test_jobs_of_a_dead_worker_are_requeued_then_failed_after_max_attempts(core: Core) -> None:
    core.settings.queue.max_attempts = 2
    job = (await submit(core, "/imagine a cat")).job
    for attempt in (1, 2):
        await core.queue.claim_batch("gone-host:1", 4)
        report = await core.queue.requeue_abandoned(is_dead=lambda worker: True)
        if attempt == 1:
            assert report.requeued == [job.id]
            assert (await core.service.get_job(job.id)).status is JobStatus.QUEUED
    assert report.failed == [job.id]
    failed = await core.service.get_job(job.id)
    assert failed.status is JobStatus.FAILED
    assert "stopped 2 times" in failed.error and failed.attempts == 2


async def test_a_live_workers_jobs_are_left_alone_until_its_lease_runs_out(core: Core) -> None:
    job = (await submit(core, "/imagine a cat")).job
    await core.queue.claim_batch("other-host:1", 4)
    report = await core.queue.requeue_abandoned(is_dead=lambda worker: False)
    assert report.requeued == []
    later = utcnow() + core.queue.LEASE + timedelta(seconds=1)
    report = await core.queue.requeue_abandoned(is_dead=lambda worker: False, now=later)
    assert report.requeued == [job.id]


async def test_events_tell_the_story_of_a_job_in_order(core: Core) -> None:
    job = (await submit(core, "/imagine a cat --steps 3")).job
    await core.queue.claim_batch("test:1", 4)
    await core.queue.report_progress([job.id], 1, 3)
    await core.queue.fail(job.id, "out of luck")
    kinds = [(event.kind, event.payload) async for event in core.bus.watch(job.id)]
    assert kinds == [("queued", {"position": 1}), ("started", {"batch_size": 1}),
                     ("progress", {"step": 1, "total": 3}), ("failed", {"error": "out of luck"})]


async def test_old_progress_events_are_pruned_and_the_rest_of_the_story_kept(core: Core) -> None:
    job = (await submit(core, "/imagine a cat --steps 3")).job
    await core.queue.claim_batch("test:1", 4)
    await core.queue.report_progress([job.id], 1, 3)
    await core.queue.fail(job.id, "out of luck")
    assert await core.queue.prune_progress_events() == 0  # still fresh: a reader may want it
    later = utcnow() + core.queue.PROGRESS_KEPT + timedelta(minutes=1)
    assert await core.queue.prune_progress_events(now=later) == 1
    kinds = [event.kind async for event in core.bus.watch(job.id)]
    assert kinds == ["queued", "started", "failed"]


async def test_metrics_add_up_generation_seconds_in_the_database(core: Core) -> None:
    from sqlalchemy import update

    from bot.metrics import read_metrics
    from bot.models import Job

    for prompt in ("a cat", "a dog"):
        job = (await submit(core, f"/imagine {prompt}")).job
        await core.queue.claim_batch("test:1", 1)
        await core.queue.complete(job.id, [])
        finished = utcnow()
        async with core.db.unit_of_work() as uow:  # as if each had taken 2.5 s
            await uow.session.execute(update(Job).where(Job.id == job.id).values(
                started_at=finished - timedelta(seconds=2.5), finished_at=finished))
            await uow.commit()
    metrics = await read_metrics(core.db)
    assert metrics.generation_seconds_count == 2
    assert metrics.generation_seconds_sum == pytest.approx(5.0, abs=0.01)


async def test_a_watcher_hears_its_own_job_at_once_and_sleeps_through_other_jobs(core: Core) -> None:
    import asyncio

    core.bus.poll_interval_s = 60  # within this test only a notify can wake the watcher
    mine = (await submit(core, "/imagine a cat --steps 3")).job
    seen: list[str] = []

    async def watch() -> None:
        async for event in core.bus.watch(mine.id):
            seen.append(event.kind)

    watching = asyncio.create_task(watch())
    while seen != ["queued"]:
        await asyncio.sleep(0.01)
    reads = 0
    read_after = core.bus.read_after

    async def counted(*args, **kwargs):
        nonlocal reads
        reads += 1
        return await read_after(*args, **kwargs)

    core.bus.read_after = counted
    [wake_up] = core.bus._job_wake_ups[mine.id]  # what the sleeping watcher waits on
    for _ in range(5):  # other users' jobs change: the watcher of Alice's job stays asleep
        await submit(core, "/imagine a dog", who=bob)
    # A commit notifies before submit returns, so a wrong wake-up would already be set here: checking
    # it (not sleeping, then counting reads) holds however slow the machine is.
    assert not wake_up.is_set() and reads == 0
    await core.queue.claim_batch("test:1", 1)
    await core.queue.fail(mine.id, "out of luck")
    await asyncio.wait_for(watching, timeout=5)
    assert seen == ["queued", "started", "failed"]


# -- attachments ---------------------------------------------------------------------------------------


async def test_edit_needs_an_image_and_inpaint_a_mask(core: Core) -> None:
    with pytest.raises(InvalidImage, match="/edit needs an image"):
        await submit(core, "/edit make it winter")
    with pytest.raises(InvalidImage, match="/inpaint needs a mask"):
        await submit(core, "/inpaint a red door", inputs=InputImages(image=png_bytes()))


async def test_edit_takes_its_size_from_the_image_aspect(core: Core) -> None:
    result = await submit(core, "/edit make it winter", inputs=InputImages(image=png_bytes(128, 64)))
    params = result.job.params
    assert params.kind is JobKind.EDIT and params.width / params.height == pytest.approx(2, rel=0.2)
    stored = core.store.read_bytes(result.job.init_image_sha)
    assert stored.startswith(b"\x89PNG")


async def test_bad_attachments_are_refused_and_nothing_is_queued(core: Core) -> None:
    with pytest.raises(InvalidImage, match="not a PNG"):
        await submit(core, "/edit x", inputs=InputImages(image=b"hello, I am a text file\n"))
    with pytest.raises(InvalidImage, match="aspect ratio"):
        await submit(core, "/inpaint x", inputs=InputImages(image=png_bytes(64, 64),
                                                            mask=mask_bytes(128, 64)))
    assert await core.service.list_jobs() == []
    assert (await core.service.quota(alice())).used == 0


async def test_watchers_learn_what_another_process_wrote(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six people wait on their jobs in the bot's process; another process on the same database (a second
    core, as `easel worker` on another host would be) cancels the jobs. No commit in the watchers' process
    announces it, and their own fallback reads are turned off: the poll they share must tell each one."""
    monkeypatch.setattr(events, "WATCHER_FALLBACK_POLLS", 1_000_000)
    here, elsewhere = await open_core(settings), await open_core(settings)
    try:
        people = [Requester(platform="console", user_id=f"user{i}") for i in range(6)]
        jobs = [(await here.service.submit(who, here.parser.parse("/imagine a cat"))).job.id for who in people]

        async def last_event(job_id: str) -> events.Event:
            return [event async for event in here.bus.watch(job_id)][-1]

        watching = [asyncio.create_task(last_event(job_id)) for job_id in jobs]
        for who, job_id in zip(people, jobs, strict=True):
            await elsewhere.service.cancel(who, job_id)
        finals = await asyncio.wait_for(asyncio.gather(*watching), timeout=60)
        assert [(final.job_id, final.kind) for final in finals] == [(job_id, EventKind.CANCELLED) for job_id in jobs]
    finally:
        await here.close()
        await elsewhere.close()
