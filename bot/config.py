"""Settings: one typed tree, read from a TOML file and overridden by environment variables.

Precedence, highest first: environment (`EASEL_<SECTION>__<KEY>`, plus the plain secrets
`DISCORD_TOKEN` and `TELEGRAM_TOKEN`), then the TOML file, then the defaults written here.
`config.example.toml` documents every key; `easel config check FILE` validates a file and names
every bad key at once.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bot.errors import ConfigError

CONFIG_ENV_VAR = "EASEL_CONFIG"


class Section(BaseModel):
    # An unknown key is a typo until proven otherwise: reject it so `config check` can name it.
    model_config = ConfigDict(extra="forbid")


class DatabaseConfig(Section):
    # Empty means a SQLite file in the data folder. PostgreSQL: "postgresql+asyncpg://user:pw@host/db".
    url: str = ""
    busy_timeout_ms: int = Field(5000, ge=0)


class StorageConfig(Section):
    data_dir: Path = Path("data")  # the SQLite database, images/ and the built-in models live here
    models_dir: Path | None = None  # where built-in models are built and cached; default data_dir/models
    lora_dir: Path | None = None  # LoRA .safetensors files, used by file stem; default data_dir/loras
    embeddings_dir: Path | None = None  # textual-inversion embeddings; default data_dir/embeddings
    styles_file: Path | None = None  # AUTOMATIC1111's styles.csv for --style; default data_dir/styles.csv
    # Diffusers folders and .safetensors checkpoints dropped here are models named by their stem
    # (bot/catalog.py); default data_dir/checkpoints.
    checkpoints_dir: Path | None = None
    # Where generated and uploaded images, and /animate frames and clips, go (bot/store.py). Empty:
    # <data_dir>/images on this host.
    # "s3://BUCKET/PREFIX": an S3-compatible object store every worker and server host shares; its
    # credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    # AWS_SESSION_TOKEN) or the host's role, never from this file.
    images_url: str = ""
    s3_endpoint: str = ""  # e.g. "http://minio:9000"; empty: AWS_ENDPOINT_URL, else AWS itself
    s3_region: str = ""  # empty: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1
    # How GET /v1/images/{sha256} and /v1/videos/{sha256} serve from the object store: "stream" passes
    # the bytes through Easel; "redirect" answers 307 to a presigned URL valid for presigned_url_s (the
    # store then serves the bytes itself; withheld images and clips are always streamed, to moderators).
    image_links: Literal["stream", "redirect"] = "stream"
    presigned_url_s: int = Field(3600, ge=1, le=604800)  # S3 signs URLs for 7 days at most

    @field_validator("images_url")
    @classmethod
    def _images_url_is_a_bucket(cls, url: str) -> str:
        if not url:
            return url
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("must be empty (images in <data_dir>/images) or s3://BUCKET/PREFIX, e.g. "
                             "s3://easel-images/prod")
        return url

    @field_validator("s3_endpoint")
    @classmethod
    def _s3_endpoint_is_a_url(cls, url: str) -> str:
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:9000")
        return url

    @property
    def model_cache(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def loras(self) -> Path:
        return self.lora_dir or self.data_dir / "loras"

    @property
    def embeddings(self) -> Path:
        return self.embeddings_dir or self.data_dir / "embeddings"

    @property
    def styles_path(self) -> Path:
        return self.styles_file or self.data_dir / "styles.csv"

    @property
    def checkpoints(self) -> Path:
        return self.checkpoints_dir or self.data_dir / "checkpoints"


class LimitsConfig(Section):
    """What a command may ask for. The grammar enforces these and names them in its errors."""

    max_prompt_chars: int = Field(1000, ge=1)
    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(50, ge=1)
    default_steps: int = Field(20, ge=1)
    min_cfg: float = Field(1.0, ge=0)
    max_cfg: float = Field(20.0, ge=0)
    default_cfg: float = Field(7.0, ge=0)
    max_n: int = Field(4, ge=1)
    max_permutations: int = Field(8, ge=1)  # jobs one prompt's {red, green} options may make
    default_n: int = Field(1, ge=1)
    min_side: int = Field(64, ge=8)
    max_side: int = Field(1024, ge=8)
    max_pixels: int = Field(1024 * 1024, ge=64)
    min_strength: float = Field(0.05, ge=0, le=1)
    max_strength: float = Field(1.0, ge=0, le=1)
    default_strength: float = Field(0.75, ge=0, le=1)
    # /outpaint's --strength when none is given: its new border starts from the picture's edges carried
    # outwards, and below 1 the model continues them (the border of a sky stays sky) instead of drawing
    # the whole prompt again in it.
    default_outpaint_strength: float = Field(0.6, ge=0, le=1)
    # /animate: frames per clip and per second, each frame's pixels (every frame is a generation), and
    # how much each frame redraws the one before (low: smooth motion; high: each frame wanders off).
    max_frames: int = Field(48, ge=2)
    default_frames: int = Field(12, ge=2)
    max_fps: int = Field(24, ge=1)
    default_fps: int = Field(8, ge=1)
    max_animation_pixels: int = Field(512 * 512, ge=64)
    default_animate_strength: float = Field(0.35, ge=0, le=1)
    # Attachments: bytes on the wire, and pixels once the header is read (before decoding them all).
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_upload_pixels: int = Field(4096 * 4096, ge=1)
    # LoRAs one job may use, and their weights: from -max_lora_weight to max_lora_weight.
    max_loras: int = Field(5, ge=0)
    max_lora_weight: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _ranges_make_sense(self) -> LimitsConfig:
        for name in ("steps", "cfg", "strength"):
            low, high = getattr(self, f"min_{name}"), getattr(self, f"max_{name}")
            default = getattr(self, f"default_{name}")
            if not low <= default <= high:
                raise ValueError(f"default_{name} = {default} must lie between min_{name} = {low} "
                                 f"and max_{name} = {high}")
        if not self.min_strength <= self.default_outpaint_strength <= self.max_strength:
            raise ValueError(f"default_outpaint_strength = {self.default_outpaint_strength} must lie between "
                             f"min_strength = {self.min_strength} and max_strength = {self.max_strength}")
        if not self.min_strength <= self.default_animate_strength <= self.max_strength:
            raise ValueError(f"default_animate_strength = {self.default_animate_strength} must lie between "
                             f"min_strength = {self.min_strength} and max_strength = {self.max_strength}")
        if self.default_frames > self.max_frames or self.default_fps > self.max_fps:
            raise ValueError(f"default_frames = {self.default_frames} and default_fps = {self.default_fps} must not "
                             f"exceed max_frames = {self.max_frames} and max_fps = {self.max_fps}")
        if self.default_n > self.max_n:
            raise ValueError(f"default_n = {self.default_n} must not exceed max_n = {self.max_n}")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side = {self.min_side} must not exceed max_side = {self.max_side}")
        return self


class QueueConfig(Section):
    max_queued_per_user: int = Field(10, ge=1)  # jobs waiting or running at once, per user
    max_attempts: int = Field(3, ge=1)  # a job whose worker died this often is failed, not retried
    # A plain images-per-UTC-day cap per user, on top of the cost-unit quota in [quota]; 0 = none.
    daily_images_per_user: int = Field(200, ge=0)
    # A running job whose heartbeat is older than this is taken back for another worker. A worker
    # heartbeats its batch only while it makes progress, and looks for abandoned jobs every lease_s/4:
    # a killed worker's job is taken back within lease_s/4 (same host) or lease_s * 1.25 (another host).
    lease_s: float = Field(15.0, gt=0)
    # One diffusers call may take base + per_megapixel_step * width * height / 1e6 * steps * images
    # seconds, counted from its first step; past that its jobs fail saying what to lower. A batch stuck
    # in one step (or loading its model) longer than base + per_megapixel_step * megapixels * images
    # no longer has its lease renewed.
    time_limit_base_s: float = Field(60.0, ge=0)
    time_limit_s_per_megapixel_step: float = Field(60.0, ge=0)
    # A worker whose batch makes no progress this long (or one step's allowance, if longer) logs why
    # and exits with status 70, for its supervisor to restart it. 0 = no watchdog.
    watchdog_s: float = Field(300.0, ge=0)
    # The worker registry (`easel workers`, /metrics): a worker's row whose last heartbeat (every
    # lease_s/4 while it runs) is older than this is deleted by the next worker that looks: a host that
    # died leaves the list after this long. A worker that stops cleanly removes its own row at once.
    worker_expiry_s: float = Field(300.0, ge=10)
    # Model affinity: a worker serves a user whose job is for a model it has loaded before a fairer job
    # for a model it would have to load, but a job is passed over this way at most this many times
    # (claims by any worker), then it is served next. 0 = no affinity: strictly fair order.
    affinity_max_passes: int = Field(4, ge=0, le=100)
    # And an idle worker leaves a job for a model it would have to load to another idle worker that has
    # it loaded (the worker registry says which), for at most this long after the job was submitted;
    # past it, whichever worker looks first takes it. 0 = never leave a job.
    affinity_max_wait_s: float = Field(2.0, ge=0, le=60)


class TeachConfig(Section):
    """/teach: training a LoRA from a user's pictures, a slice of steps per queue entry (bot/teach.py)."""

    min_pictures: int = Field(3, ge=1)
    max_pictures: int = Field(30, ge=1)
    max_picture_side: int = Field(2048, ge=8)  # pixels, each side of each picture
    max_total_pixels: int = Field(30 * 1024 * 1024, ge=64)  # all pictures of one training together
    min_steps: int = Field(10, ge=1)
    max_steps: int = Field(2000, ge=1)
    default_steps: int = Field(300, ge=1)
    min_rank: int = Field(1, ge=1)
    max_rank: int = Field(64, ge=1)
    default_rank: int = Field(4, ge=1)
    # Steps one queue entry runs before the training goes back to the queue (and other users' jobs
    # run): the most a generation job waits behind a training, and the most a SIGKILL loses.
    slice_steps: int = Field(50, ge=1)
    batch: int = Field(4, ge=1)  # pictures per training step
    learning_rate: float = Field(1e-2, gt=0)  # builtin:shapes learns fast; sd15 LoRAs use about 1e-4
    max_trained_per_user: int = Field(20, ge=0)  # trained LoRAs one user may keep
    samples: int = Field(2, ge=0)  # sample pictures sent while it trains (after evenly spaced slices)

    @model_validator(mode="after")
    def _ranges_make_sense(self) -> TeachConfig:
        for name in ("steps", "rank"):
            low, high = getattr(self, f"min_{name}"), getattr(self, f"max_{name}")
            if not low <= getattr(self, f"default_{name}") <= high:
                raise ValueError(f"teach.default_{name} must lie between min_{name} = {low} and max_{name} = {high}")
        if self.min_pictures > self.max_pictures:
            raise ValueError(f"teach.min_pictures = {self.min_pictures} must not exceed max_pictures")
        return self


