"""Settings: one typed tree, read from a TOML file and overridden by environment variables.

Precedence, highest first: environment (`EASEL_<SECTION>__<KEY>`, plus the plain secrets
`DISCORD_TOKEN` and `TELEGRAM_TOKEN`), then the TOML file, then the defaults written here.
`config.example.toml` documents every key; `easel config check FILE` validates a file and names
every bad key at once.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
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

    @property
    def model_cache(self) -> Path:
        return self.models_dir or self.data_dir / "models"


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
    default_n: int = Field(1, ge=1)
    min_side: int = Field(64, ge=8)
    max_side: int = Field(1024, ge=8)
    max_pixels: int = Field(1024 * 1024, ge=64)
    min_strength: float = Field(0.05, ge=0, le=1)
    max_strength: float = Field(1.0, ge=0, le=1)
    default_strength: float = Field(0.75, ge=0, le=1)
    # Attachments: bytes on the wire, and pixels once the header is read (before decoding them all).
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_upload_pixels: int = Field(4096 * 4096, ge=1)

    @model_validator(mode="after")
    def _ranges_make_sense(self) -> LimitsConfig:
        for name in ("steps", "cfg", "strength"):
            low, high = getattr(self, f"min_{name}"), getattr(self, f"max_{name}")
            default = getattr(self, f"default_{name}")
            if not low <= default <= high:
                raise ValueError(f"default_{name} = {default} must lie between min_{name} = {low} "
                                 f"and max_{name} = {high}")
        if self.default_n > self.max_n:
            raise ValueError(f"default_n = {self.default_n} must not exceed max_n = {self.max_n}")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side = {self.min_side} must not exceed max_side = {self.max_side}")
        return self


class QueueConfig(Section):
    max_queued_per_user: int = Field(10, ge=1)  # jobs waiting or running at once, per user
    max_attempts: int = Field(3, ge=1)  # a job whose worker died this often is failed, not retried
    daily_images_per_user: int = Field(200, ge=0)  # simple quota: images per user per UTC day


class ModelConfig(Section):
    # "builtin:tiny", a hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5"), a local diffusers
    # folder, or a single-file checkpoint ending in .safetensors / .ckpt.
    source: str
    default_width: int = Field(512, ge=8)
    default_height: int = Field(512, ge=8)


class GenerationConfig(Section):
    default_model: str = "tiny"
    default_sampler: str = "euler"
    device: str = "auto"  # "auto" = CUDA when present, else CPU; or "cpu", "cuda", "cuda:1", "mps"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto = fp16 on CUDA, fp32 else
    max_batch: int = Field(4, ge=1)  # images per diffusers call, across jobs of different users
    batch_wait_ms: int = Field(0, ge=0)  # how long a worker waits for more compatible jobs
    poll_interval_ms: int = Field(500, ge=10)  # how often an idle worker looks for new jobs
    progress_every_s: float = Field(0.5, ge=0)  # progress events at most this often per batch


class DiscordConfig(Section):
    """The Discord adapter (adapters/discord.py) runs when a token is set."""

    token: SecretStr | None = None  # prefer the DISCORD_TOKEN environment variable


class TelegramConfig(Section):
    """The Telegram adapter (adapters/telegram.py) runs when a token is set."""

    token: SecretStr | None = None  # prefer the TELEGRAM_TOKEN environment variable


class HttpConfig(Section):
    """The HTTP API and web chat (adapters/http.py)."""

    enabled: bool | None = None  # None: on when neither Discord nor Telegram is configured
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


def _builtin_models() -> dict[str, ModelConfig]:
    return {"tiny": ModelConfig(source="builtin:tiny", default_width=64, default_height=64)}


class Settings(BaseSettings):
    """The whole configuration. Build it with `load_settings`, which also reads the TOML file."""

    model_config = SettingsConfigDict(
        env_prefix="EASEL_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    database: DatabaseConfig = DatabaseConfig()
    storage: StorageConfig = StorageConfig()
    limits: LimitsConfig = LimitsConfig()
    queue: QueueConfig = QueueConfig()
    generation: GenerationConfig = GenerationConfig()
    models: dict[str, ModelConfig] = Field(default_factory=_builtin_models)
    discord: DiscordConfig = DiscordConfig()
    telegram: TelegramConfig = TelegramConfig()
    http: HttpConfig = HttpConfig()

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
