"""The interface every adapter method implements, and the per-step batch object.

A method knows three things about itself:
  * its file layout: which tensors a layer carries and their shapes (`layer_shapes`, `global_shapes`);
  * its math, twice: `dense_delta` is the plain-torch reference ΔW (d×k) — the oracle every fast path is
    tested against and what merging adds to W0 — and its `Bank` is the fast batched path;
  * how a loaded adapter sits in device memory: a `Bank` per adapted layer, indexed by slot.

Slot 0 is "no adapter". Banks hold zeros for every slot they were not loaded into, so a row whose slot
belongs to another method (or to none) gets an exact zero delta from this method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from adapters.factors import LayerFactors

Params = dict[str, torch.Tensor]


@dataclass
class AdapterBatch:
    """Which adapter each row of one forward pass uses; built once per step, read by every layer.

    Rows are the leading dim of the activations (x: [B, T, k] or [B, k]).
    """

    slots: torch.Tensor  # [B] long, on the model's device; 0 = base model
    methods: tuple[str, ...]  # methods with at least one row in this batch
    rank: int  # largest SVD rank among the batch's adapters (how many factor columns to use)
    # method -> [(group key, row indices [n] long)] for methods applied group by group: the key is the
    # slot for LoRA and SORSA, the projection id for VeRA
    groups: dict[str, list[tuple[int | str, torch.Tensor]]] = field(default_factory=dict)
    # this batch's rows of the model's OSoRA slot table [B, P] (adapters/fused.py; [distinct slots, P] with
    # `table_rows`), gathered once per batch for every fused layer of the torch path; None when no row uses
    # OSoRA, and with the native CPU kernel, which reads the table through `slots`
    table: torch.Tensor | None = None
    # when rows share slots (a prompt chunk's tokens are rows with one slot): `table` holds each distinct slot's
    # row once and this [B] long tensor says which row of it each batch row reads; None: a row per batch row
    table_rows: torch.Tensor | None = None
    # tensors derived from this batch by the layers (each fused group's cut of `table`), made on first use
    # and reused for as long as the batch object lives; key: the owner's choosing (a group's table offset)
    memo: dict[object, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.methods


def per_row(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-row values t: [B, n] to broadcast against x: [B, ..., n]."""
    return t.view(t.shape[0], *([1] * (x.dim() - 2)), t.shape[-1])


class Bank(ABC):
    """Device-resident state of one method for one adapted layer, all slots stacked."""

    @abstractmethod
    def load(self, slot: int, p: Params, f: LayerFactors, rank: int, scale: float, glob: Params) -> None:
        """Write one adapter's tensors for this layer into `slot`."""

    @abstractmethod
    def clear(self, slot: int) -> None:
        """Zero `slot` (the adapter left, or does not touch this layer)."""

    @abstractmethod
    def delta(self, x: torch.Tensor, z: torch.Tensor, U: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """Δy for every row of x: [B, ..., k]. z = x @ V[:, :batch.rank] and U = U[:, :batch.rank]
        are the shared factor products, computed once per layer for all methods."""


class Method(ABC):
    name: ClassVar[str]
    uses_factors: ClassVar[bool]  # rank is bounded by r_max and the cached U, S, V are used

    @abstractmethod
    def layer_shapes(self, d: int, k: int, r: int) -> dict[str, tuple[int, ...]]:
        """param name -> shape, for one layer with out_features d, in_features k, rank r."""

    def global_shapes(self, shapes: dict[str, tuple[int, int]], r: int) -> dict[str, tuple[int, ...]]:
        """Top-level tensors shared by every layer of one adapter (VeRA's projections)."""
        return {}

    def scale(self, rank: int, alpha: float | None) -> float:
        return 1.0 if alpha is None else alpha / rank

    @abstractmethod
    def dense_delta(self, p: Params, f: LayerFactors, r: int, scale: float, glob: Params) -> torch.Tensor:
        """Reference ΔW: [d, k] in float32, such that the adapted layer is (W0 + ΔW) x."""

    @abstractmethod
    def new_bank(self, d: int, k: int, f: LayerFactors, n_slots: int, dtype: torch.dtype) -> Bank:
        """An empty bank for one layer; tensors on the factors' device."""


REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls()
    return cls


def truncated(f: LayerFactors, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r, S_r, V_r in float32."""
    return f.U[:, :r].float(), f.S[:r].float(), f.V[:, :r].float()


class GroupedBank(Bank):
    """Shared machinery for methods that carry their own factor matrices (LoRA, SORSA, VeRA):
    each slot's rows are handled together, one group at a time."""

    method: str

    def __init__(self, d: int, dtype: torch.dtype, device: torch.device):
        self.d, self.dtype, self.device = d, dtype, device
        self.slots: dict[int, object] = {}

    def clear(self, slot: int) -> None:
        self.slots.pop(slot, None)

    @abstractmethod
    def group_delta(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Δy for rows x (all of one slot)."""

    def grouped(self, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.d)
        for slot, rows in batch.groups.get(self.method, ()):
            if slot not in self.slots:
                continue  # the adapter does not touch this layer
            if rows.numel() == x.shape[0]:
                out += self.group_delta(x, slot)
            else:
                out.index_add_(0, rows, self.group_delta(x.index_select(0, rows), slot))
        return out