class ModelConfig(Section):
    """One model and its defaults (bot/catalog.py). A user's flags override every default."""

    # "builtin:shapes", a hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5"), a local diffusers
    # folder or a single-file .safetensors checkpoint. Empty: the checkpoint named like this table in
    # the checkpoints folder (storage.checkpoints_dir), so its defaults can be set here.
    source: str = ""
    # Single-file checkpoints: a diffusers folder or hub id of the same family whose configuration
    # describes its parts. Empty: the family's reference model on the hub (fetched once, then cached).
    config: str = ""
    family: Literal["", "sd1", "sd2", "sdxl"] = ""  # empty: read from the model's files
    description: str = ""  # what the model is for, shown by /models
    default_width: int | None = Field(None, ge=8)  # None: the model's own (512 SD 1.x, 768 2.x, 1024 SDXL)
    default_height: int | None = Field(None, ge=8)
    default_steps: int | None = Field(None, ge=1)  # None: limits.default_steps
    default_cfg: float | None = Field(None, ge=0)  # None: limits.default_cfg
    default_sampler: str | None = None  # None: generation.default_sampler
    default_negative: str = ""  # the negative prompt when the user gives none (--no, (-...))

    @model_validator(mode="after")
    def _loadable(self) -> ModelConfig:
        from bot.catalog import PICKLE_SUFFIXES, pickle_refusal
        from bot.domain import SAMPLERS

        if self.source.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(pickle_refusal(self.source))
        if self.default_sampler is not None and self.default_sampler.lower() not in SAMPLERS:
            raise ValueError(f"default_sampler = {self.default_sampler!r} is not one of {', '.join(SAMPLERS)}")
        return self


