"""Throughput: plain diffusers versus Easel end to end, on the same model in the same run.

    python -m bench.throughput                       # builtin:tiny on the CPU
    python -m bench.throughput --device cuda --arch sd15
    python -m bench.throughput --compile             # every UNet through torch.compile, Easel's too

Plain diffusers is the baseline: one pipeline call per image, one after another, as a bot that serves
one job at a time behind a lock would. The ceiling is plain diffusers called with `max_batch` prompts at
a time: the most images/s any scheduler can get from batches of that size, so Easel's images/s under
load are also given as a fraction of it. With --compile every side's UNet goes through torch.compile
(Easel's by `[generation] compile`), so the ratios still compare like with like, and plain diffusers
uncompiled ("eager") is timed as well: what turning the switch on gains. Easel is measured end to end: K
simulated users each submit jobs through the job service (one at a time, waiting for each result, like a
person in a chat), and the clock stops when every image is stored and its `done` event published. One
service (database, job service, worker) serves every concurrency and stays up across the rounds, as a
bot does; both systems are warmed up before the first round. The headline compares each Easel run with
the baseline run right beside it in its round and gives the median of those ratios over the rounds (see
measure_rounds).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/throughput.py`: import from the repository root, not from bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import bench  # noqa: F401  (and set up first, as `python -m` does: bench/__init__.py quiets transformers)

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from sqlalchemy import event

from bench.common import BenchSetup, bench_settings, parse_common, print_table
from bot.bootstrap import open_core
from bot.domain import JobKind, Requester
from generation.builtin import ensure_builtin
from generation.pipelines import DTYPE_KEYWORD, DiffusersGenerator, GenerationTask
from generation.samplers import make_scheduler
from generation.worker import TORCH_THREAD, Generator, StepCallback, Worker

PROMPT = "a lighthouse at dusk, oil painting"


def plain_diffusers(setup: BenchSetup, batch: int = 1, compile: bool = False) -> Callable[[int], float]:
    """A timer: seconds for N images from sequential pipeline calls of `batch` prompts each (the last
    call takes what is left), warmed up once first (with `compile`, the UNet is compiled then)."""
    source = setup.source.removeprefix("builtin:")
    folder = ensure_builtin(source, setup.models_dir)
    dtype = torch.float16 if setup.dtype == "float16" else torch.float32
    pipe = TORCH_THREAD.submit(lambda: StableDiffusionPipeline.from_pretrained(
        folder, **{DTYPE_KEYWORD: dtype}).to(setup.device)).result()
    pipe.set_progress_bar_config(disable=True)
    if compile:
        pipe.unet = torch.compile(pipe.unet)

    def call(seeds: range) -> None:
        pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)  # the sampler Easel uses
        pipe([PROMPT] * len(seeds), num_inference_steps=setup.steps, width=setup.side, height=setup.side,
             generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds])

    def timed(images: int) -> float:
        _sync(setup)
        start = time.perf_counter()
        for first in range(0, images, batch):
            call(range(first, min(first + batch, images)))
        _sync(setup)
        return time.perf_counter() - start

    # Run the calls on the thread Easel's worker runs torch on: each thread that calls torch gets
    # OpenMP threads of its own, and pools idling beside each other slow whichever one works.
    def on_thread(images: int) -> float:
        return TORCH_THREAD.submit(timed, images).result()

    on_thread(batch)
    return on_thread


class TimedGenerator:
    """A generator that adds up the seconds its diffusers calls take. Easel's calls timed beside the
    baselines' split a row's difference into the call itself (slowed, or not, by the bookkeeping that
    runs beside it) and the bookkeeping between calls."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.seconds = 0.0

    def generate(self, tasks: list[GenerationTask], on_step: StepCallback | None = None) -> list[list[Image.Image]]:
        start = time.perf_counter()
        try:
            return self.generator.generate(tasks, on_step)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str) -> object:
        # The rest is the real generator's: `warm`, and what the worker reads, such as which models it holds
        # (`loaded_models`) to prefer their jobs. Without this the worker took the bench's model for unloaded
        # and asked the worker registry for idle workers holding it at every claim.
        return getattr(self.generator, name)


class EaselRun(NamedTuple):
    """One measurement of Easel (EaselService.measure)."""

    seconds: float  # for every job to be done
    mean_batch: float
    loop_ms_per_job: float  # the event loop's CPU: the bookkeeping (SQL, events, PNGs handed to threads)
    statements_per_job: float  # SQL
    call_seconds: float  # of `seconds`, spent in the worker's diffusers calls


