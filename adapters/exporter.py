"""Exporter: any svdserve adapter → a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)
that `peft.PeftModel.from_pretrained(base, directory)` loads on the same base model.

Every method's ΔW is a product of two thin matrices, so each becomes a LoRA of a fixed rank, exactly (the
only difference is float32 rounding in the products below, ~1e-7 relative):

  method   LoRA rank   lora_A (rank × k)              lora_B (d × rank)                       lora_alpha
  osora    r           V_rᵀ                           diag(O) U_r diag(S') − U_r diag(S_r)      r
  loraxs   r           diag(S_r) V_rᵀ                 s · U_r R                                 r
  sorsa    2r          [diag(S') A ; V_rᵀ]            s · [B , −U_r diag(S_r)]                  2r
  vera     r           diag(λ_d) vera_A[:, :k]        diag(λ_b) vera_B[:d, :]                   r
  lora     r           lora_A                         lora_B                                    the adapter's α (r if none)

s is the adapter's own scale (α/r, or 1 without alpha); folding it into lora_B and setting lora_alpha to the
LoRA rank makes PEFT's scale exactly 1. `target_modules` lists the full module names the adapter touches,
so PEFT wraps exactly those layers.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from adapters.factors import LayerFactors
from adapters.file import PEFT_PREFIX, Adapter, BaseSpec
from adapters.methods.base import truncated

Pair = tuple[torch.Tensor, torch.Tensor]  # (lora_A [rank, k], lora_B [d, rank])


def _osora(p, f, a: Adapter, k: int) -> Pair:
    U, S, V = truncated(f, a.rank)
    s_new, o = p["osora_S"].float(), p["osora_O"].float()
    return V.T, o[:, None] * U * s_new[None, :] - U * S[None, :]


def _loraxs(p, f, a: Adapter, k: int) -> Pair:
    U, S, V = truncated(f, a.rank)
    return S[:, None] * V.T, a.scale * (U @ p["loraxs_R"].float())


def _sorsa(p, f, a: Adapter, k: int) -> Pair:
    U, S, V = truncated(f, a.rank)
    lora_a = torch.cat([p["sorsa_S"].float()[:, None] * p["sorsa_A"].float(), V.T])
    lora_b = a.scale * torch.cat([p["sorsa_B"].float(), -U * S[None, :]], dim=1)
    return lora_a, lora_b


def _vera(p, f, a: Adapter, k: int) -> Pair:
    lam_b, lam_d = p["vera_lambda_b"].float(), p["vera_lambda_d"].float()
    return lam_d[:, None] * a.glob["vera_A"].float()[:, :k], lam_b[:, None] * a.glob["vera_B"].float()[: lam_b.numel(), :]


def _lora(p, f, a: Adapter, k: int) -> Pair:
    return p["lora_A.weight"].float(), p["lora_B.weight"].float()


# method -> (per-layer conversion, LoRA rank as a multiple of the adapter's rank)
CONVERSIONS = {"osora": (_osora, 1), "loraxs": (_loraxs, 1), "sorsa": (_sorsa, 2), "vera": (_vera, 1),
               "lora": (_lora, 1)}


def to_lora(adapter: Adapter, spec: BaseSpec, factors: dict[str, LayerFactors] | None,
            ) -> tuple[dict[str, Pair], int, float]:
    """module -> (lora_A, lora_B), the LoRA rank and lora_alpha, such that (lora_alpha/rank)·B A = ΔW."""
    convert, mult = CONVERSIONS[adapter.method]
    rank = mult * adapter.rank
    needs_factors = adapter.method in ("osora", "loraxs", "sorsa")
    if needs_factors and factors is None:
        raise ValueError(f"exporting a {adapter.method} adapter needs the base model's SVD factors")
    pairs = {}
    for module, p in adapter.layers.items():
        f = factors[module] if needs_factors else None
        pairs[module] = convert(p, f, adapter, spec.shapes[module][1])
    if adapter.method == "lora":
        alpha = adapter.alpha if adapter.alpha is not None else float(rank)
    else:
        alpha = float(rank)
    return pairs, rank, alpha


def peft_config(rank: int, alpha: float, modules: list[str], base_name: str | None) -> dict:
    """A PEFT LoraConfig as JSON; fields left out take PEFT's defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def export_peft_lora(adapter: Adapter, spec: BaseSpec, factors: dict[str, LayerFactors] | None,
                     directory: str, base_name: str | None = None) -> tuple[int, float]:
    """Write `adapter` as a PEFT LoRA directory (created if needed; existing adapter files are replaced).
    Returns the LoRA rank and lora_alpha."""
    pairs, rank, alpha = to_lora(adapter, spec, factors)
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_config(rank, alpha, list(pairs), base_name)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return rank, alpha