class GenerationConfig(Section):
    default_model: str = "shapes"  # the built-in model that draws what it is told (see [models.*])
    default_sampler: str = "euler"
    device: str = "auto"  # "auto" = CUDA when present, else CPU; or "cpu", "cuda", "cuda:1", "mps"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto = fp16 on CUDA, fp32 else
    max_batch: int = Field(4, ge=1)  # images per diffusers call, across jobs of different users
    batch_wait_ms: int = Field(0, ge=0)  # how long a worker waits for more compatible jobs
    poll_interval_ms: int = Field(500, ge=10)  # how often an idle worker looks for new jobs
    progress_every_s: float = Field(0.5, ge=0)  # a progress event this often per batch, the first after it
    # Models stay loaded; past this many MiB of weights the least recently used model is unloaded
    # before another is loaded. 0 = no limit.
    memory_budget_mb: int = Field(0, ge=0)
    # Speed switches, each off until measured to help on your hardware (bench/throughput.py).
    channels_last: bool = False  # UNet in channels-last memory format (often faster on CUDA)
    compile: bool = False  # torch.compile the UNet; warmed up at start for `compile_sizes`
    compile_sizes: list[str] = Field(default_factory=list)  # e.g. ["512x512", "768x512"]
    vae_tiling: bool = False  # decode large images in tiles (less memory, slightly slower)
    cpu_offload: bool = False  # keep weights on the CPU, move each part to the GPU when used (small GPUs)
    previews: bool = False  # cheap live previews (latents projected to RGB) with progress events
    preview_every_steps: int = Field(5, ge=1)


