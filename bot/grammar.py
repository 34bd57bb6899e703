"""The command grammar every chat adapter shares: slash-command text in, a typed Command out.

Example:

    parser = CommandParser.from_settings(load_settings())
    command = parser.parse("/imagine a castle (-blurry) at night --seed 4 —steps 30")
    # GenerateCommand(params=GenerationParams(kind=JobKind.IMAGINE, prompt="a castle at night",
    #                                         negative="blurry", steps=30, seed=4, ...))

Prompts are free text (apostrophes, unbalanced quotes, prompt weighting like `(red:1.2)`), so the
tokenizer is a plain whitespace split rather than shlex: a word that starts with `--` (or the long dash
a phone turns `--` into) is a flag, everything else is prompt. All checks happen here, once, before
anything is queued; each failure is an InvalidCommand whose one-line message names the flag and what
is allowed.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import TypeVar

from bot.animation import keyframes
from bot.attention import MAX_WEIGHT, MIN_WEIGHT, weighted_groups
from bot.catalog import CatalogModel, ModelCatalog
from bot.config import LimitsConfig, ModelConfig, Settings
from bot.domain import (
    SAMPLERS,
    AppealCommand,
    CancelCommand,
    Command,
    GenerateCommand,
    GenerationParams,
    HelpCommand,
    JobCommand,
    JobKind,
    JobsCommand,
    LorasCommand,
    ModAppealsCommand,
    ModBanCommand,
    ModCommand,
    ModelsCommand,
    ModFlagsCommand,
    ModQuotaCommand,
    ModResolveCommand,
    ModShareCommand,
    ModTrainedCommand,
    ModUnbanCommand,
    Motion,
    OutpaintMargins,
    QuotaCommand,
    StylesCommand,
    TeachCommand,
)
from bot.errors import ConfigError, InvalidCommand
from bot.extra_networks import ExtraNetworks, has_lora_tag, parse_lora_specs, take_lora_tags
from bot.permutations import check_permutations, expand_permutations
from bot.styles import StyleBook

COMMANDS: tuple[str, ...] = ("imagine", "edit", "inpaint", "outpaint", "animate", "quota", "job", "jobs", "cancel",
                             "help", "styles", "models", "loras", "teach", "appeal", "mod")
MOD_COMMANDS: tuple[str, ...] = ("flags", "ban", "unban", "quota", "appeals", "appeal", "share", "trained")
TEACH_FLAGS: tuple[str, ...] = ("kind", "steps", "rank", "trigger", "model")
FLAGS: tuple[str, ...] = ("no", "seed", "steps", "cfg", "ar", "size", "n", "sampler", "model", "strength", "style",
                          "lora")
REPEATABLE_FLAGS: tuple[str, ...] = ("style", "lora")  # each use adds one: --style a --style b
# Flags of one command each: /outpaint's canvas (bot/outpaint.py), /animate's clip and camera
# (bot/animation.py). The other commands refuse them.
OUTPAINT_FLAGS: tuple[str, ...] = ("zoom", "left", "right", "up", "down")
ANIMATE_FLAGS: tuple[str, ...] = ("frames", "fps", "zoom", "pan", "rotate")
KIND_FLAGS: dict[JobKind, tuple[str, ...]] = {JobKind.OUTPAINT: OUTPAINT_FLAGS, JobKind.ANIMATE: ANIMATE_FLAGS}
EXTRA_FLAGS: tuple[str, ...] = tuple(dict.fromkeys(OUTPAINT_FLAGS + ANIMATE_FLAGS))
MIN_ZOOM, MAX_ZOOM = 1.1, 4.0  # /outpaint --zoom: the canvas grows from 1.1 to 4 times the picture, each way
# /animate's camera, per frame: --zoom scales (above 1 moves in), --pan DX,DY moves (pixels), --rotate turns.
MIN_FRAME_ZOOM, MAX_FRAME_ZOOM = 0.8, 1.25
MAX_PAN = 64
MAX_ROTATE = 15.0
_PAN = re.compile(r"(-?\d+(?:\.\d+)?),(-?\d+(?:\.\d+)?)")
GENERATION_KINDS = (JobKind.IMAGINE, JobKind.EDIT, JobKind.INPAINT, JobKind.OUTPAINT, JobKind.ANIMATE)
MAX_SEED = 2**32 - 1
MAX_ASPECT = 4.0  # --ar may range from 1:4 to 4:1
_Default = TypeVar("_Default", int, float, None)

# `--seed`, and `—seed` / `–seed` as iOS and Android autocorrect it; a letter must follow, so that a
# dash used as punctuation ("a cat — sleeping", "1990–2000") stays prompt text.
_FLAG = re.compile(r"(?:--|[—–])-*(?P<name>[^\W\d_][^=]*)(?:=(?P<value>.*))?")
# `(-bad hands -extra fingers)`: a negative group, as users already write them inside the prompt. Its
# items may carry AUTOMATIC1111 weights, `(-(bad hands:1.3) -blur)`; `\(-x\)` is literal text.
_NEGATIVE_GROUP = re.compile(r"(?<!\\)\(\s*[-—–](?:[^()]|\([^()]*\))*\)")
_NEGATIVE_ITEM_START = re.compile(r"(?:^|\s)[-—–]+\s*")
_SIZE = re.compile(r"(\d+)[xX×](\d+)")
_ASPECT = re.compile(r"(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)")
# `{https://cdn.example/cat.png}`: a reference image by link, the way users already share them.
_LINK = re.compile(r"\{\s*(https?://[^\s{}]+)\s*\}", re.IGNORECASE)
_DURATION = re.compile(r"([0-9]{1,12})(m|min|h|d|w)", re.IGNORECASE)
_DURATION_UNITS = {"m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# How /help writes the commands that take pictures where they come as attachments (Discord, Telegram).
ATTACHMENT_FORMS = {
    "edit": "/edit <prompt> [flags]  redraw an attached picture guided by the prompt",
    "inpaint": "/inpaint <prompt> [flags]  repaint the white parts of a mask (attach a picture and a mask)",
    "outpaint": "/outpaint [prompt] --zoom X | --left/--right/--up/--down N  paint more around an attached "
                "picture",
    "animate": "/animate <prompt> [--frames N --fps N --zoom X --pan DX,DY --rotate DEG]  an MP4 whose frames "
               "each move and redraw the last (attach a picture to start from it)",
    "edit example": "/edit the same street in winter --strength 0.6   (attach a picture)",
}


# Prompts to suggest, by model source. builtin:shapes knows only the words of its captions (see
# generation/shapes.py; these three are training combinations, so it draws them right); builtin:tiny
# draws noise whatever it is told, and real weights take any prompt.
SHAPES_EXAMPLES = ("a red circle on a blue background", "a white square on a green background",
                   "a yellow triangle on a black background")
GENERAL_EXAMPLES = ("a lighthouse at dusk, oil painting", "a red fox in the snow", "a bowl of ramen, studio photo")


def example_prompts(source: str) -> list[str]:
    """Prompts a model of this source draws what they say (for builtin:tiny, none does)."""
    return list(SHAPES_EXAMPLES if source == "builtin:shapes" else GENERAL_EXAMPLES)


class CommandParser:
    """Turns the text of a slash command into a Command, enforcing the configured limits."""

    def __init__(
        self,
        limits: LimitsConfig,
        models: Mapping[str, ModelConfig],
        default_model: str,
        default_sampler: str,
        styles: StyleBook | None = None,
        catalog: ModelCatalog | None = None,
        networks: ExtraNetworks | None = None,
    ) -> None:
        """`models` are the [models.*] tables; `catalog` adds the checkpoints folder's (bot/catalog.py)."""
        self.limits = limits
        self.default_model = default_model
        self.default_sampler = default_sampler.lower()
        self.styles = styles or StyleBook(None)
        _check_configuration(limits, models, default_model, self.default_sampler)
        self.catalog = catalog or ModelCatalog(models, limits=limits, default_sampler=self.default_sampler,
                                               default_model=default_model)
        self.styles.check()
        self.networks = networks or ExtraNetworks(None, None)  # the installed LoRAs and embeddings

    @classmethod
    def from_settings(cls, settings: Settings) -> CommandParser:
        return cls(settings.limits, settings.models, settings.generation.default_model,
                   settings.generation.default_sampler, StyleBook(settings.storage.styles_path),
                   ModelCatalog.from_settings(settings), ExtraNetworks.from_settings(settings))

    def parse(self, text: str) -> Command:
        """Parse a whole command, e.g. `/imagine a cat --seed 4`, `/job 12`, `/cancel`, `/help`."""
        name, _bot, rest = split_command(text)
        if name in GENERATION_KINDS:
            return self.parse_generation(JobKind(name), rest)
        args = rest.split()
        if name == "quota":
            return self._quota(rest)
        if name == "teach":
            return parse_teach(rest)
        if name == "appeal":
            return _appeal(rest)
        if name == "mod":
            return _mod(args, rest)
        if name == "job":
            if len(args) != 1:
                raise InvalidCommand("/job needs exactly one job id, e.g. /job 42 (the id is in the reply "
                                     "to your /imagine)")
            return JobCommand(job_id=args[0])
        if name == "jobs":
            if args:
                raise InvalidCommand("/jobs takes nothing after it; /job <id> shows one job")
            return JobsCommand()
        if name == "cancel":
            if len(args) > 1:
                raise InvalidCommand("/cancel takes one job id, or none to cancel your newest job")
            return CancelCommand(job_id=args[0] if args else None)
        if name == "help":
            return HelpCommand()
        if name == "styles":
            if args:
                raise InvalidCommand("/styles takes nothing after it; use a style with --style NAME")
            return StylesCommand()
        if name == "models":
            if args:
                raise InvalidCommand("/models takes nothing after it; pick a model with --model NAME")
            return ModelsCommand()
        if name == "loras":
            if args:
                raise InvalidCommand("/loras takes nothing after it; use a LoRA with <lora:NAME:WEIGHT> in the prompt")
            return LorasCommand()
        raise InvalidCommand(f"unknown command /{_shown(name)}{_did_you_mean(name, COMMANDS, '/')}; "
                             f"the commands are {_listed(COMMANDS, '/')}")

    def parse_generation(self, kind: JobKind, text: str) -> GenerateCommand:
        """Parse the prompt and flags of /imagine, /edit, /inpaint or /outpaint (the text after the command
        name)."""
        kind = JobKind(kind)
        # 1. Take out reference links, then split the words into prompt text and flag values.
        text, links = _take_links(kind, text)
        prompt_words, flags, repeated = _read_flags(text.split())
        no, styles = flags.pop("no", None), repeated.get("style", [])
        flags.pop("style", None)
        loras = repeated.get("lora", [])
        flags.pop("lora", None)
        # 2. One prompt per combination of its `{red, green}` options (counted before they are made).
        check_permutations(" ".join(prompt_words), self.limits.max_permutations)
        commands = []
        for combination in expand_permutations(" ".join(prompt_words)):
            # 3. Take the inline negative groups, `(-bad hands -blur)`, out of the prompt.
            prompt, negatives = _take_negative_groups(combination)
            if no is not None:
                negatives.append(no)
            # 4. Check the text, then each flag against the limits.
            commands.append(self.generation(kind, prompt, ", ".join(negatives), flags, links, styles, loras))
        first, *others = commands
        return replace(first, permutations=tuple(command.params for command in others))

    def generation(self, kind: JobKind, prompt: str, negative: str, flags: Mapping[str, str],
                   reference_urls: tuple[str, ...] = (), styles: Sequence[str] = (),
                   loras: Sequence[str] = ()) -> GenerateCommand:
        """A generation command from a prompt, a negative prompt and flag values already taken apart (an
        API's JSON fields), checked as typed flags are: `flags` maps flag names (FLAGS, without "no" and
        "style") to their text, e.g. `{"steps": "30", "size": "512x768"}`. Errors name the chat's flags
        (--steps). `styles` are styles.csv names, merged into the prompt and negative in order (bot/styles.py).
        `loras` are `--lora` values, "NAME:WEIGHT"; `<lora:NAME:WEIGHT>` tags in the prompt count too."""
        kind = JobKind(kind)
        unknown = set(flags) - (set(FLAGS) - {"no", "style", "lora"}) - set(EXTRA_FLAGS)
        if unknown:
            raise ValueError(f"not flags of a generation command: {', '.join(sorted(unknown))}")
        limits = self.limits
        _check_kind_flags(kind, flags)
        outpaint = _outpaint_margins(flags, limits) if kind is JobKind.OUTPAINT else None
        motion = self._motion(flags, prompt) if kind is JobKind.ANIMATE else None
        if kind is JobKind.OUTPAINT and not prompt:
            # The job service takes the prompt of the Easel job that made the picture (or says to give one).
            if styles or loras:
                raise InvalidCommand("--style and --lora need a prompt to work on: write one, e.g. /outpaint a "
                                     "forest at dusk --zoom 2 --style NAME")
        else:
            self._check_text(kind, prompt, negative)
        model = self._model(flags.get("model"))
        negative = negative or model.negative  # the model's default, unless the user gave a negative
        prompt, negative = self.styles.apply(list(styles), prompt, negative)
        prompt, chosen_loras = self._loras(kind, prompt, negative, loras, model)
        _check_weights(prompt, negative)
        if "strength" in flags and kind is JobKind.IMAGINE:
            raise InvalidCommand("--strength is for /edit and /inpaint (how much of the attached image to "
                                 "repaint); /imagine starts from noise, so leave it out")
        if kind is JobKind.OUTPAINT and ("size" in flags or "ar" in flags):
            raise InvalidCommand("/outpaint's size is the picture's plus what --zoom or --left/--right/--up/--down "
                                 "add; leave out --size and --ar")
        if kind is JobKind.ANIMATE and "n" in flags:
            raise InvalidCommand("/animate makes one clip; leave out --n (--frames sets how many pictures it has)")
        width, height = self._size(flags, model)
        if kind is JobKind.ANIMATE and width * height > limits.max_animation_pixels:
            raise InvalidCommand(f"/animate frames may have at most {limits.max_animation_pixels} pixels "
                                 f"(limits.max_animation_pixels; got {width}x{height}); use a smaller --size")
        default_strength = {JobKind.IMAGINE: None, JobKind.OUTPAINT: limits.default_outpaint_strength,
                            JobKind.ANIMATE: limits.default_animate_strength}.get(kind, limits.default_strength)
        params = GenerationParams(
            kind=kind,
            prompt=prompt,
            negative=negative,
            width=width,
            height=height,
            steps=_whole_number(flags, "steps", limits.min_steps, limits.max_steps, model.steps),
            cfg=_number(flags, "cfg", limits.min_cfg, limits.max_cfg, model.cfg),
            n=_whole_number(flags, "n", 1, limits.max_n, limits.default_n),
            sampler=self._sampler(flags.get("sampler"), model.sampler),
            model=model.name,
            seed=_whole_number(flags, "seed", 0, MAX_SEED, None),
            strength=_number(flags, "strength", limits.min_strength, limits.max_strength, default_strength),
            loras=chosen_loras,
            motion=motion,
        )
        if params.strength is not None and int(params.steps * params.strength) < 1:
            # img2img runs steps x strength denoising steps; zero would return the input untouched.
            fewest = math.ceil(1 / params.strength)
            raise InvalidCommand(f"--steps {params.steps} with --strength {_num(params.strength)} runs no "
                                 f"denoising step; use --steps {fewest} or more, or a higher --strength")
        size_given = "size" in flags or "ar" in flags
        return GenerateCommand(params=params, size_from_input=kind is not JobKind.IMAGINE and not size_given,
                               reference_urls=reference_urls, outpaint=outpaint)

    def _motion(self, flags: Mapping[str, str], prompt: str) -> Motion:
        """/animate's --frames, --fps and camera, checked with its keyframes: each within the clip."""
        limits = self.limits
        frames = _whole_number(flags, "frames", 2, limits.max_frames, limits.default_frames)
        motion = Motion(frames=frames, fps=_whole_number(flags, "fps", 1, limits.max_fps, limits.default_fps),
                        zoom=_number(flags, "zoom", MIN_FRAME_ZOOM, MAX_FRAME_ZOOM, 1.0),
                        pan=_pan(flags.get("pan")),
                        rotate=_number(flags, "rotate", -MAX_ROTATE, MAX_ROTATE, 0.0))
        last = keyframes(prompt)[-1][0]
        if last >= frames:
            raise InvalidCommand(f"keyframe {last} is past the clip's last frame, {frames - 1} (--frames {frames}); "
                                 f"use --frames {last + 1} or more")
        return motion

    def example_prompts(self) -> list[str]:
        """Prompts the default model draws what they say: /help's examples and the web chat's suggestions."""
        return example_prompts(self.catalog.default.source)

    def help_text(self, forms: Mapping[str, str] | None = None) -> str:
        """The /help answer: every command and flag, with the allowed ranges and a few examples.

        `forms` replaces the lines of the commands that take pictures, for a platform that takes them
        otherwise than as attachments (keys "edit", "inpaint", "outpaint", "animate" and "edit example", as in
        ATTACHMENT_FORMS), e.g. the console's file names before the prompt.
        """
        limits = self.limits
        model = self.catalog.default
        models = ", ".join(m.name for m in self.catalog.list() if m.usable)
        form = {**ATTACHMENT_FORMS, **(forms or {})}
        examples = self.example_prompts()
        fitted = "x".join(map(str, fit_size(512, 384, model.width * model.height, limits)))
        return "\n".join([
            "Commands:",
            "  /imagine <prompt> [flags]  make images from text",
            f"  {form['edit']}",
            f"  {form['inpaint']}",
            f"  {form['outpaint']}",
            f"  {form['animate']}",
            "  /edit and /inpaint results keep the picture's shape at the model's pixel count (512x384 in "
            f"gives {fitted} on {self.default_model}); --size or --ar set another",
            "  /quota [command]  quota units left, when they reset, and what a command costs "
            "(e.g. /quota /imagine a cat --n 4)",
            "  /job <id>  a job's settings, seeds and status",
            "  /jobs  your recent jobs, newest first",
            "  /cancel [id]  cancel a job; without an id, your newest unfinished one",
            "  /help  this message",
            "  /styles  the styles --style NAME applies",
            "  /models  the models, each with its family, size, default settings and what it is for",
            "  /loras  the installed LoRAs and embeddings, and what each is for",
            "  /teach NAME [--kind lora|embedding] [--steps N] [--rank R] [--trigger WORD] [caption]  teach a new "
            "word from 3 or more of your pictures, sent together; then NAME in your prompts calls it (a LoRA learns "
            "new looks; an embedding, a few KB, only a new word for what the model already draws)",
            "  /appeal <job id | fNN | ban> <why>  ask a moderator to review a withheld image, a refused "
            "prompt (fNN is in the refusal) or a ban",
            "  /mod flags|ban|unban|quota|appeals|appeal|share|trained ...  moderators only (/mod alone explains)",
            "Reference images: /edit {https://cdn.discordapp.com/...} <prompt> fetches the linked picture "
            "(platform image links only)",
            "Prompt syntax (as in AUTOMATIC1111): (word) or (word:1.3) weighs a word more, [word] less, "
            f"from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}; \\( is a bracket; long prompts are read whole, 75 tokens "
            "at a time",
            f"Permutations: a {{red, green}} circle makes one job per option, each with its own seed (at most "
            f"{limits.max_permutations} jobs)",
            f"Flags (put them after the prompt; --flag=value works too; defaults are for {model.name}, "
            "/models has each model's):",
            "  --no <words>  what to keep out of the image, up to the next flag; or write "
            "(-bad hands -blur) inside the prompt",
            f"  --seed N  0 to {MAX_SEED} (default: random); the same seed and settings repeat a picture",
            f"  --steps N  {limits.min_steps} to {limits.max_steps} (default {model.steps}); "
            "more is slower and finer",
            f"  --cfg X  {_num(limits.min_cfg)} to {_num(limits.max_cfg)} "
            f"(default {_num(model.cfg)}); higher follows the prompt more closely",
            f"  --ar W:H  aspect ratio from 1:{MAX_ASPECT:g} to {MAX_ASPECT:g}:1, e.g. 16:9 "
            f"(about {model.width * model.height} pixels)",
            f"  --size WxH  multiples of 8, each side {limits.min_side} to {limits.max_side}, at most "
            f"{limits.max_pixels} pixels (default {model.width}x{model.height}); "
            "not with --ar",
            f"  --n N  images, 1 to {limits.max_n} (default {limits.default_n})",
            f"  --sampler NAME  {', '.join(SAMPLERS)} (default {model.sampler})",
            f"  --model NAME  {models} (default {self.default_model}; /models describes them)",
            f"  --strength X  /edit and /inpaint only: {_num(limits.min_strength)} to "
            f"{_num(limits.max_strength)} (default {_num(limits.default_strength)}, /outpaint "
            f"{_num(limits.default_outpaint_strength)}); higher changes more",
            f"  --zoom X  /outpaint only: the canvas grows {_num(MIN_ZOOM)} to {_num(MAX_ZOOM)} times each way, the "
            "picture in the middle (shrunk to fit the size limits)",
            "  --left N, --right N, --up N, --down N  /outpaint only: pixels to add on that side, multiples of 8; "
            "without a prompt, /outpaint uses the prompt of the Easel job that made the picture",
            f"  --frames N, --fps N  /animate only: 2 to {limits.max_frames} frames (default {limits.default_frames}), "
            f"1 to {limits.max_fps} a second (default {limits.default_fps}); --strength (default "
            f"{_num(limits.default_animate_strength)}) is how much each frame redraws the last",
            f"  --zoom X, --pan DX,DY, --rotate DEG  /animate's camera, per frame: zoom {_num(MIN_FRAME_ZOOM)} to "
            f"{_num(MAX_FRAME_ZOOM)} (above 1 moves in), pan up to {MAX_PAN} pixels each way, rotate up to "
            f"{_num(MAX_ROTATE)} degrees; keyframes change the prompt: 0: a forest | 12: a city",
            "  --style NAME  put the prompt into a style from /styles; repeat it for several",
            f"  --lora NAME:W  a LoRA from /loras at weight W (default 1, {_num(-limits.max_lora_weight)} to "
            f"{_num(limits.max_lora_weight)}); or write <lora:NAME:W> in the prompt; up to {limits.max_loras}",
            "Embeddings from /loras are words: write the name in the prompt or after --no",
            "Examples:",
            f"  /imagine {examples[0]} --ar 16:9 --seed 42",
            f"  /imagine {examples[1]} (-blurry -text) --steps 30 --n 2",
            f"  {form['edit example']}",
        ])

    def _loras(self, kind: JobKind, prompt: str, negative: str, flagged: Sequence[str],
               model: CatalogModel) -> tuple[str, tuple[tuple[str, float], ...]]:
        """Take `<lora:NAME:WEIGHT>` tags out of the prompt and check them with the `--lora` values:
        the prompt without its tags, and the (name, weight) pairs sorted by name. A LoRA whose file says
        it is for another family than the model's is refused here; the worker checks the rest (a
        model's exact text width is known once it is loaded)."""
        prompt, tagged = take_lora_tags(prompt)
        if has_lora_tag(negative):
            raise InvalidCommand("<lora:NAME:WEIGHT> tags go in the prompt, not in the negative prompt")
        if not prompt and tagged:
            raise InvalidCommand(f"/{kind} needs a prompt besides its <lora:...> tags, e.g. /{kind} a ring "
                                 "<lora:ring:0.8>")
        limits = self.limits
        chosen = parse_lora_specs([*tagged, *flagged], self.networks, limits.max_loras, limits.max_lora_weight)
        for name, _ in chosen:
            family = self.networks.lora_family(self.networks.lora(name))
            if family is not None and model.family is not None and family != model.family.label:
                raise InvalidCommand(f"LoRA {name!r} is for {family} models, and model {model.name!r} is an "
                                     f"{model.family.label} model; use a LoRA made for {model.name} (/loras says "
                                     "what each is for)")
        return prompt, chosen

    def _quota(self, rest: str) -> QuotaCommand:
        """/quota, or /quota /imagine a cat --n 4 to price that command."""
        if not rest:
            return QuotaCommand()
        name, _bot, command_text = split_command(rest if rest.startswith("/") else "/" + rest)
        if name == "teach":
            return QuotaCommand(teach=parse_teach(command_text))
        if name not in GENERATION_KINDS:
            raise InvalidCommand("/quota takes nothing, or a command to price, e.g. /quota /imagine a cat --n 4 "
                                 f"(got {_shown(rest)})")
        return QuotaCommand(command=self.parse_generation(JobKind(name), command_text))

    # -- checks, one concern each ------------------------------------------------------------------

    def _check_text(self, kind: JobKind, prompt: str, negative: str) -> None:
        limit = self.limits.max_prompt_chars
        if not prompt:
            raise InvalidCommand(f"/{kind} needs a prompt describing the picture, e.g. /{kind} "
                                 f"{self.example_prompts()[0]}")
        if len(prompt) > limit:
            raise InvalidCommand(f"the prompt is {len(prompt)} characters; the limit is {limit}")
        if len(negative) > limit:
            raise InvalidCommand(f"the negative prompt (--no and (-...) groups) is {len(negative)} "
                                 f"characters; the limit is {limit}")

    def _model(self, value: str | None) -> CatalogModel:
        """The model a job runs on, with its defaults; a checkpoint new in the folder is found too."""
        requested = value if value is not None else self.default_model
        model = self.catalog.get(requested)
        if model is None:
            names = {m.name.lower(): m.name for m in self.catalog.list() if m.usable}
            close = difflib.get_close_matches(requested.lower(), list(names), n=1)
            raise InvalidCommand(f"--model must be one of {', '.join(names.values())}; got {_shown(requested)}"
                                 f"{f' (did you mean {names[close[0]]}?)' if close else ''} (/models lists them)")
        if model.problem is not None:
            raise InvalidCommand(f"model {model.name} cannot be used: {model.problem}")
        return model

    def _sampler(self, value: str | None, default: str) -> str:
        if value is None:
            return default
        if value.lower() not in SAMPLERS:
            raise InvalidCommand(f"--sampler must be one of {', '.join(SAMPLERS)}; "
                                 f"got {_shown(value)}{_did_you_mean(value.lower(), SAMPLERS)}")
        return value.lower()

    def _size(self, flags: Mapping[str, str], model: CatalogModel) -> tuple[int, int]:
        if "size" in flags and "ar" in flags:
            raise InvalidCommand("give --ar or --size, not both: --ar picks the shape at the model's usual "
                                 "size, --size sets exact pixels")
        if "size" in flags:
            return self._exact_size(flags["size"])
        if "ar" in flags:
            aspect_w, aspect_h = _aspect(flags["ar"])
            return fit_size(aspect_w, aspect_h, model.width * model.height, self.limits)
        return model.width, model.height

    def _exact_size(self, value: str) -> tuple[int, int]:
        limits = self.limits
        match = _SIZE.fullmatch(value)
        if match is None:
            raise InvalidCommand(f"--size must be WIDTHxHEIGHT in pixels, e.g. --size 512x768 "
                                 f"(got {_shown(value)})")
        width, height = int(match[1]), int(match[2])
        # The range first: the multiple-of-8 hint below must not suggest a size that is out of range.
        if not (limits.min_side <= width <= limits.max_side and limits.min_side <= height <= limits.max_side):
            raise InvalidCommand(f"--size sides must each be from {limits.min_side} to {limits.max_side} "
                                 f"(got {width}x{height})")
        if width % 8 or height % 8:
            raise InvalidCommand(f"--size sides must be multiples of 8 (got {width}x{height}); "
                                 f"try {_round8(width)}x{_round8(height)}")
        if width * height > limits.max_pixels:
            raise InvalidCommand(f"--size may have at most {limits.max_pixels} pixels (got {width}x{height} "
                                 f"= {width * height}); use a smaller size or --ar")
        return width, height


