"""/animate on any generator: frame 0 from the prompt (or the attached picture), then each frame is the
one before moved by the camera (bot/animation.py) and redrawn by img2img at the job's low strength, with
the job's seed every time, so consecutive frames differ a little and the clip drifts smoothly.

Animations that share a batch key (same size, settings, frames and camera) make each frame together: one
generator call per frame for all of them, whoever asked. Each finished frame goes to `on_frame` at once,
so the worker can keep it and a successor resume from it (`done` holds the frames already made).

Example:
    frames = animate(generator, [task], done=[[]], on_frame=lambda task, index, frame: None)
    store.put_job_file(job_id, CLIP_NAME, mp4_bytes(frames[0], fps=8))
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import replace
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from bot.animation import GIF_MAX_BYTES, GIF_MAX_SIDE, camera_move, keyframes, prompt_at
from bot.domain import GenerationParams, JobKind
from bot.policy import steps_run
from generation.pipelines import GenerationTask

# generate(tasks, on_step) of generation/worker.py's Generator protocol.
Generate = Callable[..., list[list[Image.Image]]]
FrameCallback = Callable[[int, int, Image.Image], None]  # (task index, frame index, frame)


def animate(generate: Generate, tasks: Sequence[GenerationTask], done: Sequence[Sequence[Image.Image]],
            on_frame: FrameCallback, on_step: Callable[..., None] | None = None) -> list[list[Image.Image]]:
    """Every frame of each task's clip, from the frames in `done` on. `on_step(step, total[, previews])`
    counts denoising steps over the whole clip; after each frame it comes with a JPEG of every task's
    newest frame."""
    # 1. Check inputs
    motion = tasks[0].params.motion
    if motion is None or any(task.params.kind is not JobKind.ANIMATE for task in tasks):
        raise ValueError("animate() takes /animate tasks, each with `params.motion`")
    if len(done) != len(tasks) or any(len(frames) > motion.frames for frames in done):
        raise ValueError("`done` must hold, per task, at most `motion.frames` finished frames")
    frames = [list(each) for each in done]
    total = steps_run(tasks[0].params)
    steps_before = [_steps_before(task.params, len(each)) for task, each in zip(tasks, frames, strict=True)]

    # 2. One frame at a time, each from the one before; the tasks at the same frame go together.
    for index in range(min(len(each) for each in frames), motion.frames):
        behind = [i for i, each in enumerate(frames) if len(each) == index]
        for i in [i for i in behind if index == 0 and tasks[i].init_image is not None]:
            _finish(frames, on_frame, i, index, tasks[i].init_image.convert("RGB"))  # the attached picture
        calls: dict[JobKind, list[int]] = {}
        for i in behind:
            if len(frames[i]) == index:
                calls.setdefault(JobKind.IMAGINE if index == 0 else JobKind.EDIT, []).append(i)
        for kind, indices in calls.items():
            frame_tasks = [_frame_task(tasks[i], kind, index, frames[i]) for i in indices]
            before = min(steps_before[i] for i in indices)
            progress = (lambda step, _total, *_previews, before=before: on_step(before + step, total)) \
                if on_step else None
            for i, [image] in zip(indices, generate(frame_tasks, progress), strict=True):
                _finish(frames, on_frame, i, index, image)
                steps_before[i] = _steps_before(tasks[i].params, len(frames[i]))
        if on_step is not None:
            on_step(min(steps_before), total, [_jpeg(each[-1]) for each in frames])
    return frames


def mp4_bytes(frames: Sequence[Image.Image], fps: int) -> bytes:
    """The frames as an H.264 MP4 (yuv420p, which every player and chat app shows inline), made in memory:
    the store writes it whole (a clip is at most 48 small frames)."""
    width, height = frames[0].size
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}  # near-lossless: the frames are small and differ little
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def gif_bytes(frames: Sequence[Image.Image], fps: int) -> bytes | None:
    """The frames as a GIF that loops forever, written by Pillow (each frame its own 256-colour palette),
    at most GIF_MAX_SIDE pixels a side and GIF_MAX_BYTES long, halving the frames until it fits; None when
    it does not fit even at 64 pixels a side."""
    width, height = frames[0].size
    scale = min(1.0, GIF_MAX_SIDE / max(width, height))
    while max(width, height) * scale >= 64:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        shown = [frame.convert("RGB").resize(size, Image.Resampling.LANCZOS) if size != frame.size
                 else frame.convert("RGB") for frame in frames]
        buffer = io.BytesIO()
        # GIF counts hundredths of a second, and Pillow cuts milliseconds down to them: round here instead.
        shown[0].save(buffer, format="GIF", save_all=True, append_images=shown[1:], duration=10 * round(100 / fps),
                      loop=0, optimize=False)
        if buffer.tell() <= GIF_MAX_BYTES:
            return buffer.getvalue()
        scale /= 2
    return None


def _frame_task(task: GenerationTask, kind: JobKind, index: int, frames: list[Image.Image]) -> GenerationTask:
    """Frame `index` as a plain generation: txt2img for the first, img2img of the moved frame before after."""
    params = task.params
    assert params.motion is not None
    prompt = prompt_at(keyframes(params.prompt), index)
    if kind is JobKind.IMAGINE:
        return GenerationTask(replace(params, kind=kind, prompt=prompt, strength=None, motion=None, n=1))
    return GenerationTask(replace(params, kind=kind, prompt=prompt, motion=None, n=1),
                          init_image=camera_move(frames[-1], params.motion))


def _finish(frames: list[list[Image.Image]], on_frame: FrameCallback, task: int, index: int,
            image: Image.Image) -> None:
    frames[task].append(image)
    on_frame(task, index, image)


def _steps_before(params: GenerationParams, finished: int) -> int:
    """Denoising steps a clip has run once `finished` frames are made (the clip's total once all are)."""
    if finished == 0:
        return 0
    return steps_run(replace(params, motion=replace(params.motion, frames=finished)))


def _jpeg(frame: Image.Image) -> bytes:
    buffer = io.BytesIO()
    frame.convert("RGB").save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()
