"""/teach: time to teach a word, how well it is learned, and how long a picture waits behind a training.

    python -m bench.teach                              # builtin:shapes on the CPU (about 3 minutes)
    python -m bench.teach --device cuda --arch sd15    # SD 1.5's architecture (random weights) on a GPU
    python -m bench.teach --kind embedding             # a textual-inversion embedding instead of a LoRA

In one run, on one model:
- Easel: `/teach` through the job service and a worker, in slices of `--slice` steps with a checkpoint
  after each (so the time includes the slices' checkpoints, reloading state, and the closing
  comparison's two pictures), and the training time alone (the job's first start to its last step).
- Plain diffusers + peft: the same recipe (LoraConfig on the same layers, the model's noise scheduler,
  AdamW, the same batch and steps) as one uninterrupted loop, the way diffusers' example script runs:
  the ratio is what slicing and checkpointing cost. With `--kind embedding`, the same loop trains the
  word's new input vectors instead (train_extras' add_embedding_word), as diffusers'
  textual_inversion.py does.
- Accuracy (builtin:shapes): the taught word "zorb" means orange (the pictures are orange shapes);
  generation/shapes.py's checker reads the colour of /imagine pictures of "a zorb SHAPE on a BG
  background" over shapes, backgrounds and seeds, with the trained word and, for comparison, from
  another user who has not trained it.
- Wait: a picture submitted by another user just after a slice starts; its wait in the queue and its
  time to done, beside one slice's time (the target: at most one slice plus its own time).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/teach.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import bench  # noqa: F401

import asyncio
import io
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig
from PIL import Image

from bench.common import bench_settings, parse_common, print_table
from bot.bootstrap import open_core
from bot.domain import JobStatus, Requester, TeachCommand, TrainingPicture
from bot.events import EventKind
from generation.pipelines import load_pipeline, resolve_device_dtype
from generation.shapes import COLOURS, Scene, describe, draw
from generation.train_extras import EMBEDDING_LR, LORA_TARGETS, add_embedding_word
from generation.worker import TORCH_THREAD, build_worker

WORD, COLOUR = "zorb", "orange"
TEACHER = Requester("console", "teacher")
OTHER = Requester("console", "other")


def pictures(count: int, side: int) -> list[TrainingPicture]:
    """Orange shapes on other colours, captioned with the new word for the colour."""
    rng = random.Random(0)
    backgrounds = [name for name in COLOURS if name != COLOUR]
    result = []
    for index in range(count):
        shape, background = ("circle", "square", "triangle")[index % 3], backgrounds[index % len(backgrounds)]
        scene = Scene(COLOUR, shape, background, rng.randint(26, 40), (rng.randint(22, 42), rng.randint(22, 42)))
        buffer = io.BytesIO()
        draw(scene, side).save(buffer, format="PNG")
        result.append(TrainingPicture(buffer.getvalue(), f"a {WORD} {shape} on a {background} background"))
    return result


async def easel_run(settings, kind: str, steps: int, count: int, side: int, accuracy: bool) -> dict:
    core = await open_core(settings)
    worker = build_worker(core)
    serving = asyncio.create_task(worker.run())
    try:
        started = time.perf_counter()
        command = TeachCommand(WORD, kind=kind, steps=steps)
        training = (await core.teach.submit(TEACHER, command, pictures(count, side))).job
        other = None
        async for event in core.bus.watch(training.id):  # a picture arrives just after the first slice starts
            if event.kind is EventKind.STARTED and other is None:
                other = (await core.service.submit(OTHER, core.parser.parse("/imagine a red circle on a blue "
                                                                            "background --seed 1"))).job
        done = time.perf_counter() - started
        training = await core.service.get_job(training.id)
        picture = await core.service.get_job(other.id)
        result = {"total_s": done, "training_s": (training.finished_at - training.created_at).total_seconds(),
                  "status": training.status, "wait_s": picture.queue_wait_s,
                  "picture_done_s": (picture.finished_at - picture.created_at).total_seconds(),
                  "picture_first": picture.finished_at < training.finished_at}
        if accuracy:
            result["with_word"], result["without"] = await word_accuracy(core)
        return result
    finally:
        worker.stop()
        await asyncio.gather(serving, return_exceptions=True)
        await core.close()


async def word_accuracy(core) -> tuple[float, float]:
    """The share of pictures the checker reads as orange: the teacher's (the word is theirs), another
    user's (the same prompts, without it)."""
    shares = []
    for who in (TEACHER, OTHER):
        colours = []
        for shape in ("circle", "square", "triangle"):
            for background in ("blue", "white", "black", "green"):
                line = f"/imagine a {WORD} {shape} on a {background} background --seed 5 --n 2"
                job = (await core.service.submit(who, core.parser.parse(line))).job
                async for _event in core.bus.watch(job.id):
                    pass
                job = await core.service.get_job(job.id)
                colours += [describe(Image.open(image.path)).colour for image in job.images]
        shares.append(colours.count(COLOUR) / len(colours))
    return shares[0], shares[1]