# The upscale models Easel ships (generation/upscale.py), by the name after `builtin:`, with their scale.
BUILTIN_UPSCALERS: dict[str, int] = {"upscale-x2": 2}


class UpscaleConfig(Section):
    """The Upscale button (U1..., POST /v1/jobs/{id}/upscale): the picture at twice its size."""

    # Empty: an img2img pass at twice the size (the picture enlarged by Lanczos first). Else an upscale
    # model does the enlarging: "builtin:upscale-x2", or a Real-ESRGAN compact (SRVGGNetCompact)
    # .safetensors file such as realesr-general-x4v3; then the img2img pass below, if any.
    model: str = ""
    denoise: float = Field(0.2, ge=0, le=1)  # strength of the img2img pass after the model; 0 = none
    # Both passes run in tiles of this many output pixels a side, overlapping by tile_overlap and
    # blended there, so a 2048x2048 result needs the memory of one tile. Multiples of 8.
    tile: int = Field(512, ge=64, le=2048)
    tile_overlap: int = Field(32, ge=0, le=256)

    @model_validator(mode="after")
    def _usable(self) -> UpscaleConfig:
        if self.tile % 8 or self.tile_overlap % 8:
            raise ValueError(f"tile = {self.tile} and tile_overlap = {self.tile_overlap} must be multiples of 8")
        if self.tile_overlap * 2 >= self.tile:
            raise ValueError(f"tile_overlap = {self.tile_overlap} must be less than half of tile = {self.tile}")
        if not self.model:
            return self
        if self.model.startswith("builtin:"):
            if self.model.removeprefix("builtin:") not in BUILTIN_UPSCALERS:
                raise ValueError(f"model = {self.model!r} is not a built-in upscale model; use "
                                 f"{', '.join('builtin:' + name for name in BUILTIN_UPSCALERS)} or a .safetensors file")
            return self
        from bot.catalog import PICKLE_SUFFIXES, pickle_refusal

        if self.model.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(pickle_refusal(self.model))
        if not self.model.lower().endswith(".safetensors"):
            raise ValueError(f"model = {self.model!r} is neither builtin:upscale-x2 nor a .safetensors file")
        if not Path(self.model).expanduser().is_file():
            raise ValueError(f"model file {self.model} does not exist; fix the path or use builtin:upscale-x2")
        return self


class DiscordConfig(Section):
    """The Discord adapter (adapters/discord.py) runs when a token is set."""

    token: SecretStr | None = None  # prefer the DISCORD_TOKEN environment variable
    # A job's message is edited with its progress at most this often (Discord rate-limits edits).
    progress_edit_every_s: float = Field(2.0, ge=0)
    # An interaction token lives 15 minutes; with less than this left, results go to the channel
    # with the bot's own token instead (uploads of large files take a while).
    token_margin_s: float = Field(90.0, ge=0, le=600)
    # "nsfw_channels": NSFW allowed only in channels Discord marks age-restricted; "never": nowhere.
    nsfw: Literal["nsfw_channels", "never"] = "nsfw_channels"
    # Members with one of these roles count as moderators (besides those with Manage Messages).
    moderator_role_ids: list[int] = Field(default_factory=list)