def split_command(text: str) -> tuple[str, str | None, str]:
    """Split `/imagine@easelbot a cat` into ("imagine", "easelbot", "a cat").

    The command name is lower-cased; the bot name is returned as typed (None when absent) so the
    Telegram adapter can ignore commands addressed to other bots.
    """
    head, *rest = text.split(maxsplit=1) or [""]  # split() also takes a newline after the name
    if not head.startswith("/"):
        raise InvalidCommand(f"commands start with a slash: {_listed(COMMANDS, '/')}")
    name, at, bot = head[1:].partition("@")
    return name.lower(), (bot or None) if at else None, rest[0].strip() if rest else ""


def flags_in(text: str) -> set[str]:
    """The names of the flags written in `text` (`{"seed", "steps"}` for "a fox --seed 4 --steps 30"), for
    an adapter that adds its own client's fields as flags only where the person wrote none: the
    flags they typed win. Raises InvalidCommand for a malformed flag, as parsing would."""
    return set(_read_flags(text.split())[1])


def fit_size(aspect_w: float, aspect_h: float, area: int, limits: LimitsConfig) -> tuple[int, int]:
    """Width/height with the given aspect ratio and about `area` pixels, multiples of 8, within
    min_side/max_side/max_pixels.

    Where the limits cannot hold the ratio (a very long strip), the sides are clamped and the shape
    gives way. `fit_size(16, 9, 512 * 512, LimitsConfig())` is `(680, 384)`.
    """
    if not (aspect_w > 0 and aspect_h > 0 and area > 0):
        raise ValueError(f"fit_size needs a positive aspect and area (got {aspect_w}:{aspect_h}, {area})")
    low, high = _side_range(limits)
    ratio = aspect_w / aspect_h
    area = min(area, limits.max_pixels)
    width, height = math.sqrt(area * ratio), math.sqrt(area / ratio)
    scale = min(1.0, high / max(width, height))  # shrink to fit the longest side...
    scale = max(scale, low / min(width, height))  # ...but never below the shortest allowed side
    width = min(max(_round8(width * scale), low), high)
    height = min(max(_round8(height * scale), low), high)
    while width * height > limits.max_pixels and max(width, height) > low:  # rounding may overshoot
        if width >= height:
            width -= 8
        else:
            height -= 8
    return width, height


