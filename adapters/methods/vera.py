"""VeRA (arXiv 2310.11454, as PEFT implements it): frozen random projections shared by every layer,
trainable scaling vectors per layer.

    Δy = λ_b ⊙ B(λ_d ⊙ A x),   A = vera_A[:, :k], B = vera_B[:d, :]

vera_A (r×k_max) and vera_B (d_max×r) are top-level tensors of the adapter file. Adapters made from the
same projection (PEFT's default `projection_prng_key`) share it, so rows are grouped by projection, not by
adapter: all VeRA tenants of one projection cost one A and one B matmul per layer, plus per-row gathers.
"""

from __future__ import annotations

import hashlib

import torch

from adapters.methods.base import AdapterBatch, Bank, Method, Params, per_row, register


def projection_id(glob: Params) -> str:
    h = hashlib.sha256()
    for name in ("vera_A", "vera_B"):
        h.update(glob[name].float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class VeRABank(Bank):
    def __init__(self, d: int, k: int, n_slots: int, dtype: torch.dtype, device: torch.device):
        self.d, self.k, self.dtype, self.device = d, k, dtype, device
        self.lam_b = torch.zeros(n_slots, d, dtype=dtype, device=device)
        self.lam_d: torch.Tensor | None = None  # [n_slots, r], allocated at the first load
        self.proj: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # projection id -> (A, B) slices
        self.slot_proj: dict[int, str] = {}

    def load(self, slot, p, f, rank, scale, glob):
        n_slots = self.lam_b.shape[0]
        if self.lam_d is None or self.lam_d.shape[1] < rank:
            old, self.lam_d = self.lam_d, torch.zeros(n_slots, rank, dtype=self.dtype, device=self.device)
            if old is not None:
                self.lam_d[:, : old.shape[1]] = old
        self.clear(slot)
        pid = projection_id(glob)
        if pid not in self.proj:
            a = glob["vera_A"][:, : self.k].to(self.device, self.dtype)
            b = glob["vera_B"][: self.d, :].to(self.device, self.dtype)
            self.proj[pid] = (a, b)
        self.slot_proj[slot] = pid
        self.lam_b[slot] = p["vera_lambda_b"].to(self.lam_b)
        self.lam_d[slot, :rank] = p["vera_lambda_d"].to(self.lam_d)

    def clear(self, slot):
        self.lam_b[slot] = 0
        if self.lam_d is not None:
            self.lam_d[slot] = 0
        pid = self.slot_proj.pop(slot, None)
        if pid is not None and pid not in self.slot_proj.values():
            del self.proj[pid]

    def delta(self, x, z, U, batch: AdapterBatch):
        out = x.new_zeros(*x.shape[:-1], self.d)
        for pid, rows in batch.groups.get("vera", ()):
            if pid not in self.proj:
                continue
            a, b = self.proj[pid]
            whole = rows.numel() == x.shape[0]
            xs, slots = (x, batch.slots) if whole else (x.index_select(0, rows), batch.slots[rows])
            lam_d = per_row(self.lam_d.index_select(0, slots)[:, : a.shape[0]], xs)
            lam_b = per_row(self.lam_b.index_select(0, slots), xs)
            y = lam_b * (((xs @ a.T) * lam_d) @ b.T)
            if whole:
                out += y
            else:
                out.index_add_(0, rows, y)
        return out


@register
class VeRA(Method):
    name = "vera"
    uses_factors = False

    def layer_shapes(self, d, k, r):
        return {"vera_lambda_b": (d,), "vera_lambda_d": (r,)}

    def global_shapes(self, shapes, r):
        return {"vera_A": (r, max(k for _, k in shapes.values())),
                "vera_B": (max(d for d, _ in shapes.values()), r)}

    def dense_delta(self, p, f, r, scale, glob):
        d, k = p["vera_lambda_b"].shape[0], f.V.shape[0]
        a = glob["vera_A"].float()[:, :k]
        b = glob["vera_B"].float()[:d, :]
        return (p["vera_lambda_b"].float()[:, None] * b) @ (p["vera_lambda_d"].float()[:, None] * a)

    def new_bank(self, d, k, f, n_slots, dtype):
        return VeRABank(d, k, n_slots, dtype, f.U.device)