class TelegramConfig(Section):
    """The Telegram adapter (adapters/telegram.py) runs when a token is set."""

    token: SecretStr | None = None  # prefer the TELEGRAM_TOKEN environment variable
    # The Bot API server. The token is appended, or put where "{token}" appears. Your own
    # telegram-bot-api server lifts Telegram's 20 MB limit on the files a bot may download.
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    # Groups the bot answers in (chat ids such as -1001234567890); empty = every group it is in.
    allowed_chats: list[int] = Field(default_factory=list)
    private_chats: bool = True  # answer in one-to-one chats too
    # Telegram user ids that moderate Easel; with group_admins_moderate a group's admins moderate too.
    admins: list[int] = Field(default_factory=list)
    group_admins_moderate: bool = True
    # Chats (group ids, or user ids for private chats) where NSFW results are allowed; empty = none.
    nsfw_chats: list[int] = Field(default_factory=list)
    send_png_files: bool = False  # also send each result as a lossless PNG file (photos are JPEGs)
    # Least seconds between two messages or edits to one chat: Telegram allows about one a second
    # in a private chat and twenty a minute in a group, and answers floods with RetryAfter.
    private_interval_s: float = Field(1.0, ge=0)
    group_interval_s: float = Field(3.0, ge=0)
    album_wait_s: float = Field(1.0, ge=0)  # wait this long for the rest of an album (an inpaint mask)
    poll_timeout_s: int = Field(10, ge=0)  # long polling: how long one getUpdates call waits for news
    concurrent_updates: int = Field(64, ge=1)  # updates handled at once, so a slow download blocks no one
    # Webhook mode, for hosts that cannot long-poll: Telegram posts each update to this https URL, which
    # your TLS proxy passes on to Easel's HTTP server (it listens on the URL's path). Empty: long polling.
    webhook_url: str = ""
    # Sent by Telegram with every update (X-Telegram-Bot-Api-Secret-Token); posts without it are refused.
    # Required with webhook_url; prefer the EASEL_TELEGRAM__WEBHOOK_SECRET environment variable.
    webhook_secret: SecretStr | None = None
    webhook_max_connections: int = Field(40, ge=1, le=100)  # updates Telegram may post at once

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url_is_one_telegram_accepts(cls, url: str) -> str:
        if not url:
            return url
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("must be an https:// URL (Telegram posts updates over HTTPS only; put a TLS proxy "
                             "in front of Easel's HTTP server)")
        if parts.port not in (None, 443, 80, 88, 8443):
            raise ValueError("may use port 443, 80, 88 or 8443 only (Telegram's rule for webhooks)")
        if parts.path in ("", "/"):
            raise ValueError("needs a path for Easel's HTTP server to receive updates at, e.g. "
                             "https://bot.example.com/telegram/webhook")
        return url

    @model_validator(mode="after")
    def _webhook_has_a_valid_secret(self) -> TelegramConfig:
        # Checked here, not in a field validator, so the error never quotes the secret.
        secret = self.webhook_secret.get_secret_value() if self.webhook_secret is not None else None
        if secret is not None and not _WEBHOOK_SECRET.fullmatch(secret):
            raise ValueError("webhook_secret must be 1 to 256 characters, each a letter, a digit, _ or - "
                             "(Telegram's rule for secret tokens)")
        if self.webhook_url and secret is None:
            raise ValueError("webhook_url needs webhook_secret (1 to 256 letters, digits, _ or -; e.g. from "
                             "`openssl rand -hex 32`), which Telegram sends with every update so that Easel "
                             "refuses posts from anyone else")
        return self


_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")


class DeliveryConfig(Section):
    """How job events reach users (bot/delivery.py)."""

    # Jobs whose events one platform delivers at once; each job's events stay in order. One user's
    # rate-limited or slow message never holds up another's, up to this many at a time.
    concurrency: int = Field(16, ge=1, le=256)


class HttpConfig(Section):
    """The HTTP API and web chat (adapters/http.py)."""

    # None: on when neither Discord nor Telegram is configured, or when telegram.webhook_url is set.
    enabled: bool | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0 = any free port (tests)
    # The address clients reach this server at, for the image links in webhooks and MCP answers
    # (e.g. "https://easel.example.com"). Empty: taken from each request, or http://host:port.
    public_url: str = ""
    # Let the web chat at / give each browser its own identity (an API key of kind "web", with the
    # default quota). Off: the page asks for an API key made with `easel apikey create`.
    web_sessions: bool = True
    webhook_attempts: int = Field(5, ge=1)  # tries per completion webhook before giving up until restart
    webhook_backoff_s: float = Field(2.0, ge=0)  # wait before the 2nd try; doubles after each failure
    webhook_timeout_s: float = Field(10.0, gt=0)  # per try
    # Webhooks to loopback, private and link-local addresses are refused (a key holder could otherwise
    # make this server call internal services). Turn on for local development and tests.
    allow_private_webhooks: bool = False
    # The OpenAI Images API (/v1/images/generations, edits, variations) answers with the images, so it
    # waits this long for the job; a job still running then gets an error naming its id (GET
    # /v1/jobs/{id} has it when done). Below the clients' own timeouts (Open WebUI, LibreChat: minutes).
    openai_wait_s: float = Field(240.0, gt=0)
    # The AUTOMATIC1111 API (/sdapi/v1): txt2img and img2img answer with the images, so they wait this
    # long for the job; a job still running then gets an error naming its id (it finishes anyway and
    # GET /v1/jobs/{id} has it). A1111 clients (SillyTavern, Open WebUI, webuiapi) wait minutes or forever.
    a1111_wait_s: float = Field(300.0, gt=0)
    # A quota tier ([quota.tiers.*]) for /sdapi/v1 requests that carry no key, for a trusted LAN whose
    # clients cannot send one; all of them count as one user. Empty: every request needs a key.
    a1111_anonymous_tier: str = ""