# -- tokenizing -------------------------------------------------------------------------------------


def _read_flags(words: list[str]) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """Separate prompt words from flags. `--no` takes the words up to the next flag; the rest one word.

    Returns the prompt words, each flag's value, and every value of each REPEATABLE_FLAGS flag in order.
    """
    prompt: list[str] = []
    flags: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
    position = 0
    while position < len(words):
        word = words[position]
        position += 1
        flag = _flag(word)
        if flag is None:
            prompt.append(word)
            continue
        name, inline_value = flag
        if name in flags and name not in REPEATABLE_FLAGS:
            raise InvalidCommand(f"--{name} was given twice; give it once")
        taken = _value_words(name, inline_value, words[position:])
        position += len(taken)
        value = " ".join(part for part in (inline_value, *taken) if part)
        if not value:
            raise InvalidCommand(f"--{name} needs a value after it, e.g. {_EXAMPLES[name]}")
        flags[name] = value
        repeated.setdefault(name, []).append(value)
    return prompt, flags, repeated


def _flag(word: str) -> tuple[str, str | None] | None:
    """(name, value after `=` or None) when `word` is a known flag, None when it is prompt text."""
    match = _FLAG.fullmatch(word)
    if match is None:
        if word.startswith("-") and word[1:].lower() in FLAGS:
            raise InvalidCommand(f"flags start with two dashes: write -{word} (got {word})")
        return None
    name = match["name"].lower()
    if name not in FLAGS and name not in EXTRA_FLAGS:
        raise InvalidCommand(f"unknown flag --{_shown(name)}{_did_you_mean(name, FLAGS + EXTRA_FLAGS, '--')}; "
                             f"the flags are {_listed(FLAGS, '--')}")
    return name, match["value"]


