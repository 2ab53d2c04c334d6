"""Configuration: read once (command line, then SVDSERVE_<NAME> environment variables, then defaults),
validated once, and handed out as frozen dataclass slices — each part of the server takes only its own.
Unknown options and unknown SVDSERVE_ variables are errors.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Literal, get_args

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.tenancy.quotas import Quota

MergePolicy = Literal["never", "auto", "always"]
ENV_PREFIX = "SVDSERVE_"


class Settings(BaseSettings):
    """Every setting of the server; option `--max-rank` is field `max_rank` is variable SVDSERVE_MAX_RANK."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True,
                                      case_sensitive=False)

    model: str | None = Field(None, description="local HF model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto: cuda when present)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16 or AMX), else float32 (guarantees per dtype: docs/engine.md)")
    max_rank: int = Field(64, ge=1, le=4096, description="r_max of the SVD factor cache")
    cpu_kernels: Literal["auto", "off"] = Field("auto", description="auto: on a CPU, serve OSoRA rows with the native kernel (built once with the machine's C++ compiler; the torch path where it cannot build); off: the torch path")
    kernel_dir: str | None = Field(None, description="where the native CPU kernel is built and kept, one build per CPU and torch version (default ~/.cache/svdserve/kernels)")
    store: str = Field("./adapters-store", description="adapter store: a directory, or s3://BUCKET/PREFIX (object storage configured by AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION; its index in the --database-url database)")
    store_cache_dir: str | None = Field(None, description="with an s3:// store: this replica's disk cache of adapter files (default ~/.cache/svdserve/adapters)")
    store_cache_bytes: int = Field(2 * 2**30, ge=0, description="with an s3:// store: the disk cache's bound (bytes, LRU)")
    cache_dir: str | None = Field(None, description="factor cache directory (default ~/.cache/svdserve/factors)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    max_batch_size: int = Field(32, ge=1, le=1024, description="most sequences decoded together")
    max_model_len: int = Field(2048, ge=16, description="most tokens (prompt + completion) per sequence")
    max_queue: int = Field(256, ge=1, description="waiting requests beyond which new ones get 429")
    kv_cache_memory: str = Field("0.2", description="KV cache budget: bytes ('4GiB', '512MB') or a fraction of the device's memory ('0.2': of RAM on the CPU); never more than max_batch_size full-length sequences need")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="tokens computed per engine step (decode tokens + prompt chunks; at least max_batch_size): a long prompt is prefilled in chunks of at most this many, alongside the running streams (default: 2048 on CUDA, 128 on a CPU, where a forward's cost grows with every token: docs/engine.md)")
    disable_prefix_caching: bool = Field(False, description="do not reuse the K/V of prompt prefixes across requests")
    max_resident_adapters: int = Field(64, ge=1, le=100_000, description="adapter slots on the device")
    max_adapter_bytes: int = Field(256 * 2**20, ge=1024, description="largest adapter upload accepted (bytes)")
    merge_policy: MergePolicy = Field("auto", description="never | auto | always: merge one adapter into the weights")
    targets: str = Field("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", description="adapted linear layers")
    chat_template: str | None = Field(None, description="Jinja chat template file, or a bundled one (chatml-tools: ChatML with tool calling); default: the model's own (the default model: chatml-tools, which renders plain chats as its own template does)")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field("info", description="log level")
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per log line, with the request id; text: plain lines")
    metrics_max_tenants: int = Field(64, ge=0, le=100_000, description="tenants with their own label in /metrics (later ones count as _other)")
    allowed_origins: str = Field("", description="CORS: comma-separated origins browsers may call from ('*' for any); empty: no CORS")
    max_request_bytes: int = Field(4 * 2**20, ge=1024, description="largest JSON request body accepted (bytes)")
    max_upload_bytes_in_flight: int = Field(1024 * 2**20, ge=1024, description="adapter bytes being uploaded at once, all clients together; more: 503 with Retry-After")
    upload_timeout_seconds: float = Field(30.0, gt=0, description="an upload that sends nothing for this long is dropped")
    parsed_adapter_cache_bytes: int = Field(512 * 2**20, ge=0, description="parsed adapters kept in host memory (LRU, bytes)")
    shutdown_grace_seconds: float = Field(10.0, ge=0, description="on SIGTERM, how long running requests may finish before their streams are ended")
    admin_key: str | None = Field(None, description="the admin's API key (better: SVDSERVE_ADMIN_KEY); none: keys from the database only")
    database_url: str | None = Field(None, description="tenants' database: sqlite:///PATH or postgresql://... (default: sqlite in the store)")
    insecure_open: bool = Field(False, description="allow open mode (no keys) on a non-loopback address")
    quota_max_adapters: int | None = Field(None, ge=0, description="default per-tenant quota: adapters stored")
    quota_max_storage_bytes: int | None = Field(None, ge=0, description="default per-tenant quota: bytes of adapters stored")
    quota_requests_per_minute: int | None = Field(None, ge=0, description="default per-tenant quota: generation requests per minute")
    quota_tokens_per_minute: int | None = Field(None, ge=0, description="default per-tenant quota: prompt + completion tokens per minute")
    quota_max_concurrent_requests: int | None = Field(None, ge=0, description="default per-tenant quota: generation requests in flight")

    @field_validator("kv_cache_memory")
    @classmethod
    def _kv_cache_memory(cls, v: str) -> str:
        from server.kv.budget import parse_memory

        parse_memory(v)  # a ValueError that says what is accepted
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        if v:
            from server.tools.template import load_chat_template

            load_chat_template(v)  # a ValueError naming the bundled templates when it cannot be read
        return v or None

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: str) -> str:
        if not [t for t in v.split(",") if t.strip()]:
            raise ValueError("targets must name at least one module")
        return v


