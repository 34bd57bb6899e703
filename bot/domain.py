"""Plain values shared by the grammar, the job service, the queue and the worker.

Nothing here touches the database, a platform or torch: these are the words the rest of Easel speaks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any


class JobKind(StrEnum):
    """What a job asks the model to do."""

    IMAGINE = "imagine"  # text to image
    EDIT = "edit"  # image to image: start from an attached picture
    INPAINT = "inpaint"  # repaint the white pixels of a mask
    OUTPAINT = "outpaint"  # paint a border around a picture: inpaint on a larger canvas (bot/outpaint.py)
    ANIMATE = "animate"  # frames, each the last one moved by a camera and redrawn (generation/animation.py)
    UPSCALE = "upscale"  # a picture enlarged by the [upscale] model, then a light img2img pass (generation/upscale.py)
    TEACH = "teach"  # train a LoRA or embedding from the owner's pictures, one slice of steps per claim (bot/teach.py)

    @property
    def takes_image(self) -> bool:
        """Whether the job starts from a picture (and so has a --strength). /animate may start from one."""
        return self in (JobKind.EDIT, JobKind.INPAINT, JobKind.OUTPAINT, JobKind.UPSCALE)

    @property
    def takes_mask(self) -> bool:
        """Whether the job repaints only the white pixels of a mask (outpaint makes its own)."""
        return self in (JobKind.INPAINT, JobKind.OUTPAINT)


class JobStatus(StrEnum):
    """Where a job is in its life. Only QUEUED and RUNNING ever change again."""

    QUEUED = "queued"  # accepted and stored; waiting for the worker
    RUNNING = "running"  # claimed by a worker; back to QUEUED if that worker dies
    SUCCEEDED = "succeeded"  # every image stored
    FAILED = "failed"  # gave up; `error` says why in words a user can act on
    CANCELLED = "cancelled"  # stopped by its owner before it finished

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


# Sampler names users may type, mapped to diffusers schedulers in generation/samplers.py.
# The names follow what AUTOMATIC1111 and ComfyUI users already know, lower-cased.
SAMPLERS: tuple[str, ...] = (
    "euler",
    "euler_a",
    "ddim",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "heun",
    "lms",
    "pndm",
    "unipc",
)


@dataclass(frozen=True)
class Motion:
    """/animate's clip and camera: each frame is the one before moved this much, then redrawn."""

    frames: int = 12
    fps: int = 8
    zoom: float = 1.0  # scale per frame: above 1 moves in, below 1 out
    pan: tuple[float, float] = (0.0, 0.0)  # pixels per frame the picture moves: right, down
    rotate: float = 0.0  # degrees per frame, counter-clockwise

    def to_text(self) -> str:
        """As the database stores it (and the queue compares it): `{"frames": 12, "fps": 8, ...}`."""
        return json.dumps({"frames": self.frames, "fps": self.fps, "zoom": self.zoom, "pan": list(self.pan),
                           "rotate": self.rotate})

    @classmethod
    def of_text(cls, text: str | None) -> Motion | None:
        if text is None:
            return None
        values = json.loads(text)
        return cls(frames=values["frames"], fps=values["fps"], zoom=values["zoom"], pan=tuple(values["pan"]),
                   rotate=values["rotate"])


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides the pixels of a job, apart from the input images.

    `seed` is None when the user asked for none; the job service picks one before the job is stored,
    so every stored job has a seed and image i of a job always uses `seed + i`.
    """

    kind: JobKind
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg: float = 7.0
    n: int = 1
    sampler: str = "euler"
    model: str = "tiny"
    seed: int | None = None
    strength: float | None = None  # edit and inpaint only: how much of the input to repaint
    # (LoRA name, weight) pairs sorted by name, so equal sets compare equal (see with_loras).
    loras: tuple[tuple[str, float], ...] = ()
    motion: Motion | None = None  # /animate only

    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one diffusers call (prompts, negatives and seeds may differ).
        A LoRA changes the model's weights for the whole call, so only equal LoRA sets share one.
        Animations with the same frames and camera share each frame's call."""
        return (self.kind, self.model, self.width, self.height, self.steps, self.sampler, self.cfg,
                self.strength, loras_text(self.loras), self.motion.to_text() if self.motion else None)

    def image_seeds(self) -> list[int]:
        """The seed of each image: the base seed, then the next ones."""
        if self.seed is None:
            raise ValueError("image_seeds() needs a seed; the job service assigns one before queuing")
        return [self.seed + i for i in range(self.n)]


