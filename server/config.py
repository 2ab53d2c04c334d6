"""Configuration: read once (command line, then SVDSERVE_<NAME> environment variables, then defaults),
validated once, and handed out as frozen dataclass slices — each part of the server takes only its own.
Unknown options and unknown SVDSERVE_ variables are errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel as PydanticModel
from pydantic import ConfigDict, Field, field_validator

MergePolicy = Literal["never", "auto", "always"]


class Settings(PydanticModel):
    """Every setting of the server; field names are the option names with - for _."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="local HF model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto: cuda when present)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: float32 on CPU, bfloat16 on CUDA")
    max_rank: int = Field(64, ge=1, le=4096, description="r_max of the SVD factor cache")
    store: str = Field("./adapters-store", description="adapter store directory")
    cache_dir: str | None = Field(None, description="factor cache directory (default ~/.cache/svdserve/factors)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_size: int = Field(32, ge=1, le=1024, description="most sequences decoded together")
    max_model_len: int = Field(2048, ge=16, description="most tokens (prompt + completion) per sequence")
    max_queue: int = Field(256, ge=1, description="waiting requests beyond which new ones get 429")
    max_resident_adapters: int = Field(64, ge=1, le=100_000, description="adapter slots on the device")
    merge_policy: MergePolicy = "auto"
    targets: str = Field("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", description="adapted linear layers")
    log_level: str = "info"

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


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int
    max_model_len: int
    max_queue: int
    max_resident_adapters: int
    merge_policy: MergePolicy


@dataclass(frozen=True)
class HttpConfig:
    host: str
    port: int
    log_level: str


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    engine: EngineConfig
    http: HttpConfig
    store: str


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def settings_from_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """SVDSERVE_<NAME> variables as setting values; an unknown name is an error."""
    env = os.environ if env is None else env
    out = {}
    for key, value in env.items():
        if not key.startswith("SVDSERVE_"):
            continue
        name = key[len("SVDSERVE_"):].lower()
        if name not in Settings.model_fields:
            raise ValueError(f"unknown setting {key}; known: "
                             + ", ".join("SVDSERVE_" + n.upper() for n in Settings.model_fields))
        out[name] = value
    return out


def build_config(s: Settings) -> Config:
    device = resolve_device(s.device)
    return Config(
        model=ModelConfig(path=s.model, device=device, dtype=resolve_dtype(s.dtype, device),
                          max_rank=s.max_rank, cache_dir=s.cache_dir,
                          targets=tuple(t.strip() for t in s.targets.split(",") if t.strip())),
        engine=EngineConfig(max_batch_size=s.max_batch_size, max_model_len=s.max_model_len,
                            max_queue=s.max_queue, max_resident_adapters=s.max_resident_adapters,
                            merge_policy=s.merge_policy),
        http=HttpConfig(host=s.host, port=s.port, log_level=s.log_level),
        store=s.store,
    )
