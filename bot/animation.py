"""/animate's words and camera: keyframed prompts, the move from one frame to the next, and where the
frames and the video of a job are kept.

The grammar checks keyframes with `keyframes`; the worker asks `prompt_at` for each frame's prompt,
moves the frame before with `camera_move`, and keeps each finished frame as the job's file
`frame_name(index)` in the image store (so a killed worker's successor, on any host, resumes at the last
finished frame) and the clip as its file `CLIP_NAME`.

Example:
    >>> keyframes("0: a forest | 12: a city")
    [(0, 'a forest'), (12, 'a city')]
    >>> prompt_at(keyframes("0: a forest | 12: a city"), 11)
    'a forest'
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from bot.domain import GenerationParams, Motion
from bot.errors import InvalidCommand

_KEYFRAME = re.compile(r"\s*(?P<frame>\d{1,6})\s*:\s*(?P<prompt>.*?)\s*", re.DOTALL)
_STARTS_WITH_KEYFRAME = re.compile(r"\s*0\s*:")


def keyframes(prompt: str) -> list[tuple[int, str]]:
    """The prompt's keyframes, `0: a forest | 12: a city` as [(0, "a forest"), (12, "a city")]; a prompt
    that does not start with `0:` is one keyframe at frame 0. Raises InvalidCommand for a malformed one."""
    if not _STARTS_WITH_KEYFRAME.match(prompt):
        return [(0, prompt.strip())]
    found: list[tuple[int, str]] = []
    for part in prompt.split("|"):
        match = _KEYFRAME.fullmatch(part)
        if match is None or not match["prompt"]:
            raise InvalidCommand(f"keyframed prompts are FRAME: PROMPT parts split by |, e.g. 0: a forest | 12: a city "
                                 f"(got {part.strip()[:40]!r})")
        frame = int(match["frame"])
        if found and frame <= found[-1][0]:
            raise InvalidCommand(f"keyframe {frame} comes after keyframe {found[-1][0]}; give them in order of frame")
        found.append((frame, match["prompt"]))
    return found


def prompt_at(frames: list[tuple[int, str]], frame: int) -> str:
    """The prompt of the last keyframe at or before `frame`."""
    return [prompt for start, prompt in frames if start <= frame][-1]


def camera_move(frame: Image.Image, motion: Motion) -> Image.Image:
    """The frame as the camera sees it one frame later: zoomed about its centre, rotated, then panned.
    Pixels coming in from outside are the frame's edge carried on, so the next frame has no black."""
    width, height = frame.size
    centre_x, centre_y = width / 2, height / 2
    moved = frame.convert("RGB")
    if motion.zoom != 1.0 or motion.rotate:
        moved = moved.rotate(motion.rotate, resample=Image.Resampling.BICUBIC, center=(centre_x, centre_y))
        moved = _with_edges(frame, moved, motion.rotate)
        if motion.zoom != 1.0:
            scaled = moved.resize((round(width * motion.zoom), round(height * motion.zoom)), Image.Resampling.BICUBIC)
            moved = _centre_crop_or_pad(scaled, width, height)
    dx, dy = motion.pan
    if dx or dy:
        moved = _shift(moved, round(dx), round(dy))
    return moved


def frames_done(params: GenerationParams, step: int) -> int:
    """How many frames of an animation are finished once `step` of its steps have run (progress counts the
    clip's steps: the first frame's, then `steps x strength` for each further one, as bot/policy.py does)."""
    if params.motion is None or step < params.steps:
        return 0
    redraw = max(1, min(params.steps, int(params.steps * (params.strength or 1))))
    return min(params.motion.frames, 1 + (step - params.steps) // redraw)


CLIP_NAME = "clip.mp4"  # the job's clip, an H.264 MP4, a file of the job in the store beside its frames
# The same clip as a looping GIF, where that previews better than the MP4 (bot/delivery.py's offers_gif).
# Bounded: frames shrunk to GIF_MAX_SIDE pixels at most, then halved until the file fits GIF_MAX_BYTES
# (a clip that does not fit even at 64 pixels has no GIF).
GIF_NAME = "clip.gif"
GIF_MAX_SIDE = 512
GIF_MAX_BYTES = 8 * 2**20


def frame_name(index: int) -> str:
    """The name of a job's finished frame in the store (bot/store.py's job files), `frame-0000.png` on."""
    return f"frame-{index:04d}.png"


def _with_edges(original: Image.Image, rotated: Image.Image, degrees: float) -> Image.Image:
    """Fill the corners a rotation uncovers (rotate leaves them black) with the unrotated frame's pixels."""
    if not degrees:
        return rotated
    mask = Image.new("L", original.size, 255).rotate(degrees, resample=Image.Resampling.NEAREST,
                                                       center=(original.width / 2, original.height / 2))
    return Image.composite(rotated, original.convert("RGB"), mask)


def _centre_crop_or_pad(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` cut (zooming in) or extended by its edges (zooming out) to width x height about its centre."""
    if image.width >= width:
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))
    left, top = (width - image.width) // 2, (height - image.height) // 2
    pixels = np.asarray(image)
    padded = np.pad(pixels, ((top, height - image.height - top), (left, width - image.width - left), (0, 0)),
                    mode="edge")
    return Image.fromarray(padded)


def _shift(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """`image` moved dx right and dy down; the uncovered side repeats the edge it came from."""
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    dx, dy = max(-width + 1, min(width - 1, dx)), max(-height + 1, min(height - 1, dy))
    padded = np.pad(pixels, ((max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)), (0, 0)), mode="edge")
    top, left = max(-dy, 0), max(-dx, 0)
    return Image.fromarray(padded[top:top + height, left:left + width])
