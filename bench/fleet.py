"""A fleet on paper: N GPU workers, M models, K users with a heavy-tailed mix, Poisson arrivals.

    python -m bench.fleet                          # 8 workers / 12,500 jobs and 64 workers / 100,000 jobs
    python -m bench.fleet --workers 16 --jobs 20000 --models 8 --users 3000 --load 0.9

Each configuration runs four times on the same arrivals: with and without model affinity, with and
without batching, and prints throughput, waits (submission to start) at p50/p95/p99, the light users'
p95 wait, and model loads. It is a discrete-event simulation, no GPU involved: the capacity plan for a
large community, on paper.

What is Easel's own code and what is modelled:
- The choice of the head job is `bot.queue.choose_head`, the function every real claim calls (model
  affinity within `queue.affinity_max_passes`), with its pass counts kept as `jobs.passed_over` is.
- The fair order (least recently served user first, then submission order) and the batch fill (the
  chosen head, then other users' heads of the same batch key, then anyone's in submission order, up
  to max_batch images) are JobQueue._choose_batch's SQL, restated here over in-memory sorted lists so
  100,000 jobs simulate in seconds. A batch key is the model (every job of a model shares its size,
  steps and sampler here).
- GPU times are the published-figure profile below (an A100/H100-class card, fp16), not measured here:
  loading a model from local NVMe to the GPU, a fixed cost per diffusers call, and a cost per image.
  A worker holds `--models-per-worker` models (1: one SDXL-class model fills a 24 GB card); a claim
  for another model evicts the least recently used one and pays its load time.
- Arrivals: Poisson at `--load` times the fleet's unbatched capacity. User k submits with weight
  1/k^1.1 (a few heavy users, a long tail of light ones); each user keeps to a favourite model 90% of
  the time (favourites by model popularity, Zipf 1.2); 50% of jobs ask for 1 image, 20% for 2, 30% for 4.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/fleet.py`: import from the repository root, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import heapq
import random
import statistics
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from bench.common import print_table
from bot.queue import Head, choose_head, leave_to_idle_worker


@dataclass(frozen=True)
class ModelProfile:
    family: str
    load_s: float  # safetensors from local NVMe into GPU memory, fp16
    call_s: float  # per diffusers call: text encoders, VAE setup, scheduler
    image_s: float  # per image in a batch


# Published-figure profile (A100/H100-class, fp16): SD 1.5 at 512x512, 20 steps; SDXL at 1024x1024,
# 25 steps. Fine-tunes of a family cost what the family costs.
PROFILES = [ModelProfile("sd15", load_s=4.0, call_s=0.15, image_s=0.7),
            ModelProfile("sdxl", load_s=12.0, call_s=0.4, image_s=2.2)]
IMAGES_PER_JOB = [(1, 0.5), (2, 0.2), (4, 0.3)]


@dataclass
class Job:
    seq: int
    user: int
    model: int
    n: int
    arrival: float
    passed_over: int = 0
    started: float | None = None


@dataclass
class Worker:
    loaded: OrderedDict[int, None] = field(default_factory=OrderedDict)  # least recently used first
    loads: int = 0


@dataclass(frozen=True)
class Scenario:
    workers: int
    models: int
    users: int
    jobs: int
    load: float
    models_per_worker: int
    max_queued_per_user: int
    seed: int


def make_arrivals(s: Scenario) -> list[Job]:
    """The same jobs, at the same times, for every policy of a scenario."""
    rng = random.Random(s.seed)
    model_weights = [1 / (m + 1) ** 1.2 for m in range(s.models)]
    user_weights = [1 / (u + 1) ** 1.1 for u in range(s.users)]
    favourite = rng.choices(range(s.models), model_weights, k=s.users)
    mean_images = sum(n * p for n, p in IMAGES_PER_JOB)
    profiles = [PROFILES[m % len(PROFILES)] for m in range(s.models)]
    weighted = zip(model_weights, profiles, strict=True)
    per_image = sum(w * (p.call_s + p.image_s) for w, p in weighted) / sum(model_weights)
    job_rate = s.load * s.workers / (per_image * mean_images)  # jobs per second at `load` x unbatched capacity
    now, jobs = 0.0, []
    users = rng.choices(range(s.users), user_weights, k=s.jobs)
    for seq, user in enumerate(users):
        now += rng.expovariate(job_rate)
        model = favourite[user] if rng.random() < 0.9 else rng.choices(range(s.models), model_weights)[0]
        n = rng.choices([n for n, _ in IMAGES_PER_JOB], [p for _, p in IMAGES_PER_JOB])[0]
        jobs.append(Job(seq, user, model, n, now))
    return jobs


class Queue:
    """Waiting jobs, in JobQueue's fair order: users never served first, then least recently served;
    each user's oldest job is its head."""

    def __init__(self) -> None:
        self.by_user: dict[int, SortedList] = defaultdict(lambda: SortedList(key=lambda j: j.seq))
        self.by_model: dict[int, SortedList] = defaultdict(lambda: SortedList(key=lambda j: j.seq))
        self.last_served: dict[int, float] = {}
        self.fair = SortedList()  # (served?, last served, head seq, user)

    def __len__(self) -> int:
        return len(self.fair)

    def _key(self, user: int) -> tuple[bool, float, int, int]:
        served = self.last_served.get(user)
        return (served is not None, served or 0.0, self.by_user[user][0].seq, user)

    def add(self, job: Job) -> None:
        mine = self.by_user[job.user]
        if mine:
            self.fair.remove(self._key(job.user))
        mine.add(job)
        self.by_model[job.model].add(job)
        self.fair.add(self._key(job.user))

    def take(self, job: Job) -> None:
        self.fair.remove(self._key(job.user))
        self.by_user[job.user].remove(job)
        self.by_model[job.model].remove(job)
        if self.by_user[job.user]:
            self.fair.add(self._key(job.user))

    def served(self, user: int, now: float) -> None:
        if self.by_user[user]:
            self.fair.remove(self._key(user))
            self.last_served[user] = now
            self.fair.add(self._key(user))
        else:
            self.last_served[user] = now

    def heads(self, limit: int) -> list[Job]:
        return [self.by_user[user][0] for *_, user in self.fair.islice(0, limit)]


