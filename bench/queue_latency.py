"""Queue: submit and claim latency with a deep queue on SQLite, and how fair the order is.

    python -m bench.queue_latency         # 10,000 jobs from 1,000 users
    python -m bench.queue_latency --jobs 2000 --users 200

No model runs here: this measures the job service and the queue (the database work every job pays).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/queue_latency.py`: import from the repository root, not from bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import bench  # noqa: F401  (and set up first, as `python -m` does: bench/__init__.py quiets transformers)

import asyncio
import random
import statistics
import time

from bench.common import BenchSetup, bench_settings, parse_common, print_table
from bot.bootstrap import Core, open_core
from bot.domain import JobKind, Requester


def _percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


async def _submit(core: Core, user: str, prompt: str = "a lighthouse") -> str:
    command = core.parser.parse_generation(JobKind.IMAGINE, prompt)
    return (await core.service.submit(Requester(platform="bench", user_id=user), command)).job.id


async def latency(setup: BenchSetup, jobs: int, users: int, claims: int) -> list[list[object]]:
    core = await open_core(bench_settings(setup))
    owners = [f"user{i % users}" for i in range(jobs)]
    random.Random(0).shuffle(owners)
    submit_ms = []
    for owner in owners:
        start = time.perf_counter()
        await _submit(core, owner)
        submit_ms.append((time.perf_counter() - start) * 1000)
    claim_ms = []
    for _ in range(claims):
        start = time.perf_counter()
        await core.queue.claim_batch("bench:1", max_images=4)
        claim_ms.append((time.perf_counter() - start) * 1000)
    await core.close()
    return [
        ["submit", jobs, statistics.median(submit_ms), _percentile(submit_ms, 99), max(submit_ms)],
        [f"claim (batch of 4, {jobs - 4 * claims}+ still queued)", claims, statistics.median(claim_ms),
         _percentile(claim_ms, 99), max(claim_ms)],
    ]


async def lightest_user_wait(setup: BenchSetup, backlog: int, others: int) -> int:
    """Jobs that run before a light user's single job, when a heavy user has `backlog` queued."""
    core = await open_core(bench_settings(setup))
    for _ in range(backlog):
        await _submit(core, "heavy")
    for i in range(others):
        await _submit(core, f"other{i}")
    light = await _submit(core, "light")
    ahead = 0
    while True:
        batch = await core.queue.claim_batch("bench:1", max_images=1)
        if batch[0].id == light:
            break
        ahead += 1
    await core.close()
    return ahead


def main() -> None:
    args, setup = parse_common(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--jobs", type=int, default=10_000),
        p.add_argument("--users", type=int, default=1_000),
        p.add_argument("--claims", type=int, default=500, help="claims to time (default 500)"),
    ))
    print(f"# SQLite, {args.jobs} jobs from {args.users} users submitted through the job service")
    rows = asyncio.run(latency(setup, args.jobs, args.users, args.claims))
    print_table(["operation", "count", "p50 ms", "p99 ms", "max ms"], rows)
    print()
    print("# fairness: a light user submits 1 job behind a heavy user's backlog and 10 other users' jobs")
    waits = [(backlog, asyncio.run(lightest_user_wait(setup, backlog, 10))) for backlog in (10, 100, 1000, 5000)]
    print_table(["heavy user's backlog", "jobs run before the light user's"], [list(w) for w in waits])
    p99 = rows[0][3]
    print(f"headline: p99 submit {p99:.1f} ms with {args.jobs} queued jobs; the light user waits for "
          f"{waits[0][1]} to {waits[-1][1]} jobs whatever the heavy backlog (10 to 5000)")


if __name__ == "__main__":
    main()