def _value_words(name: str, inline_value: str | None, following: list[str]) -> list[str]:
    """The words after a flag that belong to its value."""
    if name == "no":
        taken: list[str] = []
        for word in following:
            if _flag(word) is not None:
                break
            taken.append(word)
        return taken
    if inline_value is not None or not following or _flag(following[0]) is not None:
        return []
    return following[:1]


def _take_negative_groups(prompt: str) -> tuple[str, list[str]]:
    """Take `(-bad hands -extra fingers)` groups out of the prompt: ("a castle", ["bad hands", ...])."""
    negatives: list[str] = []
    for group in _NEGATIVE_GROUP.findall(prompt):
        items = (item.strip(" ,") for item in _NEGATIVE_ITEM_START.split(group[1:-1].strip()))
        negatives.extend(item for item in items if item)
    return " ".join(_NEGATIVE_GROUP.sub(" ", prompt).split()), negatives


def _check_weights(prompt: str, negative: str) -> None:
    """AUTOMATIC1111 weights, `(red:1.3)`, within the range that still draws something."""
    for which, text in (("prompt", prompt), ("negative prompt", negative)):
        for group in weighted_groups(text):
            if not MIN_WEIGHT <= group.weight <= MAX_WEIGHT:
                words = _shown(group.text, 30)
                raise InvalidCommand(f"the weight in ({words}:{group.weight:g}) in the {which} must be from "
                                     f"{MIN_WEIGHT:g} to {MAX_WEIGHT:g}, e.g. ({words}:1.3)")


