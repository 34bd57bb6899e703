"""A fleet of workers on one queue: the worker registry (`easel workers`, per-worker /metrics, expiry of
silent workers) and draining on SIGTERM, with real `easel worker` processes as on GPU hosts."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import httpx

from bot.bootstrap import Core, open_core
from bot.config import load_settings
from bot.domain import JobStatus, Requester
from bot.workers import DeviceReport, WorkerReport, WorkerStatus, WorkerView
from generation.worker import Worker
from tests.http_fixtures import running_worker
from tests.test_cli import easel, env  # noqa: F401  (the fixture: a data folder for `easel` processes)

T = TypeVar("T")


def user(name: str) -> Requester:
    return Requester(platform="console", user_id=name, display_name=name)


async def eventually(look: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = 120) -> T:
    """What `look` finds, once it finds something (polled: it reads another process's writes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (found := await look()) is not None:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_easel_workers_lists_a_worker_process_and_sigterm_drains_its_batch(
        env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """SIGTERM mid-batch: the batch is finished, nothing new is claimed, the worker leaves the registry
    and exits 0; `easel workers` showed it idle, then busy with that batch."""
    core = await open_core(load_settings(None, storage={"data_dir": tmp_path / "data"}))
    worker = subprocess.Popen([sys.executable, "-m", "adapters.cli", "worker"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    worker_id = f"{socket.gethostname()}:{worker.pid}"
    try:
        async def registered(status: str, models: list[str] | None = None) -> WorkerView | None:
            return next((w for w in await core.workers.list() if w.id == worker_id and w.status == status
                         and models in (None, w.models)), None)

        await eventually(lambda: registered("idle"), "the worker to register")
        listing = easel(env, "workers").stdout
        assert "1 worker(s):" in listing and worker_id in listing and " idle " in listing and "cpu" in listing

        slow = await core.service.submit(user("ann"), core.parser.parse("/imagine a slow one --size 256x256 "
                                                                        "--steps 40 --seed 9"))
        waiting = [await core.service.submit(user(name), core.parser.parse("/imagine a quick one --steps 2"))
                   for name in ("bob", "cyd")]

        async def slow_job_running() -> bool | None:
            job = await core.service.get_job(slow.job.id)
            return True if job.status is JobStatus.RUNNING and job.progress_step >= 1 else None

        await eventually(slow_job_running, "the slow job's first step")
        # Its next beat (every lease_s/4) reports the model the batch loaded.
        busy = await eventually(lambda: registered("busy", models=["tiny"]), "the worker to report its batch")
        assert busy.batch == [slow.job.id] and busy.memory_used_mb > 0
        listing = easel(env, "workers").stdout
        assert " busy " in listing and slow.job.id in listing and "tiny" in listing

        worker.send_signal(signal.SIGTERM)
        draining = await eventually(lambda: registered("draining"), "the worker to say it is draining")
        assert draining.batch == [slow.job.id]
        out, err = worker.communicate(timeout=180)
        assert worker.returncode == 0, out + err
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert "stopping after the current batch (another SIGTERM to stop now)" in err
    assert (await core.service.get_job(slow.job.id)).status is JobStatus.SUCCEEDED  # the batch was finished
    assert [(await core.service.get_job(r.job.id)).status for r in waiting] == [JobStatus.QUEUED] * 2  # not claimed
    assert await core.workers.list() == []  # it left the registry
    assert "no workers are running" in easel(env, "workers").stdout
    await core.close()


async def test_metrics_label_throughput_and_busy_ratio_per_worker(core: Core, generator) -> None:
    async with running_worker(core, generator):
        result = await core.service.submit(user("ann"), core.parser.parse("/imagine a cat --steps 2 --n 2"))
        await core.service.wait_until_final(result.job.id, timeout_s=120)

        # The worker writes its registry row beside its batch loop, so it may land just after the job's end.
        async def idle_after_its_images() -> list[str] | None:
            lines = (await core.metrics.scrape()).decode().splitlines()
            return lines if 'easel_fleet_workers{status="idle"} 1.0' in lines else None

        lines = await eventually(idle_after_its_images, "the worker to report itself idle again")

    def sample(name: str) -> float:
        return float(next(line.split()[1] for line in lines if line.startswith(name)))

    assert sample('easel_fleet_worker_images_per_second{worker="test-worker:1"}') > 0
    assert 0 < sample('easel_fleet_worker_busy_ratio{worker="test-worker:1"}') <= 1
    assert sample('easel_fleet_workers{status="idle"}') == 1.0


async def test_a_silent_worker_expires_from_the_registry_and_a_live_one_stays(core: Core, generator) -> None:
    ghost = WorkerReport(worker_id="gone-host:77", host="gone-host", pid=77, status=WorkerStatus.BUSY,
                         device=DeviceReport("cuda:0", "NVIDIA H100", 30_000, 80_000), models=["sd15"],
                         batch=["k7mq2x9a"], images_done=12)
    await core.workers.report(ghost)
    [row] = await core.workers.list()
    assert (row.host, row.device_name, row.models, row.batch, row.images_done) == \
        ("gone-host", "NVIDIA H100", ["sd15"], ["k7mq2x9a"], 12)

    live = WorkerReport(worker_id="live-host:5", host="live-host", pid=5, status=WorkerStatus.IDLE)
    core.clock.set(core.clock() + timedelta(seconds=core.settings.queue.worker_expiry_s - 5))
    await core.workers.report(live)  # beats; the ghost does not
    core.clock.advance(timedelta(seconds=10))  # the ghost is now older than the expiry, the live one is not
    worker = Worker(core.queue, generator, core.store, core.settings, worker_id="checker:1")
    await worker.run(burst=True)  # its upkeep removes the silent row; at exit it removes its own
    assert [w.id for w in await core.workers.list()] == ["live-host:5"]


TWO_MODELS = ('{"tiny": {"source": "builtin:tiny", "default_width": 64, "default_height": 64}, '
              '"tiny_b": {"source": "builtin:tiny", "default_width": 64, "default_height": 64}}')


async def two_model_core(tmp_path: Path, monkeypatch, max_passes: int) -> Core:
    monkeypatch.setenv("EASEL_MODELS", TWO_MODELS)
    return await open_core(load_settings(None, storage={"data_dir": tmp_path / "data"},
                                         queue={"affinity_max_passes": max_passes}))


async def claimed_users(core: Core, loaded: list[str], claims: int) -> list[str]:
    """Whose job each claim of a worker holding `loaded` took (one job per claim)."""
    taken = []
    for _ in range(claims):
        [job] = await core.queue.claim_batch("gpu-1:1", max_images=1, loaded_models=loaded)
        taken.append(job.user_id)
    return taken


async def test_a_worker_prefers_jobs_for_its_loaded_model_but_passes_a_job_over_at_most_max_passes(
        tmp_path: Path, monkeypatch) -> None:
    core = await two_model_core(tmp_path, monkeypatch, max_passes=2)
    # ann's job is the fairest (first submitted, every user unserved) and wants the model not loaded.
    await core.service.submit(user("ann"), core.parser.parse("/imagine a cat --model tiny_b"))
    for name in ("bob", "cyd", "dan", "eve"):
        await core.service.submit(user(name), core.parser.parse("/imagine a dog --model tiny"))
    # Two claims serve loaded-model jobs first; the third may pass ann no more, though tiny jobs still wait.
    assert await claimed_users(core, ["tiny"], 3) == ["bob", "cyd", "ann"]
    assert await claimed_users(core, ["tiny"], 2) == ["dan", "eve"]
    await core.close()


async def test_without_affinity_or_a_loaded_model_the_fairest_job_goes_first(tmp_path: Path, monkeypatch) -> None:
    core = await two_model_core(tmp_path, monkeypatch, max_passes=0)
    await core.service.submit(user("ann"), core.parser.parse("/imagine a cat --model tiny_b"))
    await core.service.submit(user("bob"), core.parser.parse("/imagine a dog --model tiny"))
    assert await claimed_users(core, ["tiny"], 2) == ["ann", "bob"]
    await core.close()

    core = await two_model_core(tmp_path / "fresh", monkeypatch, max_passes=4)
    await core.service.submit(user("ann"), core.parser.parse("/imagine a cat --model tiny_b"))
    await core.service.submit(user("bob"), core.parser.parse("/imagine a dog --model tiny"))
    assert await claimed_users(core, [], 2) == ["ann", "bob"]  # a fresh worker loads whichever comes first
    await core.close()


async def test_an_idle_worker_leaves_a_job_to_an_idle_worker_holding_its_model_for_max_wait_at_most(
        tmp_path: Path, monkeypatch) -> None:
    core = await two_model_core(tmp_path, monkeypatch, max_passes=4)
    max_wait = core.settings.queue.affinity_max_wait_s
    await core.workers.report(WorkerReport(worker_id="gpu-2:1", host="gpu-2", pid=1, status=WorkerStatus.IDLE,
                                           models=["tiny_b"]))
    job = (await core.service.submit(user("ann"), core.parser.parse("/imagine a cat --model tiny_b"))).job

    # gpu-1 holds tiny: it would have to load tiny_b, which gpu-2 has loaded and is idle: it leaves the job.
    assert await core.queue.claim_batch("gpu-1:1", 4, ["tiny"], may_leave=True) == []
    assert await core.queue.claim_batch("gpu-1:1", 4, [], may_leave=True) == []  # a fresh worker too
    # gpu-2 takes it at its next poll.
    assert [j.id for j in await core.queue.claim_batch("gpu-2:1", 4, ["tiny_b"], may_leave=True)] == [job.id]

    # Past max_wait, whoever looks first takes it: gpu-2 may be busy or gone though the registry says idle.
    late = (await core.service.submit(user("bob"), core.parser.parse("/imagine a dog --model tiny_b"))).job
    core.clock.set(core.clock() + timedelta(seconds=max_wait + 0.1))
    assert [j.id for j in await core.queue.claim_batch("gpu-1:1", 4, ["tiny"], may_leave=True)] == [late.id]

    # A registry row silent for longer than the lease attracts nothing.
    core.clock.advance(timedelta(seconds=core.settings.queue.lease_s + 1))
    third = (await core.service.submit(user("cyd"), core.parser.parse("/imagine a fox --model tiny_b"))).job
    assert [j.id for j in await core.queue.claim_batch("gpu-1:1", 4, ["tiny"], may_leave=True)] == [third.id]
    await core.close()


async def test_eight_workers_claiming_at_once_each_get_a_batch_and_no_job_twice(any_core: Core) -> None:
    """They read the same fair heads; all but one find theirs taken and take the next free ones."""
    core = any_core
    for index in range(40):
        await core.service.submit(user(f"user{index}"), core.parser.parse(f"/imagine a cat number {index}"))
    batches = await asyncio.gather(*(core.queue.claim_batch(f"gpu-{w}:1", 4) for w in range(8)))
    claimed = [job.id for batch in batches for job in batch]
    assert all(batches) and len(claimed) == len(set(claimed)) == 32
    # The first 32 users' jobs went, fairly: none of the last 8 users jumped ahead.
    assert {job.user_id for batch in batches for job in batch} == {f"user{index}" for index in range(32)}


async def test_serve_without_a_worker_queues_for_a_worker_process_elsewhere(
        env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """`easel serve --no-worker` on a host without a GPU: the HTTP API takes the job, torch is never
    loaded in that process, and an `easel worker` process runs the job."""
    serve = subprocess.Popen([sys.executable, "-m", "adapters.cli", "serve", "--no-worker"],
                             env={**env, "EASEL_HTTP__PORT": "0", "EASEL_HTTP__ENABLED": "true"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        lines = [serve.stdout.readline() for _ in range(2)]
        assert "; no worker;" in lines[0], lines
        url = lines[1].split()[4].rstrip("/")  # "Web chat and API: http://127.0.0.1:PORT/  (OpenAPI: ...)"
        core = await open_core(load_settings(None, storage={"data_dir": tmp_path / "data"}), migrate=False)
        token, _ = await core.apikeys.create("fleet")
        await core.close()
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
            job = (await client.post("/v1/jobs", json={"command": "/imagine a cat --steps 2"})).json()
            assert job["status"] == "queued"
            assert "libtorch" not in Path(f"/proc/{serve.pid}/maps").read_text()  # no worker, no torch here
            assert "1 job(s) done" in easel(env, "worker", "--burst").stdout
            done = (await client.get(f"/v1/jobs/{job['id']}")).json()
            assert done["status"] == "succeeded"
            assert (await client.get(done["images"][0]["url"].removeprefix(url))).status_code == 200
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=60)
    assert serve.returncode == 0
