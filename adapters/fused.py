"""Fused serving of adapted projections that read the same input (q/k/v; gate/up; or one layer alone).

Per decoder layer the unfused mixed path costs ~12 small operators per projection (a Vᵀx matmul, three
per-row gathers, a cat, a U matmul, elementwise ops), 210 projections a step on SmolLM2: the operators'
fixed costs, not their arithmetic, were what separated 32 distinct OSoRA adapters from the base model.
A `FusedLinear` serves its n member projections (out sizes d_j, D = Σ d_j) with

    e = x · W_extᵀ,   W_ext = [W0_1; …; W0_n; Vᵀ rows]       one matmul gives W0·x and z = Vᵀx
    y, z = e[..., :D], e[..., D:]
    Q = (z ⊙ [c; a]) · Ublkᵀ                                  one matmul: U(c ⊙ z) and U(a ⊙ z), all members
    y += Q_c + o ⊙ Q_a                                        (OSoRA: c = S' − S_r, a = S', o = O − 1)

Component-major layout: row D + i·n + j of W_ext is member j's i-th right singular vector, and row i·n + j
of Ublkᵀ holds its left one in member j's output columns (zeros elsewhere), so the first n·r rows of each
are exactly the rank-r factors of every member — a batch of rank r slices a contiguous prefix. The members'
`weight` (and `bias`) become views into W_ext, and their `U`/`V` views into the fused factors, so nothing
is stored twice and merging into a member's weight merges into the fused one.

OSoRA's per-slot vectors of every fused group live in one table [n_slots, P] (the members' OSoRA banks are
views into it). The kernel below reads each row's slot of it directly; the torch path gathers a batch's rows
from it once (`AdapterBatch.table`), not once per layer. The other methods take the members' own banks with
views of the fused z, as `AdaptedLinear` does.

On a CPU the two lines after the first matmul are one call of a compiled kernel (adapters/kernels): per
row it reads its 2·n·rank coefficients and each member's own block of U — not the zeros of Ublkᵀ, two
thirds of it for q/k/v — and rounds into y once, where the torch composition takes five operators and
rounds three intermediates (4–8× less time per group at batch 32). The torch composition serves wherever
the kernel cannot be built, and on CUDA; tests hold both to the same reference.

With no adapter in the batch the forward is `x · W0ᵀ` over the first D rows: exactly the base model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters.methods.base import AdapterBatch
from adapters.methods.osora import OSoRABank

EXPAND_KEPT = 64  # rows up to which a batch keeps its per-row slot-table cuts expanded (decode batches)
# siblings (same parent module) that read the same input in Llama-family decoders
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def input_groups(names: list[str]) -> list[list[str]]:
    """Target layer names grouped by shared input: q/k/v and gate/up of one parent, the rest alone."""
    by_name = set(names)
    groups, taken = [], set()
    for name in names:
        if name in taken:
            continue
        parent, _, child = name.rpartition(".")
        group = [name]
        for siblings in SHARED_INPUT:
            if child in siblings:
                full = [f"{parent}.{s}" if parent else s for s in siblings]
                group = [n for n in full if n in by_name]
                break
        groups.append(group)
        taken.update(group)
    return groups


class FusedLinear:
    """Serves the `members` (AdaptedLinear, same in_features, same input) as one matmul plus one OSoRA
    update. `table` is the model's OSoRA slot table; this group owns columns [offset, offset + width)."""

    def __init__(self, members: list, table_width_offset: int):
        self.members = list(members)
        first = self.members[0]
        self.n = n = len(self.members)
        self.R = R = first.V.shape[1]
        self.k = k = first.in_features
        self.sizes = [m.out_features for m in self.members]
        self.D = D = sum(self.sizes)
        w = first.weight
        device, dtype = w.device, w.dtype
        # W_ext: members' W0 rows, then the component-major Vᵀ rows
        self.weight = torch.empty(D + R * n, k, device=device, dtype=dtype)
        self.ublk_t = torch.zeros(R * n, D, device=device, dtype=dtype)
        vt = self.weight[D:].view(R, n, k)
        ub = self.ublk_t.view(R, n, D)
        has_bias = any(m.bias is not None for m in self.members)
        self.bias = torch.zeros(D + R * n, device=device, dtype=dtype) if has_bias else None
        s = 0
        for j, m in enumerate(self.members):
            e = s + m.out_features
            with torch.no_grad():
                self.weight[s:e].copy_(m.weight)
                vt[:, j].copy_(m.V.T)
                ub[:, j, s:e].copy_(m.U.T)
                m.weight.data = self.weight[s:e]
                if m.bias is not None:
                    self.bias[s:e].copy_(m.bias)
                    m.bias.data = self.bias[s:e]
            m.V = vt[:, j].T  # [k, R] view
            m.U = ub[:, j, s:e].T  # [d_j, R] view
            m.fused = self
            s = e
        self.offset = table_width_offset
        self.width = 2 * R * n + D  # table columns: c (R·n), a (R·n), o (D)
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        self.kernel = None  # the compiled OSoRA update (adapters/kernels), set by the model on a CPU
        self.packed = None  # Ublkᵀ in AMX tiles, where the kernel multiplies bfloat16 on AMX
        self.packed_v = None  # and W_ext's Vᵀ rows: the kernel then computes z = Vᵀx itself

    def attach_table(self, table: torch.Tensor) -> None:
        """Give each member an OSoRA bank whose tensors are views into this group's table columns; the kernel
        reads the group's columns of every slot through `ca_all` [n_slots, 2, R·n] and `o_all` [n_slots, D]."""
        R, n, off = self.R, self.n, self.offset
        self.ca_all = table[:, off: off + 2 * R * n].view(-1, 2, R * n)
        self.o_all = table[:, off + 2 * R * n: off + 2 * R * n + self.D]
        c_all = table[:, off: off + R * n].view(-1, R, n)
        a_all = table[:, off + R * n: off + 2 * R * n].view(-1, R, n)
        s = 0
        for j, m in enumerate(self.members):
            e = s + m.out_features
            o = table[:, off + 2 * R * n + s: off + 2 * R * n + e]
            m.banks["osora"] = OSoRABank.from_views(a=a_all[:, :, j], c=c_all[:, :, j], o=o)
            s = e

    def __call__(self, x: torch.Tensor, batch: AdapterBatch | None) -> torch.Tensor:
        """x: [B, T, k] or [B, k] -> [B, T, D] (members' outputs side by side, in member order)."""
        if batch is None or batch.empty:
            w, b, _ = self._rank_views(0)
            return F.linear(x, w, b)
        D, n, rank = self.D, self.n, batch.rank
        if rank and self.packed_v is not None and batch.methods == ("osora",):
            # AMX: the base model's own matmul, then the kernel computes z = Vᵀx and the update on the tile unit
            w, b, _ = self._rank_views(0)
            y = F.linear(x, w, b)
            self.kernel(y, D, self.ca_all, self.o_all, self.ublk_t, batch.slots, n, rank, self.sizes, self.packed,
                        x if x.is_contiguous() else x.contiguous(), self.packed_v)
            return y
        w, b, u = self._rank_views(rank)
        e = F.linear(x, w, b)
        if not rank:
            return self._others(x, e, None, batch)
        y = e[..., :D]  # e[..., D + i·n + j] = member j's component i of Vᵀx
        if batch.methods == ("osora",) and self.kernel is not None:  # the common case, in one call
            self._kernel_update(e, u, batch)
            return y
        return self._others(x, y, e[..., D:], batch, u, e)

    def _others(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, batch: AdapterBatch,
                u: torch.Tensor | None = None, e: torch.Tensor | None = None) -> torch.Tensor:
        """Every method of the batch, each adding its rows' deltas to y (OSoRA through the slot table). e is the
        fused matmul's whole output, which the kernel takes; y and z are its views."""
        n = self.n
        for method in batch.methods:
            if method == "osora" and self.kernel is not None:
                self._kernel_update(e, u, batch)
                continue
            if method == "osora" and batch.table is not None:
                self._osora(y, z, u, batch)
                continue
            s = 0
            for j, m in enumerate(self.members):
                e_ = s + m.out_features
                bank = m.banks.get(method)
                if bank is not None:
                    zj = None if z is None else z[..., j::n]
                    uj = None if z is None else m.U[:, : batch.rank]
                    y[..., s:e_] += bank.delta(x, zj, uj, batch)
                s = e_
        return y

    def _kernel_update(self, e: torch.Tensor, u: torch.Tensor, batch: AdapterBatch) -> None:
        """The OSoRA update of e's first D columns by the compiled kernel; rows read the slot table through
        their slots."""
        self.kernel(e, self.D, self.ca_all, self.o_all, u, batch.slots, self.n, batch.rank, self.sizes, self.packed)

    def _rank_views(self, rank: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The first D + n·rank rows of W_ext and of the bias, and the first n·rank rows of Ublkᵀ: views
        made once per rank, as every layer of every step asks for the same few."""
        views = self._views.get(rank)
        if views is None:
            rows, rn = self.D + self.n * rank, self.n * rank
            b = None if self.bias is None else self.bias[:rows]
            views = self._views[rank] = (self.weight[:rows], b, self.ublk_t[:rn])
        return views

    def _osora_rows(self, batch: AdapterBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch path's cut of this group's columns from the batch's slot-table rows: ca [B, 2, n·rank]
        (c then a) and o [B, D], a row per batch row. Cut once per batch object (the engine reuses it across
        decode steps while the slots stay) rather than in every step: per layer and step that was a dozen view
        operators. When rows share slots (`batch.table_rows`: a prompt chunk's tokens), the cut is of each
        distinct slot's row, expanded to the rows: kept up to EXPAND_KEPT rows, made at each use above, so a
        long chunk never holds a [tokens, D] copy per group for the whole step."""
        parts = batch.memo.get(self.offset)
        if parts is None:
            R, n, D, off, rn = self.R, self.n, self.D, self.offset, self.n * batch.rank
            t = batch.table  # [B or distinct slots, P]: this batch's rows of the slot table
            ca = t[:, off: off + 2 * R * n].view(-1, 2, R * n)[:, :, :rn].contiguous()
            o = t[:, off + 2 * R * n: off + 2 * R * n + D]
            rows = batch.table_rows
            if rows is not None and rows.shape[0] <= EXPAND_KEPT:
                ca, o, rows = ca.index_select(0, rows), o.index_select(0, rows), None
            parts = batch.memo[self.offset] = (ca, o, rows)
        ca, o, rows = parts
        if rows is not None:
            return ca.index_select(0, rows), o.index_select(0, rows)
        return ca, o

    def _osora(self, y: torch.Tensor, z: torch.Tensor, u: torch.Tensor, batch: AdapterBatch) -> None:
        # the torch composition of y: [B, (T,) D] += U(c ⊙ z) + o ⊙ U(a ⊙ z), both U products in one matmul over
        # 2·B·T rows; u: the first n·rank rows of Ublkᵀ
        ca, o = self._osora_rows(batch)
        rn, D = ca.shape[-1], self.D
        if z.dim() == 3:  # [B, T, rn]
            zz = z.unsqueeze(-2) * ca.unsqueeze(1)  # [B, T, 2, rn]
            o = o.unsqueeze(1)
        else:
            zz = z.unsqueeze(-2) * ca  # [B, 2, rn]
        q = torch.mm(zz.view(-1, rn), u).view(*zz.shape[:-1], D)  # [B, (T,) 2, D]
        y.add_(q[..., 0, :]).addcmul_(o, q[..., 1, :])