@dataclass(frozen=True)
class Policy:
    name: str
    max_passes: int = 0  # queue.affinity_max_passes
    max_wait_s: float = 0.0  # queue.affinity_max_wait_s


def claim(queue: Queue, worker: Worker, max_images: int, policy: Policy, now: float,
          idle_elsewhere: set[str]) -> list[Job]:
    """One claim, as JobQueue.claim_batch makes it: choose_head and leave_to_idle_worker (Easel's
    code), then the fill. Nothing when the job is left to an idle worker holding its model."""
    heads = queue.heads(16 * max_images)  # as JobQueue._choose_batch reads
    loaded = {str(model) for model in worker.loaded}
    candidates = [Head(str(job.model), job.passed_over, now - job.arrival) for job in heads]
    index = choose_head(candidates, loaded, policy.max_passes)
    if policy.max_wait_s and leave_to_idle_worker(candidates[index], loaded, idle_elsewhere, policy.max_wait_s):
        return []
    head = heads[index]
    for passed in heads[:index]:
        passed.passed_over += 1
    batch, images = [head], head.n
    fill = [job for job in heads if job is not head and job.model == head.model]
    for job in (*fill, *queue.by_model[head.model].islice(0, 16 * max_images)):
        if images >= max_images:
            break
        if job not in batch and images + job.n <= max_images:
            batch.append(job)
            images += job.n
    for job in batch:
        queue.take(job)
    for job in batch:
        queue.served(job.user, now)
        job.started = now
    return batch


POLL_S = 0.5  # generation.poll_interval_ms: when every idle worker left the jobs, they look again this soon