class SafetyCategoryConfig(Section):
    """One category of the prompt check (bot/safety.py): what to look for and what to do on a match."""

    # block: refused everywhere (and a strike); flag: allowed and recorded for moderators;
    # nsfw_only: allowed where the platform says NSFW is allowed (a Discord NSFW channel...), else refused.
    action: Literal["block", "flag", "nsfw_only"]
    words: list[str] = Field(default_factory=list)  # whole words or phrases, matched after normalisation
    patterns: list[str] = Field(default_factory=list)  # regular expressions over the normalised prompt
    description: str = ""  # what the category is, in words: shown to users, and used by the semantic check

    @model_validator(mode="after")
    def _patterns_compile(self) -> SafetyCategoryConfig:
        import re

        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        return self


def _default_safety_categories() -> dict[str, SafetyCategoryConfig]:
    minors = (r"(?:child|children|kid|kids|minor|minors|underage|preteen|toddler|infant|schoolgirl|schoolboy"
              r"|little girl|little boy|young girl|young boy|(?:[1-9]|1[0-7]) ?(?:yo|year old|years old))")
    sexual = r"(?:nude|naked|nsfw|sex|sexual|porn|lewd|erotic|topless|undressed|nipples?|genitals?)"
    return {
        "minors": SafetyCategoryConfig(
            action="block", description="sexual content involving minors",
            words=["loli", "lolicon", "shota", "shotacon", "jailbait", "csam", "pedo", "pedophile"],
            patterns=[rf"\b{minors}\b.*\b{sexual}", rf"\b{sexual}\b.*\b{minors}\b"],
        ),
        "sexual": SafetyCategoryConfig(
            action="nsfw_only", description="nudity and sexual content",
            words=["nude", "naked", "nsfw", "porn", "porno", "pornographic", "hentai", "sex", "sexual",
                   "erotic", "lewd", "topless", "nipple", "genitals", "penis", "vagina", "xxx", "explicit"],
        ),
        "gore": SafetyCategoryConfig(
            action="flag", description="graphic violence and gore",
            words=["gore", "gory", "dismembered", "decapitated", "disemboweled", "mutilated", "beheaded"],
        ),
    }


class SafetyConfig(Section):
    """Content safety: the prompt check before queuing and the image check before delivery."""

    prompt_check: bool = True  # off: no prompt is checked (not recommended for public bots)
    categories: dict[str, SafetyCategoryConfig] = Field(default_factory=_default_safety_categories)
    # Optional semantic check: a local sentence-transformers model folder (needs the
    # sentence-transformers package). Empty = off. Prompts close to a category's description match it.
    semantic_model: str = ""
    semantic_threshold: float = Field(0.6, gt=0, le=1)
    # Output check: "none", "diffusers" (StableDiffusionSafetyChecker) or "nudenet" (needs nudenet).
    image_checker: Literal["none", "diffusers", "nudenet"] = "none"
    # diffusers: a model folder or hub id with safety_checker/ and feature_extractor/ subfolders;
    # empty = the default model's source. nudenet: unused.
    image_checker_source: str = ""
    nudenet_threshold: float = Field(0.6, gt=0, le=1)  # detector score from which an exposed part counts


