"""OSoRA (arXiv 2505.14350): per layer, r new singular values S' and d output scales O.

    Δy = O ⊙ U_r(S' ⊙ V_rᵀx) − U_r(S_r ⊙ V_rᵀx)

Written against the intact W0 (the reference code trains on the residual W0 − U_r S_r V_rᵀ; same model).
Serving shares U and V across every tenant: with a = S' and c = S' − S_r (zero-padded to r_max) and
o = O − 1, Δy = U(c ⊙ z) + o ⊙ U(a ⊙ z) with z = Vᵀx — one U matmul over 2B stacked rows, no per-adapter
matmul at all.
"""

from __future__ import annotations

import torch

from adapters.factors import LayerFactors
from adapters.methods.base import AdapterBatch, Bank, Method, Params, per_row, register, truncated


class OSoRABank(Bank):
    def __init__(self, d: int, r_max: int, n_slots: int, dtype: torch.dtype, device: torch.device):
        self.a = torch.zeros(n_slots, r_max, dtype=dtype, device=device)  # S'
        self.c = torch.zeros(n_slots, r_max, dtype=dtype, device=device)  # S' − S_r
        self.o = torch.zeros(n_slots, d, dtype=dtype, device=device)  # O − 1

    @classmethod
    def from_views(cls, a: torch.Tensor, c: torch.Tensor, o: torch.Tensor) -> "OSoRABank":
        """A bank over existing storage (views into a fused group's slot table, adapters/fused.py)."""
        bank = cls.__new__(cls)
        bank.a, bank.c, bank.o = a, c, o
        return bank

    def load(self, slot, p, f, rank, scale, glob):
        s_new = p["osora_S"].float()
        self.clear(slot)
        self.a[slot, :rank] = s_new.to(self.a)
        self.c[slot, :rank] = (s_new - f.S[:rank].float()).to(self.c)
        self.o[slot] = (p["osora_O"].float() - 1.0).to(self.o)

    def clear(self, slot):
        self.a[slot] = 0
        self.c[slot] = 0
        self.o[slot] = 0

    def delta(self, x, z, U, batch: AdapterBatch):
        r = z.shape[-1]
        a = per_row(self.a.index_select(0, batch.slots)[:, :r], z)
        c = per_row(self.c.index_select(0, batch.slots)[:, :r], z)
        o = per_row(self.o.index_select(0, batch.slots), x)
        both = torch.cat([c * z, a * z], dim=0) @ U.T  # [2B, ..., d]
        shift, scaled = both.chunk(2, dim=0)
        return shift + o * scaled


@register
class OSoRA(Method):
    name = "osora"
    uses_factors = True

    def layer_shapes(self, d, k, r):
        return {"osora_S": (r,), "osora_O": (d,)}

    def dense_delta(self, p: Params, f: LayerFactors, r, scale, glob):
        # (O ⊙ U) diag(S') Vᵀ − U diag(S) Vᵀ = (U ⊙ (O S'ᵀ − 1 Sᵀ)) Vᵀ: one d×r×k product, not two
        U, S, V = truncated(f, r)
        scale_dr = p["osora_O"].float()[:, None] * p["osora_S"].float()[None, :] - S[None, :]
        return (U * scale_dr) @ V.T

    def new_bank(self, d, k, f, n_slots, dtype):
        return OSoRABank(d, f.S.shape[0], n_slots, dtype, f.U.device)