def _take_links(kind: JobKind, text: str) -> tuple[str, tuple[str, ...]]:
    """Take `{https://...}` links out of the prompt: the image (and, for /inpaint, the mask) to fetch."""
    links = tuple(_LINK.findall(text))
    if not links:
        return text, ()
    if kind is JobKind.IMAGINE:
        raise InvalidCommand("/imagine starts from noise; to start from a linked picture use /edit "
                             "{https://...} <prompt>")
    most = 2 if kind is JobKind.INPAINT else 1  # /outpaint makes its own mask
    if len(links) > most:
        raise InvalidCommand(f"/{kind.value} takes at most {most} image link{'s' if most > 1 else ''} "
                             f"({'the image, then the mask' if most > 1 else 'the image'}); got {len(links)}")
    return _LINK.sub(" ", text), links


# -- /appeal and /mod -------------------------------------------------------------------------------

_MOD_USAGE = ("moderator commands: /mod flags [user], /mod ban <user> [30m|12h|7d|2w|forever] [reason], "
              "/mod unban <user>, /mod quota <user> [tier NAME | grant UNITS], /mod appeals, "
              "/mod appeal <id> accept|reject [note], /mod share NAME [user], /mod trained [delete NAME [user]]")


def parse_teach(rest: str) -> TeachCommand:
    """`/teach NAME [--kind lora|embedding] [--steps N] [--rank R] [--trigger WORD] [--model M] [caption...]`: the
    words that are not flags are the caption shared by the pictures without their own. The values'
    ranges are the [teach] settings, checked by bot/teach.py for every platform alike."""
    words = rest.split()
    if not words or words[0].startswith("-"):
        raise InvalidCommand("/teach needs a name first, e.g. /teach mascot --steps 300, with 3 or more pictures "
                             "attached")
    name, values, caption = words[0], {}, []
    position = 1
    while position < len(words):
        word = words[position]
        position += 1
        if not word.startswith("--"):
            caption.append(word)
            continue
        flag, _, value = word[2:].partition("=")
        flag = flag.lower()
        if flag not in TEACH_FLAGS:
            raise InvalidCommand(f"unknown flag --{_shown(flag)}{_did_you_mean(flag, TEACH_FLAGS, '--')}; /teach "
                                 f"takes {_listed(TEACH_FLAGS, '--')}")
        if flag in values:
            raise InvalidCommand(f"--{flag} was given twice; give it once")
        if not value and position < len(words) and not words[position].startswith("--"):
            value, position = words[position], position + 1
        if not value:
            raise InvalidCommand(f"--{flag} needs a value after it, e.g. /teach mascot --{flag} "
                                 + {"kind": "lora", "steps": "300", "rank": "4", "trigger": "mascot",
                                    "model": "shapes"}[flag])
        values[flag] = value
    numbers = {}
    for flag in ("steps", "rank"):
        if flag in values:
            if not values[flag].isdecimal() or len(values[flag]) > 9:
                raise InvalidCommand(f"--{flag} takes a whole number (got {_shown(values[flag])})")
            numbers[flag] = int(values[flag])
    return TeachCommand(name=name, kind=values.get("kind", "lora").lower(), steps=numbers.get("steps"),
                        rank=numbers.get("rank"), trigger=values.get("trigger"), model=values.get("model"),
                        caption=" ".join(caption))


