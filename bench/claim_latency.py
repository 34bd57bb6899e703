"""Claim latency on PostgreSQL: 8 worker processes claiming at once from a deep queue.

    python -m bench.claim_latency                       # 8 claimers; 1,000 and 10,000 queued jobs
    python -m bench.claim_latency --claimers 4 --depths 2000 20000

Starts a throwaway PostgreSQL server (tests/postgres.py: the machine's own binaries), fills the queue
with jobs from 1,000 users (100 submitted through the job service, the rest copied from them in SQL,
which is quicker and makes the same rows), then runs `--claimers` processes, each its own worker with
its own connection pool, that all claim batches of 4 images at once (`JobQueue.claim_batch`, the
call every worker makes, with FOR UPDATE SKIP LOCKED) until each has made `--claims` claims. Prints
p50/p99/max claim latency per depth, and the ratio of the deepest queue's p50 to the shallowest's: a
claim that stays cheap as the queue grows has a ratio near 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/claim_latency.py`: import from the repository root, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time

from sqlalchemy import text

from bench.common import print_table
from bot.bootstrap import open_core
from bot.config import Settings, load_settings
from bot.domain import JobKind, Requester
from bot.models import Job


def settings_for(url: str) -> Settings:
    return load_settings(None, database={"url": url},
                         storage={"data_dir": Path(tempfile.mkdtemp(prefix="easel-bench-"))},
                         # The queue is filled directly: no per-user cap or quota may refuse it.
                         queue={"max_queued_per_user": 100_000, "daily_images_per_user": 0},
                         quota={"tiers": {"user": {"daily_units": float("inf"), "per_minute_units": float("inf")}},
                                "max_queued_total": 0},
                         console={"tier": "user"})


async def fill(url: str, depth: int, users: int) -> None:
    """`depth` queued jobs from `users` users, oldest first; the queue emptied first."""
    core = await open_core(settings_for(url))
    async with core.db.engine.begin() as connection:
        await connection.execute(text("DELETE FROM job_events"))
        await connection.execute(text("DELETE FROM jobs"))
    seeds = min(100, depth)
    for index in range(seeds):
        command = core.parser.parse_generation(JobKind.IMAGINE, "a lighthouse at dusk")
        await core.service.submit(Requester(platform="bench", user_id=f"user{index % users}"), command)
    # Copy the submitted rows until the queue is `depth` deep, each copy for one of `users` users.
    columns = [c.name for c in Job.__table__.columns if c.name not in ("seq", "id", "user_id")]
    copies, listed = depth - seeds, ", ".join(columns)  # whole numbers: written into the SQL as they are
    async with core.db.engine.begin() as connection:
        await connection.execute(text(
            "INSERT INTO users (platform, platform_user_id, display_name, role, created_at) "
            f"SELECT 'bench', 'user' || g, '', 'user', now() FROM generate_series({seeds}, {users - 1}) g "
            "ON CONFLICT DO NOTHING"))
        await connection.execute(text(
            f"INSERT INTO jobs (id, user_id, {listed}) "
            f"SELECT left(md5(random()::text || g::text), 8), "
            f"(SELECT id FROM users WHERE platform_user_id = 'user' || (g % {users})), {listed} "
            f"FROM generate_series(1, {copies}) g, LATERAL (SELECT * FROM jobs ORDER BY seq LIMIT 1) template"))
        await connection.execute(text("ANALYZE"))
    await core.close()


def claimer(url: str, claims: int, start_at: float, out: multiprocessing.Queue) -> None:
    async def run() -> list[float]:
        core = await open_core(settings_for(url), migrate=False)
        worker_id = f"bench:{multiprocessing.current_process().pid}"
        await core.queue.claim_batch(worker_id, 4)  # the connection pool opened before the clock starts
        while time.time() < start_at:
            await asyncio.sleep(0.001)
        timings = []
        for _ in range(claims):
            started = time.perf_counter()
            await core.queue.claim_batch(worker_id, 4)
            timings.append((time.perf_counter() - started) * 1000)
        await core.close()
        return timings

    out.put(asyncio.run(run()))


def measure(url: str, claimers: int, claims: int) -> list[float]:
    out: multiprocessing.Queue = multiprocessing.Queue()
    start_at = time.time() + 8  # every process has opened the core by then
    processes = [multiprocessing.Process(target=claimer, args=(url, claims, start_at, out)) for _ in range(claimers)]
    for process in processes:
        process.start()
    timings = [t for _ in processes for t in out.get(timeout=300)]
    for process in processes:
        process.join()
    return timings


def main() -> None:
    from tests.postgres import find_bin_dir, postgres_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claimers", type=int, default=8)
    parser.add_argument("--depths", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--claims", type=int, default=25, help="claims per claimer (default 25)")
    args = parser.parse_args()
    bin_dir = find_bin_dir()
    if bin_dir is None:
        sys.exit("PostgreSQL is not installed (no initdb): `make install` installs Debian's postgresql")
    rows = []
    with postgres_server(bin_dir) as url:
        for depth in args.depths:
            asyncio.run(fill(url, depth, args.users))
            timings = sorted(measure(url, args.claimers, args.claims))
            rows.append([depth, args.claimers, len(timings), statistics.median(timings),
                         timings[int(len(timings) * 0.99) - 1], timings[-1]])
    print(f"# PostgreSQL, {args.users} users, {args.claimers} processes claiming batches of 4 at once")
    print_table(["queued", "claimers", "claims", "p50 ms", "p99 ms", "max ms"], rows)
    print(f"headline: claim p50 {rows[-1][3]:.1f} ms at {args.depths[-1]} queued, "
          f"{rows[-1][3] / rows[0][3]:.2f}x the p50 at {args.depths[0]}")


if __name__ == "__main__":
    main()