@dataclass(frozen=True)
class ModelConfig:
    path: str | None
    device: str
    dtype: str
    max_rank: int
    cache_dir: str | None
    targets: tuple[str, ...]
    n_slots: int  # resident adapter slots + slot 0 (no adapter)
    chat_template: str | None = None  # a template file or bundled name, replacing the model's own
    cpu_kernels: bool = True  # the native OSoRA kernel on a CPU (adapters/kernels)
    kernel_dir: str | None = None  # its build directory (None: adapters.kernels' default)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int
    max_model_len: int
    max_queue: int
    max_resident_adapters: int
    merge_policy: MergePolicy
    kv_cache_memory: str = "0.2"  # bytes or a fraction of the device's memory (server.kv.budget)
    max_num_batched_tokens: int = 512  # tokens per step (decode tokens + prompt chunks)
    kv_block_size: int = 16  # tokens per KV block
    prefix_caching: bool = True


@dataclass(frozen=True)
class HttpConfig:
    host: str
    port: int
    log_level: str
    max_adapter_bytes: int
    max_request_bytes: int = 4 * 2**20
    max_upload_bytes_in_flight: int = 1024 * 2**20
    upload_timeout_seconds: float = 30.0
    shutdown_grace_seconds: float = 10.0
    allowed_origins: tuple[str, ...] = ()
    log_format: str = "json"
    metrics_max_tenants: int = 64


@dataclass(frozen=True)
class TenancyConfig:
    database_url: str
    admin_key: str | None = field(default=None, repr=False)
    default_quota: Quota = field(default_factory=Quota)
    open_allowed: bool = True  # open mode (no keys) only on loopback, unless --insecure-open


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    engine: EngineConfig
    http: HttpConfig
    store: str
    parsed_adapter_cache_bytes: int = 512 * 2**20
    store_cache_dir: str | None = None  # the S3 store's disk cache (None: default_store_cache_dir())
    store_cache_bytes: int = 2 * 2**30
    tenancy: TenancyConfig = field(default_factory=lambda: TenancyConfig("sqlite:///:memory:"))


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_store_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "svdserve", "adapters")


def default_database_url(store: str, store_cache_dir: str | None = None) -> str:
    """SQLite in the store's directory; with an s3:// store (whose index is in this database: use PostgreSQL
    for a fleet), in its disk cache directory."""
    if store.startswith("s3://"):
        return "sqlite:///" + os.path.join(os.path.abspath(store_cache_dir or default_store_cache_dir()), "svdserve.db")
    return "sqlite:///" + os.path.join(os.path.abspath(store), "svdserve.db")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def batched_tokens(device: str) -> int:
    """The default step budget (--max-num-batched-tokens) for a device: a CPU's forward cost grows with every
    token, so a chunk there is kept near the cost of a decode step of the running streams (bench/engine.py)."""
    return 2048 if device.startswith("cuda") else 128


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device) else "float32"