def sorted_loras(loras: Iterable[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """LoRAs in the one order GenerationParams keeps them: by name, weights as floats."""
    return tuple(sorted((name, float(weight)) for name, weight in loras))


def loras_text(loras: tuple[tuple[str, float], ...]) -> str:
    """The LoRAs as the database stores them (and the queue compares them): `[["cyan", 0.8]]`, `[]`."""
    return json.dumps([[name, weight] for name, weight in sorted_loras(loras)], ensure_ascii=False)


def loras_of_text(text: str | None) -> tuple[tuple[str, float], ...]:
    return sorted_loras((name, weight) for name, weight in json.loads(text or "[]"))


def lora_tags(loras: tuple[tuple[str, float], ...]) -> str:
    """The LoRAs as AUTOMATIC1111's prompt tags, as users type them: `<lora:ring:0.8> <lora:cross:1>`."""
    return " ".join(f"<lora:{name}:{weight:g}>" for name, weight in loras)


@dataclass(frozen=True)
class OutpaintMargins:
    """How far /outpaint grows the canvas: `zoom` times the picture on each side (the picture stays in the
    middle), or the pixels added on each side, `--left 32 --up 64`. One of the two, never both."""

    zoom: float | None = None
    left: int = 0
    right: int = 0
    up: int = 0
    down: int = 0

    def describe(self) -> str:
        """As the flags that ask for it: `--zoom 2`, `--left 32 --up 64`."""
        if self.zoom is not None:
            return f"--zoom {self.zoom:g}"
        sides = (("left", self.left), ("right", self.right), ("up", self.up), ("down", self.down))
        return " ".join(f"--{side} {pixels}" for side, pixels in sides if pixels)


@dataclass(frozen=True)
class GenerateCommand:
    """/imagine, /edit, /inpaint or /outpaint: the images themselves come from the adapter (attachments).

    `size_from_input` is True for /edit and /inpaint when the user gave neither --size nor --ar: the
    job service then fits the size to the attached image's aspect ratio (see grammar.fit_size).
    """

    params: GenerationParams
    size_from_input: bool = False
    # `{https://...}` links taken out of the prompt: the image (and, for /inpaint, the mask) to fetch
    # when none is attached (bot/fetch.py).
    reference_urls: tuple[str, ...] = ()
    # A permutation prompt, `a {red, green} circle` (bot/permutations.py): the params of every
    # combination after the first, `params`. Each becomes a job of its own, with its own seed.
    permutations: tuple[GenerationParams, ...] = ()
    # /outpaint: how much to add around the picture. None for the other kinds, and for an outpaint job
    # made again from its stored canvas and mask (a re-roll), which are already the job's size.
    outpaint: OutpaintMargins | None = None

    def every_params(self) -> tuple[GenerationParams, ...]:
        """The params of each job this command makes: one, or one per permutation."""
        return (self.params, *self.permutations)


TEACH_KINDS = ("lora", "embedding")  # a LoRA on the UNet, or a textual-inversion embedding (new input vectors)


@dataclass(frozen=True)
class TeachCommand:
    """/teach NAME [--kind lora|embedding] [--steps N] [--rank R] [--trigger WORD] [shared caption]: teach
    the model a new word from the attached pictures (bot/teach.py). None: the configured default."""

    name: str
    kind: str = "lora"
    steps: int | None = None
    rank: int | None = None
    trigger: str | None = None  # the word that calls it in a prompt; default: the name
    model: str | None = None  # the model it is trained for; default: the default model
    caption: str = ""  # for every picture without a caption of its own; default: the trigger word

    @property
    def trigger_word(self) -> str:
        return self.trigger or self.name


@dataclass(frozen=True)
class TrainingPicture:
    """One picture to teach from, as the adapter received it, with its own caption (may be empty)."""

    data: bytes
    caption: str = ""
    filename: str = ""  # for error messages: "cat3.png"


@dataclass(frozen=True)
class QuotaCommand:
    """/quota [command]: what is left, when it resets, and what `command` (or a default /imagine) costs."""

    command: GenerateCommand | None = None
    teach: TeachCommand | None = None  # /quota /teach NAME --steps N: what that training costs


@dataclass(frozen=True)
class JobCommand:
    """/job <id>: one job's parameters, seeds and status."""

    job_id: str


@dataclass(frozen=True)
class JobsCommand:
    """/jobs: the user's recent jobs, newest first, a line each."""

    limit: int = 10  # how many: enough to find a job again, short enough for one chat message


@dataclass(frozen=True)
class CancelCommand:
    """/cancel [id]: cancel one job, or the user's newest unfinished job when no id is given."""

    job_id: str | None = None


@dataclass(frozen=True)
class HelpCommand:
    """/help: the commands with examples."""


@dataclass(frozen=True)
class StylesCommand:
    """/styles: the styles of styles.csv that --style NAME applies (bot/styles.py)."""


@dataclass(frozen=True)
class LorasCommand:
    """/loras: the installed LoRAs and embeddings, each with what it is for (bot/extra_networks.py)."""


@dataclass(frozen=True)
class ModelsCommand:
    """/models: every model with its family, default size and settings, and what it is for (bot/catalog.py)."""


@dataclass(frozen=True)
class AppealCommand:
    """/appeal <job id | fNN | ban> <text>: ask a moderator to look at a withheld image, a refused
    prompt (the flag id its refusal named) or a ban."""

    subject: str  # a job id, "f12" for safety flag 12, or "ban"
    text: str


@dataclass(frozen=True)
class ModFlagsCommand:
    """/mod flags [user]: recent safety decisions, everyone's or one user's."""

    user: str | None = None  # as typed: "123", "discord:123", "<@123>"


@dataclass(frozen=True)
class ModBanCommand:
    """/mod ban <user> [duration] [reason]: duration like 30m, 12h, 7d, 2w, or "forever"."""

    user: str
    duration: timedelta | None = None  # None: moderation.default_ban_hours
    forever: bool = False
    reason: str = ""


@dataclass(frozen=True)
class ModUnbanCommand:
    """/mod unban <user>."""

    user: str


@dataclass(frozen=True)
class ModQuotaCommand:
    """/mod quota <user> [tier NAME | grant UNITS]: show a user's quota, set their tier, or give extra
    units for today."""

    user: str
    tier: str | None = None
    grant_units: float | None = None


@dataclass(frozen=True)
class ModAppealsCommand:
    """/mod appeals: the open appeals, oldest first."""


@dataclass(frozen=True)
class ModResolveCommand:
    """/mod appeal <id> accept|reject [note]: decide an appeal; accepting voids its strike or lifts the ban."""

    appeal_id: int
    accept: bool
    note: str = ""


@dataclass(frozen=True)
class ModShareCommand:
    """/mod share NAME [USER]: make a trained LoRA usable by everyone on this server (it joins /loras)."""

    name: str
    user: str | None = None  # whose training; default: the only one called NAME


@dataclass(frozen=True)
class ModTrainedCommand:
    """/mod trained [delete NAME [USER]]: list trained LoRAs, or delete one (its file and its record)."""

    delete: str | None = None
    user: str | None = None


ModCommand = (ModFlagsCommand | ModBanCommand | ModUnbanCommand | ModQuotaCommand | ModAppealsCommand
              | ModResolveCommand | ModShareCommand | ModTrainedCommand)
Command = (GenerateCommand | QuotaCommand | JobCommand | JobsCommand | CancelCommand | HelpCommand
           | StylesCommand | ModelsCommand | LorasCommand | AppealCommand | TeachCommand | ModCommand)


@dataclass(frozen=True)
class Requester:
    """Who sent a command, in platform-neutral terms, and where the answer goes.

    `reply_to` is whatever the adapter needs to answer later (a channel and message id, a chat id,
    an interaction token...). It is stored with the job so results can be delivered after a restart.
    """

    platform: str
    user_id: str
    display_name: str = ""
    reply_to: dict[str, Any] = field(default_factory=dict)
    # Where the further jobs of one command answer (a permutation prompt makes several); None: as
    # `reply_to`. E.g. Discord's other jobs post messages of their own instead of editing the first's.
    reply_to_others: dict[str, Any] | None = None
    # What the platform itself says about this user and place; the policy layer decides what it means.
    is_platform_moderator: bool = False  # e.g. Discord "Manage Messages", Telegram chat admin
    nsfw_allowed_here: bool = False  # e.g. a Discord channel marked NSFW, a Telegram chat allowed by config
    # The console's user: the person at the keyboard runs this Easel (quota tier `console.tier`).
    is_local_operator: bool = False
    # A quota tier the surface itself assigns, e.g. `http.a1111_anonymous_tier` for the AUTOMATIC1111
    # API's keyless requests from a trusted LAN. None: the tier comes from the user's role.
    quota_tier: str | None = None


@dataclass(frozen=True)
class InputImages:
    """Validated PNG bytes of the attached image and mask, as the job service stores them."""

    image: bytes | None = None
    mask: bytes | None = None