class ModerationConfig(Section):
    """Who moderates, and how strikes become temporary bans (bot/moderation.py, bot/policy.py)."""

    # "platform:user_id", e.g. "discord:80351110224678912", "telegram:12345", "console:alice".
    # Owners moderate on every platform; platform moderators (Discord roles, Telegram chat admins)
    # only their own platform's users.
    owner_ids: list[str] = Field(default_factory=list)
    strikes_to_ban: int = Field(3, ge=0)  # strikes within the window that give a temporary ban; 0 = never
    strike_window_hours: float = Field(24.0, gt=0)
    strike_ban_hours: float = Field(24.0, gt=0)  # how long a ban from strikes lasts
    default_ban_hours: float = Field(24.0, gt=0)  # /mod ban without a duration
    # Which recorded actions count as strikes: "block" (a blocked prompt), "withhold" (a withheld image).
    strike_actions: list[Literal["block", "withhold"]] = Field(default_factory=lambda: ["block"])


class QuotaTier(Section):
    """The quota windows of one role tier, in cost units (512x512, 20 steps, 1 image = 1 unit).
    `inf` (TOML's infinity) means no limit."""

    daily_units: float = Field(50.0, ge=0)  # per UTC day
    per_minute_units: float = Field(5.0, ge=0)  # over any 60 seconds


def _default_tiers() -> dict[str, QuotaTier]:
    return {
        "user": QuotaTier(),
        "trusted": QuotaTier(daily_units=200.0, per_minute_units=10.0),
        "moderator": QuotaTier(daily_units=500.0, per_minute_units=20.0),
        "owner": QuotaTier(daily_units=float("inf"), per_minute_units=float("inf")),
    }


class BusySizeCap(Section):
    """While at least `queued_jobs` jobs wait, a new job may have at most `max_pixels` per image."""

    queued_jobs: int = Field(ge=1)
    max_pixels: int = Field(ge=64)


class QuotaConfig(Section):
    """Cost-unit quotas per role tier, the global queue cap and the busy size cap (bot/policy.py)."""

    # A user's tier is their role: "owner" for moderation.owner_ids, "moderator" for platform
    # moderators, else what `/mod quota USER tier NAME` set (default "user"). Unknown tiers fall back to "user".
    tiers: dict[str, QuotaTier] = Field(default_factory=_default_tiers)
    max_queued_total: int = Field(1000, ge=0)  # jobs waiting across all users; then "busy"; 0 = no cap
    busy_size_caps: list[BusySizeCap] = Field(default_factory=list)  # e.g. [{queued_jobs=50, max_pixels=262144}]

    @model_validator(mode="after")
    def _has_user_tier(self) -> QuotaConfig:
        if "user" not in self.tiers:
            raise ValueError("tiers must include \"user\", the tier of everyone without another role")
        return self


class ConsoleConfig(Section):
    """The console (`easel chat`, `easel imagine` and the other commands): its user is the person at the
    keyboard, who runs this Easel and can read its database anyway."""

    tier: str = "owner"  # the [quota.tiers.*] the console user's jobs count against; "user" to test as one


class FetchConfig(Section):
    """Reference images given as `{https://...}` links in a prompt (bot/fetch.py)."""

    enabled: bool = True
    # Hosts links may point to; "*.example.com" also allows its subdomains. Platform CDNs by default.
    allowed_hosts: list[str] = Field(default_factory=lambda: [
        "cdn.discordapp.com", "media.discordapp.net", "telegra.ph"])
    max_bytes: int = Field(10 * 1024 * 1024, ge=1)
    timeout_s: float = Field(10.0, gt=0)  # the whole fetch, redirects included
    max_redirects: int = Field(3, ge=0)


def _builtin_models() -> dict[str, ModelConfig]:
    return {
        # Trained to draw coloured shapes on command ("a red circle on a blue background"); ships with Easel.
        # Guidance 3 draws its shapes cleanest (README, "The built-in models").
        "shapes": ModelConfig(source="builtin:shapes", default_width=64, default_height=64, default_cfg=3.0),
        # Untrained (draws noise) and fastest: for tests of the pipeline itself.
        "tiny": ModelConfig(source="builtin:tiny", default_width=64, default_height=64),
    }


