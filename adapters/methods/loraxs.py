"""LoRA-XS (arXiv 2405.17604): one trainable r×r matrix R between frozen SVD factors.

    Δy = (α/r) · U_r R (S_r ⊙ V_rᵀx)

as in the LoRA-XS reference code (A = diag(S_r) V_rᵀ, B = U_r). Serving folds scale and S_r into
M = (α/r) R diag(S_r), zero-padded to r_max×r_max per slot, so a mixed batch is one shared Vᵀx, one batched
r×r product per row and one shared U matmul.
"""

from __future__ import annotations

import torch

from adapters.methods.base import AdapterBatch, Bank, Method, register, truncated


class LoRAXSBank(Bank):
    def __init__(self, r_max: int, n_slots: int, dtype: torch.dtype, device: torch.device):
        self.m = torch.zeros(n_slots, r_max, r_max, dtype=dtype, device=device)

    def load(self, slot, p, f, rank, scale, glob):
        self.clear(slot)
        m = scale * p["loraxs_R"].float() * f.S[:rank].float()[None, :]
        self.m[slot, :rank, :rank] = m.to(self.m)

    def clear(self, slot):
        self.m[slot] = 0

    def delta(self, x, z, U, batch: AdapterBatch):
        r = z.shape[-1]
        m = self.m.index_select(0, batch.slots)[:, :r, :r]  # [B, r, r]
        zz = z if z.dim() == 3 else z.unsqueeze(1)
        w = torch.matmul(zz, m.transpose(1, 2))  # [B, T, r]
        return (w if z.dim() == 3 else w.squeeze(1)) @ U.T


@register
class LoRAXS(Method):
    name = "loraxs"
    uses_factors = True

    def layer_shapes(self, d, k, r):
        return {"loraxs_R": (r, r)}

    def dense_delta(self, p, f, r, scale, glob):
        U, S, V = truncated(f, r)
        return scale * U @ p["loraxs_R"].float() @ torch.diag(S) @ V.T

    def new_bank(self, d, k, f, n_slots, dtype):
        return LoRAXSBank(f.S.shape[0], n_slots, dtype, f.U.device)