def native_bf16(device: str) -> bool:
    """Does the device compute in bfloat16 natively? CUDA: yes (as torch says); a CPU: when it has
    avx512_bf16 or AMX (amx_bf16), where bf16 decode measured 1.6x float32 (bench/engine.py)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: keep float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def settings_from_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """SVDSERVE_<NAME> variables as setting values; an unknown name is an error.

    pydantic-settings reads the known variables itself but ignores unknown ones, so a misspelt
    SVDSERVE_MAX_RANK would silently fall back to the default: this check refuses it instead.
    """
    env = os.environ if env is None else env
    out = {}
    for key, value in env.items():
        if not key.upper().startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in Settings.model_fields:
            raise ValueError(f"unknown setting {key}; known: "
                             + ", ".join(ENV_PREFIX + n.upper() for n in Settings.model_fields))
        out[name] = value
    return out


def arg_parser() -> argparse.ArgumentParser:
    """`--max-rank 32` etc., one option per Settings field; defaults stay None so the environment and
    the field defaults apply to whatever the command line leaves out."""
    p = argparse.ArgumentParser(prog="python -m server", description="svdserve: an OpenAI-style server for "
                                "SVD-based LLM adapters. Every option can also be set as SVDSERVE_<NAME>.",
                                allow_abbrev=False)
    for name, field in Settings.model_fields.items():
        choices = None
        if name in ("dtype", "cpu_kernels", "merge_policy", "log_level", "log_format"):
            choices = list(get_args(field.annotation))
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:  # a switch: --insecure-open
            p.add_argument(flag, dest=name, default=None, action="store_const", const=True, help=field.description)
            continue
        shown = "unset" if field.default is None else field.default
        p.add_argument(flag, dest=name, default=None, choices=choices, metavar=None if choices else name.upper(),
                       help=f"{field.description} (default: {shown})".replace("%", "%%"))
    return p


def load_settings(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Command line over environment over defaults. Raises SystemExit(2) for unknown options (argparse),
    ValueError for unknown SVDSERVE_ variables, pydantic.ValidationError for bad values."""
    args = arg_parser().parse_args(argv)
    settings_from_env(env)  # refuse unknown variables before pydantic-settings reads the known ones
    given = {k: v for k, v in vars(args).items() if v is not None}
    if env is None:
        return Settings(**given)
    values = {**settings_from_env(env), **given}
    return Settings.model_validate(values)


def build_config(s: Settings) -> Config:
    from adapters.factors import default_cache_dir

    device = resolve_device(s.device)
    return Config(
        model=ModelConfig(path=s.model, device=device, dtype=resolve_dtype(s.dtype, device),
                          max_rank=s.max_rank, cache_dir=s.cache_dir or default_cache_dir(),
                          targets=tuple(t.strip() for t in s.targets.split(",") if t.strip()),
                          n_slots=s.max_resident_adapters + 1, chat_template=s.chat_template,
                          cpu_kernels=s.cpu_kernels == "auto", kernel_dir=s.kernel_dir),
        engine=EngineConfig(max_batch_size=s.max_batch_size, max_model_len=s.max_model_len,
                            max_queue=s.max_queue, max_resident_adapters=s.max_resident_adapters,
                            merge_policy=s.merge_policy, kv_cache_memory=s.kv_cache_memory,
                            max_num_batched_tokens=max(s.max_num_batched_tokens or batched_tokens(device),
                                                       s.max_batch_size),
                            prefix_caching=not s.disable_prefix_caching),
        http=HttpConfig(host=s.host, port=s.port, log_level=s.log_level, max_adapter_bytes=s.max_adapter_bytes,
                        max_request_bytes=s.max_request_bytes, max_upload_bytes_in_flight=s.max_upload_bytes_in_flight,
                        upload_timeout_seconds=s.upload_timeout_seconds,
                        shutdown_grace_seconds=s.shutdown_grace_seconds,
                        allowed_origins=tuple(o.strip() for o in s.allowed_origins.split(",") if o.strip()),
                        log_format=s.log_format, metrics_max_tenants=s.metrics_max_tenants),
        parsed_adapter_cache_bytes=s.parsed_adapter_cache_bytes,
        store=s.store,
        store_cache_dir=s.store_cache_dir, store_cache_bytes=s.store_cache_bytes,
        tenancy=TenancyConfig(
            database_url=s.database_url or default_database_url(s.store, s.store_cache_dir), admin_key=s.admin_key or None,
            default_quota=Quota(s.quota_max_adapters, s.quota_max_storage_bytes, s.quota_requests_per_minute,
                                s.quota_tokens_per_minute, s.quota_max_concurrent_requests),
            open_allowed=s.insecure_open or is_loopback(s.host)),
    )