class Settings(BaseSettings):
    """The whole configuration. Build it with `load_settings`, which also reads the TOML file."""

    model_config = SettingsConfigDict(
        env_prefix="EASEL_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    database: DatabaseConfig = DatabaseConfig()
    storage: StorageConfig = StorageConfig()
    limits: LimitsConfig = LimitsConfig()
    queue: QueueConfig = QueueConfig()
    teach: TeachConfig = TeachConfig()
    generation: GenerationConfig = GenerationConfig()
    upscale: UpscaleConfig = UpscaleConfig()
    models: dict[str, ModelConfig] = Field(default_factory=_builtin_models)
    discord: DiscordConfig = DiscordConfig()
    telegram: TelegramConfig = TelegramConfig()
    http: HttpConfig = HttpConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    safety: SafetyConfig = SafetyConfig()
    moderation: ModerationConfig = ModerationConfig()
    quota: QuotaConfig = QuotaConfig()
    fetch: FetchConfig = FetchConfig()
    console: ConsoleConfig = ConsoleConfig()

    @model_validator(mode="after")
    def _names_exist(self) -> Settings:
        from bot.domain import SAMPLERS

        if self.generation.default_model not in self.models:
            raise ValueError(f"generation.default_model = {self.generation.default_model!r} is not one "
                             f"of the [models.*] tables: {', '.join(sorted(self.models))}")
        if self.generation.default_sampler not in SAMPLERS:
            raise ValueError(f"generation.default_sampler = {self.generation.default_sampler!r} is not "
                             f"one of {', '.join(SAMPLERS)}")
        return self

    @model_validator(mode="after")
    def _telegram_webhook_has_a_server(self) -> Settings:
        if self.telegram.webhook_url and self.http.enabled is False:
            raise ValueError("telegram.webhook_url needs Easel's HTTP server to receive Telegram's updates, but "
                             "http.enabled = false; remove that line or set it to true")
        return self

    @model_validator(mode="after")
    def _console_tier_exists(self) -> Settings:
        if self.console.tier not in self.quota.tiers:
            raise ValueError(f"console.tier = {self.console.tier!r} is not one of the [quota.tiers.*]: "
                             f"{', '.join(self.quota.tiers)}")
        return self

    @model_validator(mode="after")
    def _a1111_anonymous_tier_exists(self) -> Settings:
        tier = self.http.a1111_anonymous_tier
        if tier and tier not in self.quota.tiers:
            raise ValueError(f"http.a1111_anonymous_tier = {tier!r} is not one of the [quota.tiers.*]: "
                             f"{', '.join(self.quota.tiers)} (or \"\" to require a key)")
        return self

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.storage.data_dir / 'easel.db'}"

    @property
    def database_url_safe(self) -> str:
        """The database URL with any password masked, for logs and messages."""
        from sqlalchemy import make_url

        try:
            return make_url(self.database_url).render_as_string(hide_password=True)
        except Exception:
            return "(unparsable database.url)"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init arguments (see load_settings); environment wins over them.
        return (env_settings, init_settings)


def _plain_secret_env() -> dict[str, Any]:
    """DISCORD_TOKEN and TELEGRAM_TOKEN, the names every bot host already uses."""
    found: dict[str, Any] = {}
    for section, var in (("discord", "DISCORD_TOKEN"), ("telegram", "TELEGRAM_TOKEN")):
        if os.environ.get(var):
            found[section] = {"token": os.environ[var]}
    return found


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; copy config.example.toml there") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line per bad key, e.g. `limits.max_steps: Input should be a valid integer (got 'abc')`."""
    lines = [f"{source} has {error.error_count()} problem(s):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and section in config.example.toml)"
        elif "input" in item and not isinstance(item["input"], dict):
            message += f" (got {item['input']!r})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read settings from `path` (or $EASEL_CONFIG, or ./easel.toml when present) and the environment.

    `overrides` win over the file (tests and benchmarks use them, e.g. `storage={"data_dir": tmp}`).
    Raises ConfigError listing every bad key.
    """
    if path is None and os.environ.get(CONFIG_ENV_VAR):
        path = Path(os.environ[CONFIG_ENV_VAR])
    if path is None and Path("easel.toml").exists():
        path = Path("easel.toml")
    file_values = read_config_file(path) if path is not None else {}
    values = _merge(_merge(file_values, _plain_secret_env()), overrides)
    try:
        return Settings(**values)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, str(path or "configuration"))) from None


def safety_warning(settings: Settings) -> str | None:
    """A loud line when a real Stable Diffusion model runs with the output check off, or None.

    The built-in models draw shapes and noise; any other model can draw anything, and with
    `safety.image_checker = "none"` every image it makes is shown everywhere. That must be a choice
    the operator sees, as diffusers warns when its safety checker is removed.
    """
    if settings.safety.image_checker != "none":
        return None
    real = sorted(name for name, model in settings.models.items() if not model.source.startswith("builtin:"))
    if not real:
        return None
    return (f"WARNING: the image check is off (safety.image_checker = \"none\") while model(s) {', '.join(real)} "
            "can draw anything: every image is shown everywhere, NSFW channels or not. Set "
            "safety.image_checker = \"diffusers\" (with safety.image_checker_source) or \"nudenet\", or keep "
            "it off knowingly.")