def plain_run(setup, kind: str, steps: int, count: int, batch: int, lr: float) -> float:
    """diffusers + peft, one loop: load, add the adapter (or the word's vectors), `steps` steps of the
    same loss. Seconds."""
    device, _ = resolve_device_dtype(setup.device, "float32")
    started = time.perf_counter()
    pipe = load_pipeline(setup.source, device, torch.float32, setup.models_dir)
    for part in (pipe.vae, pipe.text_encoder, pipe.unet):
        part.requires_grad_(False)
    taught = pictures(count, setup.side)
    captions = [p.caption for p in taught]
    if kind == "embedding":
        _, spelled = add_embedding_word(pipe.tokenizer, pipe.text_encoder, f"{WORD}-word")
        captions = [caption.replace(f" {WORD} ", f" {spelled} ") for caption in captions]
        parameters, lr = [pipe.text_encoder.get_input_embeddings().weight], EMBEDDING_LR
    else:
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS))
        parameters = [p for p in pipe.unet.parameters() if p.requires_grad]
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(p.data)).convert("RGB"), dtype=np.float32))
                          for p in taught]).permute(0, 3, 1, 2).to(device) / 127.5 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(captions, padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        states = pipe.text_encoder(ids).last_hidden_state
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    generator = torch.Generator().manual_seed(0)
    pipe.unet.train(kind == "lora")
    for _ in range(steps):
        picked = torch.randint(0, count, (batch,), generator=generator)
        noise = torch.randn(latents[picked].shape, generator=generator).to(device)
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (batch,), generator=generator).to(device)
        noisy = schedule.add_noise(latents[picked], noise, timesteps)
        target = noise if schedule.config.prediction_type == "epsilon" \
            else schedule.get_velocity(latents[picked], noise, timesteps)
        text = pipe.text_encoder(ids[picked]).last_hidden_state if kind == "embedding" else states[picked]
        loss = F.mse_loss(pipe.unet(noisy, timesteps, text).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    def extra(parser) -> None:
        parser.add_argument("--train-steps", type=int, default=60, help="training steps (default: 60)")
        parser.add_argument("--slice", type=int, default=20, help="steps per slice (default: 20)")
        parser.add_argument("--pictures", type=int, default=8)
        parser.add_argument("--kind", choices=("lora", "embedding"), default="lora", help="what /teach trains")
        parser.set_defaults(arch="shapes")

    args, setup = parse_common(__doc__.split("\n\n")[0], extra)
    shapes = setup.source == "builtin:shapes"
    settings = bench_settings(setup)
    teach = settings.teach
    teach.slice_steps, teach.samples, teach.min_steps = args.slice, 0, 1
    teach.learning_rate = 1e-2 if shapes else 1e-4
    # The plain loop runs before and after Easel's run (the median of the two), so that a slow spell of
    # a shared machine does not fall on one side only; on the worker's torch thread, as Easel's slices
    # run: a second OpenMP pool beside its idle one would slow the loop down and flatter Easel.
    def plain_once() -> float:
        return TORCH_THREAD.submit(plain_run, setup, args.kind, args.train_steps, args.pictures, teach.batch,
                                   teach.learning_rate).result()

    plain_before = plain_once()
    easel = asyncio.run(easel_run(settings, args.kind, args.train_steps, args.pictures, setup.side, accuracy=shapes))
    assert easel["status"] is JobStatus.SUCCEEDED, easel
    plain = statistics.median([plain_before, plain_once()])
    slices = -(-args.train_steps // args.slice)
    per_slice = easel["training_s"] / slices
    print(f"\n{setup.source} on {setup.device}, --kind {args.kind}: {args.pictures} pictures, "
          f"{args.train_steps} steps of {teach.batch} at {setup.side}x{setup.side}, slices of {args.slice} steps")
    rows = [["Easel /teach (slices, checkpoints, comparison)", easel["total_s"], easel["total_s"] / plain],
            ["  of which queued to its last slice's end", easel["training_s"], easel["training_s"] / plain],
            ["plain diffusers + peft, one loop (median of 2)", plain, 1.0]]
    print_table(["training", "seconds", "x plain"], rows)
    print()
    print_table(["picture submitted during the training", "seconds"], [
        ["waited in the queue", easel["wait_s"]], ["submitted to done", easel["picture_done_s"]],
        ["one slice of the training (mean)", per_slice],
        ["done before the training", str(easel["picture_first"])]])
    if shapes:
        print()
        print_table([f"'{WORD}' drawn {COLOUR} (checker, 24 pictures)", "share"], [
            ["by its teacher (trained word)", easel["with_word"]], ["by another user (untrained)", easel["without"]]])


if __name__ == "__main__":
    main()