def _appeal(rest: str) -> AppealCommand:
    subject, _, text = rest.partition(" ")
    text = " ".join(text.split())
    if not subject or not text:
        raise InvalidCommand("/appeal needs what you appeal and why, e.g. /appeal k7mq2x9a it is a statue, "
                             "/appeal f12 it was about a baking recipe, or /appeal ban <why>")
    if len(text) > 1000:
        raise InvalidCommand(f"an appeal may have at most 1000 characters (got {len(text)})")
    return AppealCommand(subject=subject.lower(), text=text)


def _mod(args: list[str], rest: str) -> ModCommand:
    if not args:
        raise InvalidCommand(_MOD_USAGE)
    sub, words = args[0].lower(), args[1:]
    if sub == "flags":
        if len(words) > 1:
            raise InvalidCommand("/mod flags takes at most one user, e.g. /mod flags discord:1234")
        return ModFlagsCommand(user=words[0] if words else None)
    if sub == "appeals":
        if words:
            raise InvalidCommand("/mod appeals takes nothing after it; /mod appeal <id> accept|reject decides one")
        return ModAppealsCommand()
    if sub == "appeal":
        number = words[0].lstrip("#") if words else ""
        if len(words) < 2 or not (number.isdecimal() and len(number) <= 9) or \
                words[1].lower() not in ("accept", "reject"):
            raise InvalidCommand("usage: /mod appeal <id> accept|reject [note], e.g. /mod appeal 4 accept a statue")
        return ModResolveCommand(int(number), words[1].lower() == "accept", " ".join(words[2:]))
    if sub == "share":
        if not 1 <= len(words) <= 2:
            raise InvalidCommand("usage: /mod share NAME [user], e.g. /mod share mascot")
        return ModShareCommand(words[0], words[1] if len(words) > 1 else None)
    if sub == "trained":
        if not words:
            return ModTrainedCommand()
        if words[0].lower() != "delete" or not 2 <= len(words) <= 3:
            raise InvalidCommand("usage: /mod trained, or /mod trained delete NAME [user]")
        return ModTrainedCommand(delete=words[1], user=words[2] if len(words) > 2 else None)
    if sub not in MOD_COMMANDS:
        raise InvalidCommand(f"unknown /mod command {_shown(sub)}{_did_you_mean(sub, MOD_COMMANDS)}; {_MOD_USAGE}")
    if not words:
        raise InvalidCommand(f"/mod {sub} needs a user, e.g. /mod {sub} discord:1234")
    user, words = words[0], words[1:]
    if sub == "unban":
        if words:
            raise InvalidCommand("/mod unban takes only the user")
        return ModUnbanCommand(user)
    if sub == "ban":
        return _mod_ban(user, words)
    return _mod_quota(user, words)


