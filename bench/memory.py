"""Memory: one pipeline versus all three job kinds (txt2img, img2img, inpaint) on shared weights.

    python -m bench.memory
    python -m bench.memory --device cuda --arch sd15

Each scenario runs in a fresh process and reports its peak: resident memory on the CPU, allocated
CUDA memory on a GPU. "three separate pipelines" is what a bot without shared weights would hold.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/memory.py`: import from the repository root, not from bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import bench  # noqa: F401  (and set up first, as `python -m` does: bench/__init__.py quiets transformers)

import json
import subprocess

from bench.common import BenchSetup, bench_settings, parse_common, print_table

SCENARIOS = {
    "torch only": [],
    "one pipeline (txt2img)": ["imagine"],
    "all three kinds, shared weights": ["imagine", "edit", "inpaint"],
    "three separate pipelines": ["separate"],
}


def _peak_bytes(device: str) -> int:
    import resource

    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    # Linux: the peak of this process's own memory. getrusage's ru_maxrss would not do: it survives
    # exec, so a child started by a parent that built a 4 GB model reports at least 4 GB.
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: as good as it gets


def run_scenario(setup: BenchSetup, kinds: list[str]) -> int:
    """Inside the child process: do the work of one scenario and return its peak memory."""

    from PIL import Image

    from bot.domain import GenerationParams, JobKind
    from generation.pipelines import DiffusersGenerator, GenerationTask

    settings = bench_settings(setup)
    side = setup.side
    image = Image.new("RGB", (side, side), (120, 80, 200))
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (0, 0, side // 2, side))

    def new_generator() -> DiffusersGenerator:
        return DiffusersGenerator(settings.models, device=setup.device, dtype=setup.dtype,
                                  cache_dir=setup.models_dir)

    def run(generator: DiffusersGenerator, kind: str) -> None:
        params = GenerationParams(JobKind(kind), "a red door", width=side, height=side, steps=setup.steps,
                                  model="bench", seed=1, strength=None if kind == "imagine" else 0.7)
        generator.generate([GenerationTask(params, init_image=image if kind != "imagine" else None,
                                           mask_image=mask if kind == "inpaint" else None)])

    if kinds == ["separate"]:  # one generator, so one copy of the weights, per kind
        generators = [new_generator() for _ in range(3)]
        for generator, kind in zip(generators, ("imagine", "edit", "inpaint"), strict=True):
            run(generator, kind)
    else:
        generator = new_generator()
        for kind in kinds:
            run(generator, kind)
    return _peak_bytes(setup.device)


def main() -> None:
    args, setup = parse_common(__doc__.splitlines()[0], lambda p: p.add_argument("--scenario"))
    if args.scenario is not None:  # the child process
        print(json.dumps(run_scenario(setup, SCENARIOS[args.scenario])))
        return
    from generation.builtin import ensure_builtin

    ensure_builtin(setup.source.removeprefix("builtin:"), setup.models_dir)  # built before measuring
    peaks = {}
    for name in SCENARIOS:
        child = subprocess.run([sys.executable, "-m", "bench.memory", *sys.argv[1:], "--scenario", name],
                               capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        peaks[name] = json.loads(child.stdout.strip().splitlines()[-1])
    base = peaks["torch only"] if not setup.device.startswith("cuda") else 0
    one = peaks["one pipeline (txt2img)"] - base
    print(f"# {setup.arch} ({setup.source}) on {setup.device}, {setup.side}x{setup.side}; peak "
          f"{'allocated CUDA memory' if base == 0 else 'resident memory'} per scenario, fresh process each")
    rows = [[name, peak / 2**20, (peak - base) / 2**20, (peak - base) / one if name != "torch only" else "-"]
            for name, peak in peaks.items()]
    print_table(["scenario", "peak MiB", "above torch MiB", "x one pipeline"], rows)
    shared = (peaks["all three kinds, shared weights"] - base) / one
    separate = (peaks["three separate pipelines"] - base) / one
    print(f"headline: all three kinds use {shared:.2f}x the memory of one pipeline "
          f"(three separate pipelines: {separate:.2f}x)")


if __name__ == "__main__":
    main()
