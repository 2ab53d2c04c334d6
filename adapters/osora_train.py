"""A differentiable OSoRA layer for training: trainable S' and O over the frozen base weight.

    y = W0·x + b + U_r((S' − S_r) ⊙ V_rᵀx) + (O − 1) ⊙ U_r(S' ⊙ V_rᵀx)

This is OSoRA's `O ⊙ U_r(S' ⊙ V_rᵀx) − U_r(S_r ⊙ V_rᵀx)` written exactly as the serving bank computes it
(adapters/methods/osora.py), so a trained adapter served by `AdaptedModel` gives the training-time logits,
and at initialisation (S' = S_r, O = 1) the delta is exactly zero: training starts from the base model.
W0, the bias and the cached factors U_r, S_r, V_r are frozen; only S' and O are parameters, and either can
be frozen alone (`train={"s"}` or `train={"o"}`, the paper's ablation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base_model import BaseModel
from adapters.factors import LayerFactors
from adapters.file import Adapter

TRAINABLE = ("s", "o")


class OSoRATrainLinear(nn.Module):
    """Wraps one frozen nn.Linear; `S` (init S_r) and `O` (init ones) are the adapter's parameters."""

    def __init__(self, linear: nn.Linear, factors: LayerFactors, rank: int, train: set[str]):
        super().__init__()
        if rank > factors.S.shape[0]:
            raise ValueError(f"rank {rank} exceeds the {factors.S.shape[0]} cached SVD components")
        self.linear = linear.requires_grad_(False)
        device = linear.weight.device
        U, S, V = (t[..., :rank].float().to(device).contiguous() for t in (factors.U, factors.S, factors.V))
        self.register_buffer("U", U, persistent=False)  # [d, r]
        self.register_buffer("S_r", S, persistent=False)  # [r]
        self.register_buffer("V", V, persistent=False)  # [k, r]
        self.S = nn.Parameter(S.clone(), requires_grad="s" in train)
        self.O = nn.Parameter(torch.ones(linear.out_features, device=device), requires_grad="o" in train)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, k]
        y = F.linear(x, self.linear.weight, self.linear.bias)
        z = x @ self.V  # [B, T, r]
        shift = ((self.S - self.S_r) * z) @ self.U.T  # [B, T, d]
        scaled = (self.S * z) @ self.U.T  # [B, T, d]
        return y + shift + (self.O - 1.0) * scaled


def attach_osora(base: BaseModel, factors: dict[str, LayerFactors], rank: int,
                 train: set[str]) -> dict[str, OSoRATrainLinear]:
    """Replace every target layer of `base.model` (in place) by a trainable OSoRA layer."""
    bad = set(train) - set(TRAINABLE)
    if not train or bad:
        raise ValueError(f"train must be a non-empty subset of {TRAINABLE}, got {sorted(train)}")
    base.model.requires_grad_(False)
    layers = {}
    for name, linear in base.targets.items():
        layer = OSoRATrainLinear(linear, factors[name], rank, train)
        parent, _, child = name.rpartition(".")
        setattr(base.model.get_submodule(parent), child, layer)
        layers[name] = layer
    return layers


def trainable_parameters(layers: dict[str, OSoRATrainLinear]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in (layer.S, layer.O) if p.requires_grad]


def export_adapter(layers: dict[str, OSoRATrainLinear], rank: int, fingerprint: str,
                   description: str | None = None) -> Adapter:
    """The trained S', O of every layer as an adapter file (float32, CPU), stamped with the base fingerprint."""
    tensors = {
        name: {"osora_S": layer.S.detach().float().cpu().contiguous(),
               "osora_O": layer.O.detach().float().cpu().contiguous()}
        for name, layer in layers.items()
    }
    return Adapter(method="osora", rank=rank, layers=tensors, base_fingerprint=fingerprint,
                   description=description)