def _mod_ban(user: str, words: list[str]) -> ModBanCommand:
    if words and words[0].lower() in ("forever", "permanent", "perm"):
        return ModBanCommand(user, forever=True, reason=" ".join(words[1:]))
    if words and (match := _DURATION.fullmatch(words[0])):
        amount = int(match[1])
        if amount < 1:
            raise InvalidCommand("a ban lasts at least 1 minute, e.g. 30m, 12h, 7d, 2w or forever")
        try:
            duration = timedelta(**{_DURATION_UNITS[match[2].lower()]: amount})
        except OverflowError:
            raise InvalidCommand(f"ban duration {_shown(words[0])} is too long; use forever") from None
        if duration > timedelta(days=3650):
            raise InvalidCommand(f"ban duration {_shown(words[0])} is over ten years; use forever")
        return ModBanCommand(user, duration=duration, reason=" ".join(words[1:]))
    return ModBanCommand(user, reason=" ".join(words))


def _mod_quota(user: str, words: list[str]) -> ModQuotaCommand:
    if not words:
        return ModQuotaCommand(user)
    action = words[0].lower()
    if action == "tier" and len(words) == 2:
        return ModQuotaCommand(user, tier=words[1].lower())
    if action == "grant" and len(words) == 2:
        try:
            amount = float(words[1])
        except ValueError:
            amount = math.nan
        if not 0 < amount <= 1_000_000:
            raise InvalidCommand(f"/mod quota grant needs a number of units from 0 to 1000000 (got "
                                 f"{_shown(words[1])})")
        return ModQuotaCommand(user, grant_units=amount)
    raise InvalidCommand("usage: /mod quota <user> to show it, /mod quota <user> tier NAME, or "
                         "/mod quota <user> grant UNITS (extra units for today)")


# -- value checks -----------------------------------------------------------------------------------


def _whole_number(flags: Mapping[str, str], name: str, low: int, high: int,
                  default: _Default) -> int | _Default:
    value = flags.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise InvalidCommand(f"--{name} must be a whole number from {low} to {high} (got {_shown(value)})")
    return number


def _number(flags: Mapping[str, str], name: str, low: float, high: float,
            default: _Default) -> float | _Default:
    value = flags.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not low <= number <= high:  # also false for nan
        raise InvalidCommand(f"--{name} must be a number from {_num(low)} to {_num(high)} "
                             f"(got {_shown(value)})")
    return number


def _check_kind_flags(kind: JobKind, flags: Mapping[str, str]) -> None:
    """Refuse a flag of /outpaint or /animate given to another command, naming what it is for."""
    for name in EXTRA_FLAGS:
        if name in flags and name not in KIND_FLAGS.get(kind, ()):
            owners = " and ".join(f"/{owner.value}" for owner, names in KIND_FLAGS.items() if name in names)
            raise InvalidCommand(f"--{name} is for {owners}; /{kind.value} leaves it out")


