"""LoRA (PEFT): Δy = (α/r) · B A x, with the adapter's own A (r×k) and B (d×r).

Every LoRA tenant carries its own matrices, so a mixed batch runs one small matmul pair per distinct
adapter (grouped, as LoRA servers do) — the cost the SVD methods avoid.
"""

from __future__ import annotations

from adapters.methods.base import AdapterBatch, GroupedBank, Method, register


class LoRABank(GroupedBank):
    method = "lora"

    def load(self, slot, p, f, rank, scale, glob):
        a = p["lora_A.weight"].to(self.device, self.dtype)
        b = (scale * p["lora_B.weight"].float()).to(self.device, self.dtype)
        self.slots[slot] = (a, b)

    def group_delta(self, x, slot):
        a, b = self.slots[slot]
        return (x @ a.T) @ b.T

    def delta(self, x, z, U, batch: AdapterBatch):
        return self.grouped(x, batch)


@register
class LoRA(Method):
    name = "lora"
    uses_factors = False

    def layer_shapes(self, d, k, r):
        return {"lora_A.weight": (r, k), "lora_B.weight": (d, r)}

    def dense_delta(self, p, f, r, scale, glob):
        return scale * p["lora_B.weight"].float() @ p["lora_A.weight"].float()

    def new_bank(self, d, k, f, n_slots, dtype):
        return LoRABank(d, dtype, f.U.device)
