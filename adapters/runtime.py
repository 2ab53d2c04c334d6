"""Serving adapters on a live model: adapter-aware linear layers, resident slots, merge and restore.

`AdaptedModel` replaces every target nn.Linear of the base model by an `AdaptedLinear` that keeps W0
intact (a row with no adapter is exactly the base model) and adds, per row, the delta of that row's
adapter. Adapters live in numbered slots (slot 0 = none) of per-layer banks on the device.

The per-row slot reaches the layers as an explicit `AdapterBatch`: either passed to
`AdaptedLinear.forward(x, batch)` by our own model code, or, for code that calls a Hugging Face forward
(training, tests against PEFT), installed for the duration of a `with adapted.use(batch):` block.

Merging (`merge`) writes W0 + ΔW into the weights when one adapter holds the whole batch; `unmerge`
copies the pristine weights back (never a float subtraction), so restore is bit-exact.

Loading is split in two so that the engine thread, which every running stream waits on, does almost nothing:
`prepare` (any thread, no model state touched) lays an OSoRA adapter out as its whole row of the slot table in
the serving dtype — a `SlotImage` — and `load` of an image is one row copy (per-layer loading of an OSoRA
adapter cost ~5 ms of 630 small operators on the engine thread, every stream stalled meanwhile). Other
methods, and OSoRA layers outside the table, load layer by layer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.base_model import BaseModel
from adapters.factors import LayerFactors
from adapters.file import Adapter, BaseSpec
from adapters.fused import FusedLinear, input_groups
from adapters.methods import AdapterBatch, Bank, get_method

BATCH_CACHE = 4  # batch objects kept for reuse (each holds its rows of the OSoRA slot table)
SERIAL_CHUNK = 16384  # elements per operator of a row copy: below torch's parallel grain (32768)
LAYOUTS_KEPT = 8  # `prepare` index plans kept, one per (layers, rank) of the adapters seen


@dataclass(frozen=True, eq=False)
class SlotImage:
    """An adapter prepared for a slot (AdaptedModel.prepare). `row`: for an OSoRA adapter whose layers all
    live in the slot table, its whole table row [P] on the device in the serving dtype; None: the adapter is
    loaded layer by layer."""

    adapter: Adapter
    row: torch.Tensor | None


class AdaptedLinear(nn.Linear):
    """nn.Linear with W0 kept intact plus per-row adapter deltas. Same weight/bias parameters as the
    layer it replaces, so module names and state dicts are unchanged."""

    def __init__(self, linear: nn.Linear, factors: LayerFactors):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.U, self.S, self.V = factors.U, factors.S, factors.V  # on device, serving dtype
        self.banks: dict[str, Bank] = {}
        self.active: AdapterBatch | None = None  # set only inside AdaptedModel.use()
        self.fused = None  # the FusedLinear serving this layer with its input-sharing siblings

    def bank(self, method: str, n_slots: int) -> Bank:
        if method not in self.banks:
            f = LayerFactors(self.U, self.S, self.V)
            self.banks[method] = get_method(method).new_bank(
                self.out_features, self.in_features, f, n_slots, self.weight.dtype)
        return self.banks[method]

    def forward(self, x: torch.Tensor, batch: AdapterBatch | None = None) -> torch.Tensor:
        # x: [B, T, k] or [B, k]; row b uses the adapter in slot batch.slots[b]
        y = F.linear(x, self.weight, self.bias)
        batch = batch if batch is not None else self.active
        if batch is None or batch.empty:
            return y
        z = U = None
        if batch.rank:
            z = x @ self.V[:, : batch.rank]  # shared by every tenant: [B, T, r]
            U = self.U[:, : batch.rank]
        for method in batch.methods:
            bank = self.banks.get(method)
            if bank is not None:
                y = y + bank.delta(x, z, U, batch)
        return y


class AdaptedModel:
    """The base model with adapter-aware target layers and `n_slots - 1` resident adapter slots."""

    def __init__(self, base: BaseModel, factors: dict[str, LayerFactors], n_slots: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, kernels: bool = True,
                 kernel_dir: str | None = None):
        self.base, self.n_slots = base, n_slots
        self.device, self.dtype = torch.device(device), dtype
        self.model = base.model.to(device=self.device, dtype=dtype)
        self.factors = factors  # float32, CPU: the reference and the merge path use these
        self.spec = BaseSpec(shapes=base.shapes(), r_max=min(f.S.shape[0] for f in factors.values()),
                             fingerprint=base.fingerprint)
        self.layers: dict[str, AdaptedLinear] = {}
        for name, linear in base.targets.items():
            layer = AdaptedLinear(linear, factors[name].to(self.device, dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, layer)
            self.layers[name] = layer
        base.targets = dict(self.layers)
        self.resident: list[Adapter | None] = [None] * n_slots
        self.merged: Adapter | None = None
        self._pristine: dict[str, torch.Tensor] | None = None
        self.fused = self._fuse()
        self._columns = self._table_columns()
        self._layouts: OrderedDict[tuple, tuple[np.ndarray, ...]] = OrderedDict()  # prepare's index plans
        self._layout_lock = threading.Lock()
        self._version = 0  # bumped whenever what a slot serves changes (load, unload, merge)
        self._batches: OrderedDict[tuple, AdapterBatch] = OrderedDict()  # recent batch objects (LRU)
        self.kernels = None  # why the compiled OSoRA kernel serves or does not (`use_kernels`)
        self.use_kernels(kernels, kernel_dir)

    def _fuse(self) -> list[FusedLinear]:
        """Group the target layers by shared input (adapters/fused.py) and give them the slot table."""
        groups, width = [], 0
        for names in input_groups(list(self.layers)):
            members = [self.layers[n] for n in names]
            if len({(m.in_features, m.V.shape[1]) for m in members}) != 1:
                members = members[:1]  # cannot share a matmul; the others stay unfused
            g = FusedLinear(members, width)
            groups.append(g)
            width += g.width
        self.table = torch.zeros(self.n_slots, width, dtype=self.dtype, device=self.device)
        for g in groups:
            g.attach_table(self.table)
        return groups

    def use_kernels(self, wanted: bool, directory: str | None = None) -> None:
        """Serve fused OSoRA updates with the compiled CPU kernel (adapters/kernels; built in `directory` if
        it is the first) when `wanted`, the model is on a CPU in float32 or bfloat16 and the kernel builds;
        else with the torch composition."""
        op, packers = None, None
        if not wanted:
            self.kernels = "off"
        elif self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16):
            self.kernels = f"torch path ({self.device.type}, {str(self.dtype).removeprefix('torch.')})"
        else:
            from adapters import kernels

            op = kernels.osora_apply(directory)
            self.kernels = "cpu kernel" if op is not None else f"torch path ({kernels.unavailable_reason()})"
            if op is not None and self.dtype == torch.bfloat16:
                packers = kernels.amx_packers(directory)
                if packers is not None:
                    self.kernels = "cpu kernel, AMX"
        for g in self.fused:
            g.kernel = op
            # bfloat16 on AMX: U and the Vᵀ rows packed once into the tile unit's layout (U without Ublkᵀ's zeros)
            g.packed = packers[0](g.ublk_t, g.n, g.R, g.sizes) if packers else None
            g.packed_v = packers[1](g.weight[g.D:], g.n, g.R) if packers else None
        self._batches.clear()  # batch objects are built for one path (the torch path's gathers table rows)

    def _table_columns(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For every layer whose OSoRA bank is a view into the slot table: the table columns of its a, c (one
        per component) and o (one per output), read off the views' strides, so they follow the table's layout
        wherever adapters/fused.py puts a layer."""
        cols = {}
        for name, layer in self.layers.items():
            bank = layer.banks.get("osora")
            views = (bank.a, bank.c, bank.o) if bank is not None else ()
            if views and all(_in_table(v, self.table) for v in views):
                cols[name] = tuple(_table_cols(v, self.table) for v in views)
        return cols

    # ---- slots -------------------------------------------------------------------------------------
    def prepare(self, adapter: Adapter) -> SlotImage:
        """`adapter` made ready for `load`, touching no model state (call it in any thread, e.g. the worker
        thread that resolved the adapter). For OSoRA on table layers: its table row, computed as the
        per-layer load computes it (float32, rounded to the serving dtype once). The arithmetic is numpy's
        and the rounding is done in chunks below torch's parallel grain, so a worker thread never starts a
        second OpenMP team beside the engine thread's on the same cores."""
        if adapter.method != "osora" or not adapter.layers or not set(adapter.layers) <= self._columns.keys():
            return SlotImage(adapter, None)
        names = tuple(adapter.layers)
        a_idx, c_idx, o_idx, s_r = self._layout(names, adapter.rank)
        s_new = np.concatenate([adapter.layers[n]["osora_S"].float().numpy() for n in names])
        o = np.concatenate([adapter.layers[n]["osora_O"].float().numpy() for n in names])
        row = np.zeros(self.table.shape[1], dtype=np.float32)
        row[a_idx] = s_new
        row[c_idx] = s_new - s_r
        row[o_idx] = o - np.float32(1.0)
        out = torch.empty(row.shape[0], dtype=self.dtype)
        _serial_copy(out, torch.from_numpy(row))
        return SlotImage(adapter, out.to(self.device))

    def _layout(self, names: tuple[str, ...], rank: int) -> tuple[np.ndarray, ...]:
        """Table columns of a, c and o for an adapter of `rank` over layers `names`, and its S_r values in the
        same order; kept for a few (names, rank) pairs (adapters of one model mostly share one)."""
        key = (names, rank)
        with self._layout_lock:
            hit = self._layouts.get(key)
            if hit is not None:
                self._layouts.move_to_end(key)
                return hit
        cols = [self._columns[n] for n in names]
        plan = (np.concatenate([a[:rank] for a, _, _ in cols]), np.concatenate([c[:rank] for _, c, _ in cols]),
                np.concatenate([o for _, _, o in cols]),
                np.concatenate([self.factors[n].S[:rank].float().numpy() for n in names]))
        with self._layout_lock:
            self._layouts[key] = plan
            while len(self._layouts) > LAYOUTS_KEPT:
                self._layouts.popitem(last=False)
        return plan

    def load(self, slot: int, adapter: Adapter | SlotImage) -> None:
        """Make `adapter` resident in `slot` (1..n_slots-1), replacing whatever was there. An image of
        `prepare` with a table row is one row copy."""
        if not 0 < slot < self.n_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.n_slots - 1}")
        image = adapter if isinstance(adapter, SlotImage) else None
        adapter = image.adapter if image is not None else adapter
        self.unload(slot)
        self._version += 1
        if image is not None and image.row is not None:
            _serial_copy(self.table[slot], image.row)
            self.resident[slot] = adapter
            return
        method = get_method(adapter.method)
        glob = {n: t.float() for n, t in adapter.glob.items()}
        for name, layer in self.layers.items():
            p = adapter.layers.get(name)
            if p is not None:
                layer.bank(adapter.method, self.n_slots).load(
                    slot, p, self.factors[name], adapter.rank, method.scale(adapter.rank, adapter.alpha), glob)
        self.resident[slot] = adapter

    def unload(self, slot: int) -> None:
        old = self.resident[slot]
        if old is None:
            return
        self._version += 1
        if old.method == "osora" and set(old.layers) <= self._columns.keys():
            _serial_copy(self.table[slot], 0.0)  # its whole state is this row (either way it was loaded)
        else:
            for layer in self.layers.values():
                if old.method in layer.banks:
                    layer.banks[old.method].clear(slot)
        self.resident[slot] = None

    def batch(self, slots: list[int]) -> AdapterBatch:
        """The per-step batch object for rows using `slots` (0 = base model). Decode steps mostly repeat
        the previous step's slots: then the earlier object (and its gathered table rows) is reused. A few are
        kept, since a step with a prompt chunk runs two groups (decode rows, prefill rows)."""
        key = (tuple(slots), self._version)
        if self._batches and next(reversed(self._batches))[1] != self._version:
            self._batches.clear()  # the slots changed: every kept object is stale
        batch = self._batches.get(key)
        if batch is not None:
            self._batches.move_to_end(key)
            return batch
        batch = self._batches[key] = self._build_batch(list(slots))
        while len(self._batches) > BATCH_CACHE:
            self._batches.popitem(last=False)
        return batch

    def _build_batch(self, slots: list[int]) -> AdapterBatch:
        if self.merged is not None:
            if any(self.resident[s] is not self.merged for s in slots):
                raise RuntimeError("a merged model can only serve rows of the merged adapter")
            slots = [0] * len(slots)
        t = torch.tensor(slots, dtype=torch.long, device=self.device)
        methods: dict[str, None] = {}
        rank = 0
        groups: dict[str, dict] = {}
        for row, s in enumerate(slots):
            a = self.resident[s]
            if a is None:
                if s != 0:
                    raise KeyError(f"slot {s} holds no adapter")
                continue
            methods[a.method] = None
            if get_method(a.method).uses_factors:
                rank = max(rank, a.rank)
            if a.method in ("lora", "sorsa", "vera"):
                key = s if a.method != "vera" else self._vera_key(s)
                groups.setdefault(a.method, {}).setdefault(key, []).append(row)
        table = rows = None
        if "osora" in methods and self.fused[0].kernel is None:
            # the torch path: each distinct slot's row once (a prompt chunk's tokens share one), then an index.
            # (The kernel reads the slot table itself through the rows' slots: nothing to gather.)
            distinct = sorted(set(slots))
            which = t
            if len(distinct) < len(slots):
                where = {s: i for i, s in enumerate(distinct)}
                rows = torch.tensor([where[s] for s in slots], dtype=torch.long, device=self.device)
                which = torch.tensor(distinct, dtype=torch.long, device=self.device)
            table = self.table.index_select(0, which)
        return AdapterBatch(
            slots=t, methods=tuple(methods), rank=rank,
            groups={m: [(k, torch.tensor(rows, dtype=torch.long, device=self.device)) for k, rows in g.items()]
                    for m, g in groups.items()},
            table=table, table_rows=rows)

    def _vera_key(self, slot: int) -> str:
        for layer in self.layers.values():
            bank = layer.banks.get("vera")
            if bank is not None and slot in bank.slot_proj:
                return bank.slot_proj[slot]
        return ""

    @contextmanager
    def use(self, batch: AdapterBatch | None):
        """Install `batch` on every adapted layer for code that calls the HF forward."""
        for layer in self.layers.values():
            layer.active = batch
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.active = None

    # ---- merge ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter: Adapter) -> None:
        """Write W0 + ΔW into the weights of every layer `adapter` touches."""
        if self.merged is adapter:
            return
        self.unmerge()
        self._version += 1
        if self._pristine is None:
            self._pristine = {n: l.weight.detach().to("cpu", copy=True) for n, l in self.layers.items()}
        method = get_method(adapter.method)
        glob = {n: t.float() for n, t in adapter.glob.items()}
        for name, p in adapter.layers.items():
            w0 = self._pristine[name].to(self.device, torch.float32)
            f = self.factors[name].to(self.device)
            p = {k: v.to(self.device) for k, v in p.items()}
            delta = method.dense_delta(p, f, adapter.rank, adapter.scale, {k: v.to(self.device) for k, v in glob.items()})
            self.layers[name].weight.copy_((w0 + delta).to(self.dtype))
        self.merged = adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Copy the pristine weights back (bit-exact)."""
        if self.merged is None:
            return
        self._version += 1
        for name in self.merged.layers:
            self.layers[name].weight.copy_(self._pristine[name])
        self.merged = None


def _serial_copy(dst: torch.Tensor, src: torch.Tensor | float) -> None:
    """dst[:] = src (1-D) in chunks below torch's parallel grain: a row copy is ~10 us on one thread, but as one
    parallel operator it waited for a second OpenMP thread, milliseconds on a busy 2-core host."""
    for i in range(0, dst.shape[0], SERIAL_CHUNK):
        part = dst[i:i + SERIAL_CHUNK]
        part.fill_(src) if isinstance(src, float) else part.copy_(src[i:i + SERIAL_CHUNK])


def _in_table(view: torch.Tensor, table: torch.Tensor) -> bool:
    """Is `view` a [n_slots, m] view of `table`'s columns (same storage, one table row per slot row)?"""
    return (view.dim() == 2 and view.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
            and view.shape[0] == table.shape[0] and view.stride(0) == table.stride(0))


def _table_cols(view: torch.Tensor, table: torch.Tensor) -> np.ndarray:
    """The table columns of a [n_slots, m] view's m columns."""
    start = view.storage_offset() - table.storage_offset()
    return start + np.arange(view.shape[1], dtype=np.int64) * view.stride(1)


def load_adapted_model(path: str | None, *, r_max: int, cache_dir: str | None, n_slots: int,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       targets: tuple[str, ...] | None = None, progress: bool = True,
                       kernels: bool = True, kernel_dir: str | None = None) -> AdaptedModel:
    """Base model (default: SmolLM2-135M-Instruct) + cached SVD factors + adapter slots, ready to serve."""
    from adapters.base_model import DEFAULT_TARGETS, load_base_model
    from adapters.factors import load_or_build_factors

    base = load_base_model(path, targets or DEFAULT_TARGETS)
    factors = load_or_build_factors(base.targets, base.fingerprint, r_max, cache_dir, progress=progress)
    return AdaptedModel(base, factors, n_slots=n_slots, device=device, dtype=dtype, kernels=kernels,
                        kernel_dir=kernel_dir)