def _pan(value: str | None) -> tuple[float, float]:
    if value is None:
        return (0.0, 0.0)
    match = _PAN.fullmatch(value.replace(" ", ""))
    pan = (float(match[1]), float(match[2])) if match else None
    if pan is None or not all(-MAX_PAN <= each <= MAX_PAN for each in pan):
        raise InvalidCommand(f"--pan must be DX,DY: pixels per frame right and down, each from -{MAX_PAN} to "
                             f"{MAX_PAN}, e.g. --pan 4,0 (got {_shown(value)})")
    return pan


def _outpaint_margins(flags: Mapping[str, str], limits: LimitsConfig) -> OutpaintMargins:
    """/outpaint's --zoom, or its --left/--right/--up/--down."""
    given = [name for name in OUTPAINT_FLAGS if name in flags]
    if not given:
        raise InvalidCommand("/outpaint needs --zoom X (1.1 to 4: the canvas grows that much each way) or "
                             "--left/--right/--up/--down N (pixels to add on that side), e.g. /outpaint --zoom 2")
    if "zoom" in flags:
        if len(given) > 1:
            raise InvalidCommand(f"give --zoom or --{given[1] if given[0] == 'zoom' else given[0]}, not both: --zoom "
                                 "adds around every side, --left/--right/--up/--down add on one")
        return OutpaintMargins(zoom=_number(flags, "zoom", MIN_ZOOM, MAX_ZOOM, None))
    sides = {name: _whole_number(flags, name, 0, limits.max_side, 0) for name in given}
    for name, pixels in sides.items():
        if pixels % 8:
            raise InvalidCommand(f"--{name} must be a multiple of 8 pixels (got {pixels}); try "
                                 f"--{name} {_round8(pixels)}")
    if not any(sides.values()):
        raise InvalidCommand("/outpaint adds nothing with every side at 0; give a side at least 8 pixels, "
                             "e.g. --left 64")
    return OutpaintMargins(**sides)


def _aspect(value: str) -> tuple[float, float]:
    match = _ASPECT.fullmatch(value)
    aspect_w, aspect_h = (float(match[1]), float(match[2])) if match else (0.0, 0.0)
    if not (aspect_w > 0 and aspect_h > 0 and math.isfinite(aspect_w / aspect_h)):
        raise InvalidCommand(f"--ar must be two positive numbers as W:H, e.g. --ar 16:9 "
                             f"(got {_shown(value)})")
    if not 1 / MAX_ASPECT <= aspect_w / aspect_h <= MAX_ASPECT:
        raise InvalidCommand(f"--ar must be a ratio from 1:{MAX_ASPECT:g} to {MAX_ASPECT:g}:1 "
                             f"(got {_shown(value)})")
    return aspect_w, aspect_h


def _check_configuration(limits: LimitsConfig, models: Mapping[str, ModelConfig], default_model: str,
                         default_sampler: str) -> None:
    """Refuse, at start-up, limits and models under which no command could ever pass."""
    if default_model not in models:
        raise ConfigError(f"generation.default_model = {default_model!r} is not one of the [models.*] "
                          f"tables: {', '.join(models) or '(none)'}")
    if default_sampler not in SAMPLERS:
        raise ConfigError(f"generation.default_sampler = {default_sampler!r} is not one of "
                          f"{', '.join(SAMPLERS)}")
    low, high = _side_range(limits)
    if low * low > limits.max_pixels:
        raise ConfigError(f"limits.max_pixels = {limits.max_pixels} is below the smallest image, "
                          f"{low}x{low} (limits.min_side)")
    for name, model in models.items():
        width, height = model.default_width or low, model.default_height or low  # unset: the model's, fitted
        if width % 8 or height % 8 or not (low <= width <= high and low <= height <= high) \
                or width * height > limits.max_pixels:
            raise ConfigError(f"models.{name}: default size {width}x{height} must be multiples of 8 within "
                              f"limits.min_side/max_side/max_pixels ({low} to {high}, {limits.max_pixels})")
        if model.default_steps is not None and not limits.min_steps <= model.default_steps <= limits.max_steps:
            raise ConfigError(f"models.{name}: default_steps = {model.default_steps} must lie between "
                              f"limits.min_steps = {limits.min_steps} and limits.max_steps = {limits.max_steps}")
        if model.default_cfg is not None and not limits.min_cfg <= model.default_cfg <= limits.max_cfg:
            raise ConfigError(f"models.{name}: default_cfg = {_num(model.default_cfg)} must lie between "
                              f"limits.min_cfg = {_num(limits.min_cfg)} and limits.max_cfg = {_num(limits.max_cfg)}")


def _side_range(limits: LimitsConfig) -> tuple[int, int]:
    """The smallest and largest multiples of 8 allowed as a side."""
    low, high = -(-limits.min_side // 8) * 8, limits.max_side // 8 * 8
    if low > high:
        raise ConfigError(f"limits.min_side = {limits.min_side} to max_side = {limits.max_side} holds no "
                          "multiple of 8; widen the range")
    return low, high


# -- message helpers --------------------------------------------------------------------------------

_EXAMPLES = {
    "no": "--no blurry, text",
    "seed": "--seed 42",
    "steps": "--steps 30",
    "cfg": "--cfg 7.5",
    "ar": "--ar 16:9",
    "size": "--size 512x768",
    "n": "--n 2",
    "sampler": "--sampler euler_a",
    "model": "--model <name from /help>",
    "strength": "--strength 0.6",
    "style": "--style <name from /styles>",
    "lora": "--lora <name from /loras>:0.8",
    "zoom": "--zoom 2",
    "frames": "--frames 24",
    "fps": "--fps 12",
    "pan": "--pan 4,0",
    "rotate": "--rotate 2",
    "left": "--left 128",
    "right": "--right 128",
    "up": "--up 128",
    "down": "--down 128",
}


def _did_you_mean(word: str, choices: tuple[str, ...] | list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _listed(names: tuple[str, ...], prefix: str) -> str:
    return ", ".join(prefix + name for name in names)


def _shown(value: str, limit: int = 40) -> str:
    """The user's input as quoted back in an error, cut short so the message stays one line."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _num(value: float) -> str:
    return f"{value:g}"


def _round8(value: float) -> int:
    return max(8, round(value / 8) * 8)