class EaselService:
    """Easel as it runs in production: one core (database, job service) and one worker serving it,
    kept up across measurements like a long-running bot, so the figures are steady-state ones."""

    def __init__(self, setup: BenchSetup, generator: Generator, max_batch: int) -> None:
        self.setup = setup
        self.generator = TimedGenerator(generator)
        self.max_batch = max_batch
        self.next_seed = 0  # every image of the session is a new one (the store keeps duplicates once)

    async def __aenter__(self) -> EaselService:
        settings = bench_settings(self.setup, max_batch=self.max_batch)
        self.core = await open_core(settings)
        self.statements = 0  # SQL statements this service's database has run

        @event.listens_for(self.core.db.engine.sync_engine, "before_cursor_execute")
        def count(*_: object) -> None:
            self.statements += 1

        self.worker = Worker(self.core.queue, self.generator, self.core.store, settings)
        self.serving = asyncio.create_task(self.worker.run())
        return self

    async def __aexit__(self, *_: object) -> None:
        self.worker.stop()
        await self.serving
        await self.core.close()

    async def measure(self, users: int, jobs: int) -> EaselRun:
        """`users` closed-loop users getting `jobs` one-image jobs done."""
        seeds = range(self.next_seed, self.next_seed + jobs)
        self.next_seed += jobs
        batches_before = self.worker.stats.batches

        async def user(index: int) -> None:
            requester = Requester(platform="bench", user_id=f"user{index}")
            for seed in seeds[index::users]:
                command = self.core.parser.parse_generation(
                    JobKind.IMAGINE, f"{PROMPT} --seed {seed} --sampler euler")
                submitted = await self.core.service.submit(requester, command)
                async for _ in self.core.bus.watch(submitted.job.id):
                    pass

        statements_before, calls_before = self.statements, self.generator.seconds
        start, loop_cpu = time.perf_counter(), time.thread_time()  # the loop runs on this thread
        await asyncio.gather(*(user(i) for i in range(users)))
        _sync(self.setup)
        elapsed = time.perf_counter() - start
        loop_ms_per_job = (time.thread_time() - loop_cpu) * 1000 / jobs
        return EaselRun(elapsed, jobs / max(self.worker.stats.batches - batches_before, 1), loop_ms_per_job,
                        (self.statements - statements_before) / jobs, self.generator.seconds - calls_before)


def _sync(setup: BenchSetup) -> None:
    if setup.device.startswith("cuda"):
        torch.cuda.synchronize()


async def measure_rounds(setup: BenchSetup, generator: Generator, baselines: dict[str, Callable[[int], float]],
                         concurrencies: list[int], images: int, rounds: int,
                         max_batch: int) -> tuple[dict[str, list[float]], dict[int, list[EaselRun]]]:
    """Rounds interleave the systems, so a busy moment on the machine hurts all alike. Within a round
    the first baseline (plain diffusers) runs first, then Easel from the fewest users to the most, then
    the other baselines (the ceiling); every other round runs in the reverse order. So each round's
    baselines run right beside the Easel rows compared with them, and a machine whose speed drifts
    steadily favours neither side over two rounds. One service serves every concurrency, as one bot
    serves however many people come; it is warmed up (database, statement caches) at each concurrency
    before the rounds. (A service per concurrency, as before 2026-12-07, left the idle workers of the
    others polling the queue beside the one measured: a cost no bot pays.)"""
    async with EaselService(setup, generator, max_batch) as service:
        for users in concurrencies:
            await service.measure(users, users)
        baseline_runs: dict[str, list[float]] = {name: [] for name in baselines}
        easel_runs: dict[int, list[EaselRun]] = {users: [] for users in concurrencies}
        names = list(baselines)
        order: list[str | int] = [*names[:1], *sorted(concurrencies), *names[1:]]
        for index in range(rounds):
            for system in reversed(order) if index % 2 else order:
                if isinstance(system, str):  # blocks the loop: nothing else runs meanwhile
                    baseline_runs[system].append(baselines[system](images))
                else:
                    easel_runs[system].append(await service.measure(system, images))
    return baseline_runs, easel_runs


