"""SORSA (arXiv 2409.00055): trainable principal factors A (r×k), S' (r), B (d×r), initialised from the
top-r SVD; the residual W0 − U_r S_r V_rᵀ stays frozen.

    Δy = s · [B(S' ⊙ A x) − U_r(S_r ⊙ V_rᵀx)],   s = α/r or 1

The subtraction uses the shared factors (one U matmul for all SORSA rows); the new factors are the
adapter's own, so that part runs group by group, like LoRA.
"""

from __future__ import annotations

import torch

from adapters.methods.base import AdapterBatch, GroupedBank, Method, per_row, register, truncated


class SORSABank(GroupedBank):
    method = "sorsa"

    def __init__(self, d: int, r_max: int, n_slots: int, dtype: torch.dtype, device: torch.device):
        super().__init__(d, dtype, device)
        self.c = torch.zeros(n_slots, r_max, dtype=dtype, device=device)  # −s·S_r

    def load(self, slot, p, f, rank, scale, glob):
        self.clear(slot)
        self.c[slot, :rank] = (-scale * f.S[:rank].float()).to(self.c)
        b = scale * p["sorsa_B"].float() * p["sorsa_S"].float()[None, :]  # fold s and S' into B
        self.slots[slot] = (p["sorsa_A"].to(self.device, self.dtype), b.to(self.device, self.dtype))

    def clear(self, slot):
        super().clear(slot)
        self.c[slot] = 0

    def group_delta(self, x, slot):
        a, b = self.slots[slot]
        return (x @ a.T) @ b.T

    def delta(self, x, z, U, batch: AdapterBatch):
        c = per_row(self.c.index_select(0, batch.slots)[:, : z.shape[-1]], z)
        return (c * z) @ U.T + self.grouped(x, batch)


@register
class SORSA(Method):
    name = "sorsa"
    uses_factors = True

    def layer_shapes(self, d, k, r):
        return {"sorsa_A": (r, k), "sorsa_S": (r,), "sorsa_B": (d, r)}

    def dense_delta(self, p, f, r, scale, glob):
        U, S, V = truncated(f, r)
        new = p["sorsa_B"].float() @ torch.diag(p["sorsa_S"].float()) @ p["sorsa_A"].float()
        return scale * (new - U @ torch.diag(S) @ V.T)

    def new_bank(self, d, k, f, n_slots, dtype):
        return SORSABank(d, f.S.shape[0], n_slots, dtype, f.U.device)