def run(s: Scenario, arrivals: list[Job], *, policy: Policy, max_batch: int) -> dict[str, float]:
    jobs = [Job(j.seq, j.user, j.model, j.n, j.arrival) for j in arrivals]
    profiles = [PROFILES[m % len(PROFILES)] for m in range(s.models)]
    workers = [Worker() for _ in range(s.workers)]
    idle = list(range(s.workers))
    rng = random.Random(s.seed + 1)  # which idle worker wakes first, as polling decides
    queue = Queue()
    events: list[tuple[float, int, int]] = []  # (time, 0 = arrival / 1 = worker free / 2 = poll, seq or worker)
    for job in jobs:
        heapq.heappush(events, (job.arrival, 0, job.seq))
    images_done, finished = 0, 0.0
    active: dict[int, int] = defaultdict(int)  # each user's jobs waiting or running (queue.max_queued_per_user)
    running: dict[int, list[Job]] = {}  # each busy worker's batch
    accepted: list[Job] = []

    def start(index: int, now: float) -> bool:
        """Worker `index` claims and runs a batch; False when it left the jobs to another."""
        nonlocal images_done, finished
        worker = workers[index]
        idle_elsewhere = {str(m) for other in idle if other != index for m in workers[other].loaded}
        batch = claim(queue, worker, max_batch, policy, now, idle_elsewhere)
        if not batch:
            return False
        model, profile = batch[0].model, profiles[batch[0].model]
        took = profile.call_s + profile.image_s * sum(job.n for job in batch)
        if model in worker.loaded:
            worker.loaded.move_to_end(model)
        else:
            took += profile.load_s
            worker.loads += 1
            worker.loaded[model] = None
            while len(worker.loaded) > s.models_per_worker:
                worker.loaded.popitem(last=False)
        images_done += sum(job.n for job in batch)
        finished = max(finished, now + took)
        running[index] = batch
        heapq.heappush(events, (now + took, 1, index))
        return True

    poll_pending = False
    while events:
        now, kind, which = heapq.heappop(events)
        if kind == 0:
            job = jobs[which]
            if active[job.user] >= s.max_queued_per_user:
                continue  # refused: "you have 10 jobs queued or running"
            active[job.user] += 1
            accepted.append(job)
            queue.add(job)
        elif kind == 1:
            for job in running.pop(which):
                active[job.user] -= 1
            idle.append(which)
        else:
            poll_pending = False
        while idle and queue:
            # The idle workers look in an order polling decides; the first that claims something runs it.
            looking = rng.sample(idle, len(idle))
            taker = next((index for index in looking if start(index, now)), None)
            if taker is None:  # every one left the jobs to another: they look again at the next poll
                if not poll_pending:
                    heapq.heappush(events, (now + POLL_S, 2, -1))
                    poll_pending = True
                break
            idle.remove(taker)

    waits = sorted(job.started - job.arrival for job in accepted)  # type: ignore[operator]
    per_user: dict[int, int] = defaultdict(int)
    for job in jobs:
        per_user[job.user] += 1
    median_jobs = statistics.median(per_user.values())
    light = sorted(job.started - job.arrival for job in accepted if per_user[job.user] <= median_jobs)  # type: ignore[operator]
    return {"throughput": images_done / finished, "p50": pct(waits, 50), "p95": pct(waits, 95),
            "p99": pct(waits, 99), "light_p95": pct(light, 95), "loads": sum(w.loads for w in workers),
            "refused": 1 - len(accepted) / len(jobs)}


def pct(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="*", default=[8, 64])
    parser.add_argument("--jobs", type=int, nargs="*", default=None,
                        help="jobs per --workers entry (default: 12,500 per 8 workers, 100,000 at most)")
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--load", type=float, default=0.7, help="offered load, share of unbatched capacity")
    parser.add_argument("--max-queued-per-user", type=int, default=10,
                        help="queue.max_queued_per_user: a user's jobs past it are refused")
    parser.add_argument("--models-per-worker", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=4, help="images per diffusers call, with batching")
    parser.add_argument("--max-passes", type=int, default=4, help="queue.affinity_max_passes, with affinity")
    parser.add_argument("--max-wait", type=float, default=2.0, help="queue.affinity_max_wait_s, with affinity")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    sizes = args.jobs or [min(100_000, 12_500 * max(1, n // 8)) for n in args.workers]
    profile = "; ".join(f"{p.family}: load {p.load_s:g} s, {p.call_s:g} s/call + {p.image_s:g} s/image"
                        for p in PROFILES)
    print(f"GPU profile (published figures, A100/H100 class, fp16): {profile}")
    print(f"{args.models} models (alternating families, Zipf popularity), {args.users} users (Zipf 1.1), "
          f"offered load {args.load:g} x unbatched capacity, {args.models_per_worker} model(s) per worker\n")
    rows, ratios = [], []
    for workers, count in zip(args.workers, sizes, strict=True):
        scenario = Scenario(workers, args.models, args.users, count, args.load, args.models_per_worker,
                            args.max_queued_per_user, args.seed)
        arrivals = make_arrivals(scenario)
        policies = [Policy("off"), Policy(f"passes {args.max_passes}", max_passes=args.max_passes),
                    Policy(f"passes {args.max_passes} + leave {args.max_wait:g} s", max_passes=args.max_passes,
                           max_wait_s=args.max_wait)]
        results = {}
        for batch in (1, args.max_batch):
            for policy in policies:
                started = time.perf_counter()
                r = run(scenario, arrivals, policy=policy, max_batch=batch)
                results[batch, policy] = r
                rows.append([workers, count, policy.name, batch, f"{r['refused']:.1%}", r["throughput"], r["p50"],
                             r["p95"], r["p99"], r["light_p95"], r["loads"], time.perf_counter() - started])
        off, on = results[args.max_batch, policies[0]], results[args.max_batch, policies[-1]]
        ratios.append((workers, off["loads"] / max(on["loads"], 1), off["p95"], on["p95"]))
    print_table(["workers", "jobs", "affinity", "max batch", "refused", "images/s", "wait p50 s", "p95 s", "p99 s",
                 "light users p95 s", "model loads", "sim s"], rows)
    print()
    for workers, loads, p95_off, p95_on in ratios:
        print(f"{workers} workers, batching on: full affinity loads models {loads:.1f}x less often; "
              f"p95 wait {p95_off:.1f} s without it, {p95_on:.1f} s with it")


if __name__ == "__main__":
    main()