def main() -> None:
    args, setup = parse_common(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--images", type=int, default=24, help="images per measurement (default 24)"),
        p.add_argument("--max-batch", type=int, default=4, help="Easel's generation.max_batch"),
        p.add_argument("--concurrency", default="1,4,16", help="simulated users, comma-separated"),
        p.add_argument("--compile", action="store_true",
                       help="torch.compile every UNet (plain diffusers', the ceiling's and Easel's), and time "
                            "plain diffusers uncompiled as well"),
        p.add_argument("--rounds", type=int, default=9,
                       help="measure everything this often, interleaved (default 9); the table shows medians, "
                            "the headline the median of each round's ratios"),
    ))
    images, concurrencies = args.images, [int(u) for u in args.concurrency.split(",")]
    compiled_note = ", every UNet compiled" if args.compile else ""
    print(f"# {setup.arch} ({setup.source}) on {setup.device}, {setup.side}x{setup.side}, {setup.steps} steps, "
          f"{images} images per measurement, median of {args.rounds} interleaved rounds, torch {torch.__version__}"
          f"{compiled_note}")
    plain_name, ceiling_name = "plain diffusers", f"ceiling (batch {args.max_batch})"
    eager_name = "plain diffusers, eager"  # with --compile: plain diffusers uncompiled
    baselines = {plain_name: plain_diffusers(setup, compile=args.compile),
                 ceiling_name: plain_diffusers(setup, batch=args.max_batch, compile=args.compile)}
    if args.compile:
        baselines[eager_name] = plain_diffusers(setup)
    # Easel's switch compiles the generator's UNet; its warm-up here (which loads the model anyway) is the
    # compile, so the worker, whose own settings leave the switch off, does not warm it a second time.
    switches = {"compile": True, "compile_sizes": [f"{setup.side}x{setup.side}"]} if args.compile else {}
    settings = bench_settings(setup, **switches)
    generator = DiffusersGenerator(settings.models, device=setup.device, dtype=setup.dtype,
                                   cache_dir=setup.models_dir, options=settings.generation)
    TORCH_THREAD.submit(generator.warm, "bench").result()
    baseline_runs, easel_runs = asyncio.run(
        measure_rounds(setup, generator, baselines, concurrencies, images, args.rounds, args.max_batch))

    # Every row against plain diffusers (time ratio, speed-up) and against the ceiling (images/s).
    baseline, ceiling = statistics.median(baseline_runs[plain_name]), statistics.median(baseline_runs[ceiling_name])
    rows = []
    for name, runs in baseline_runs.items():
        batch = args.max_batch if name == ceiling_name else 1
        seconds = statistics.median(runs)
        rows.append([name, "-", f"{min(batch, images):.1f}", seconds, images / seconds, seconds / images,
                     seconds / baseline, baseline / seconds, ceiling / seconds, seconds / images, "-", "-"])
    results = {}
    for users, runs in easel_runs.items():
        seconds = statistics.median(run.seconds for run in runs)
        mean_batch = statistics.median(run.mean_batch for run in runs)
        loop_ms_per_job = statistics.median(run.loop_ms_per_job for run in runs)
        statements_per_job = statistics.median(run.statements_per_job for run in runs)
        call_s_per_image = statistics.median(run.call_seconds for run in runs) / images
        results[users] = seconds
        rows.append([f"easel (max_batch {args.max_batch})", users, f"{mean_batch:.1f}", seconds,
                     images / seconds, seconds / images, seconds / baseline, baseline / seconds,
                     ceiling / seconds, call_s_per_image, f"{loop_ms_per_job:.1f}", f"{statements_per_job:.1f}"])
    print_table(["system", "users", "batch", "seconds", "images/s", "s/image", "time ratio", "speed-up",
                 "of ceiling", "call s/image", "loop ms/job", "SQL/job"], rows)
    # The headline takes each ratio within a round, where Easel ran right beside its baseline, and gives
    # the median over the rounds: this machine's speed drifts by a fifth within minutes, and a ratio of
    # the table's medians, taken from different rounds, carries that drift in. The rounds' own ratios
    # show how far one round can be trusted.
    lowest, highest = min(results), max(results)
    plain_runs, ceiling_runs = baseline_runs[plain_name], baseline_runs[ceiling_name]
    one_user = [run.seconds / plain for run, plain in zip(easel_runs[lowest], plain_runs, strict=True)]
    speed_up = [plain / run.seconds for run, plain in zip(easel_runs[highest], plain_runs, strict=True)]
    of_ceiling = [best / run.seconds for run, best in zip(easel_runs[highest], ceiling_runs, strict=True)]
    print(f"headline (median of the rounds' own ratios): concurrency {lowest}: Easel's time per image is "
          f"{statistics.median(one_user):.2f}x plain diffusers' (rounds {_listed(one_user)}); concurrency "
          f"{highest}: Easel's images/s are {statistics.median(speed_up):.2f}x plain diffusers', "
          f"{statistics.median(of_ceiling):.2f} of the ceiling (rounds {_listed(of_ceiling)})")

    # Easel's diffusers calls against the same baselines, and what the rest (the time no call ran) costs
    # an image: a call slower than the baseline's is slowed by the bookkeeping running beside it; the
    # rest is the bookkeeping between calls.
    def split(runs: list[EaselRun], references: list[float]) -> str:
        calls = statistics.median(run.call_seconds / reference
                                  for run, reference in zip(runs, references, strict=True))
        rest_ms = statistics.median((run.seconds - run.call_seconds) * 1000 / images for run in runs)
        return f"its diffusers calls {calls:.2f}x the time, the rest {rest_ms:.1f} ms an image"

    print(f"where it goes: concurrency {lowest} against plain diffusers: {split(easel_runs[lowest], plain_runs)}; "
          f"concurrency {highest} against the ceiling: {split(easel_runs[highest], ceiling_runs)}")
    if eager_name in baseline_runs:  # --compile: what turning the switch on gains, each round against its eager run
        eager = baseline_runs[eager_name]
        easel = [run.seconds / plain for run, plain in zip(easel_runs[lowest], eager, strict=True)]
        compiled = [plain / uncompiled for plain, uncompiled in zip(plain_runs, eager, strict=True)]
        print(f"against plain diffusers uncompiled (eager): concurrency {lowest}: Easel's time per image is "
              f"{statistics.median(easel):.2f}x (rounds {_listed(easel)}); plain diffusers compiled "
              f"{statistics.median(compiled):.2f}x")


def _listed(ratios: list[float]) -> str:
    return " ".join(f"{ratio:.2f}" for ratio in ratios)


if __name__ == "__main__":
    main()
