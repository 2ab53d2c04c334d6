"""The SVD factor cache: the top `r_max` singular triplets of every target weight.

W0 = U S Vᵀ + rest, with U: d×r_max, S: r_max, V: k×r_max, computed by a full float32 SVD (a randomized
SVD was 5–10% off on the top singular values of SmolLM2's flat spectrum, and an adapter trained on one set
of factors is wrong on another). Canonical signs make the factors, and so adapter files, portable: for
every i, the entry of largest magnitude in column u_i is positive (u_i and v_i flip together).

The cache is one safetensors file per (weights fingerprint, r_max, targets) key. Its metadata records the
key and a sha256 of the tensor bytes; a file whose key or checksum does not match is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)
CACHE_FORMAT = "svdserve-factors/1"


@dataclass(frozen=True)
class LayerFactors:
    """Top-r_max SVD factors of one weight. U: [d, r_max], S: [r_max] (descending), V: [k, r_max]."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    def to(self, device, dtype=None) -> "LayerFactors":
        return LayerFactors(*(t.to(device=device, dtype=dtype) for t in (self.U, self.S, self.V)))


def canonical_svd(weight: torch.Tensor, r_max: int) -> LayerFactors:
    """Top-r_max factors of `weight` (float32 full SVD) with the canonical sign convention."""
    w = weight.detach().to(torch.float32)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    U, S, V = U[:, :r_max], S[:r_max], Vh[:r_max].T
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U[pivot, torch.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return LayerFactors(U=(U * signs).contiguous(), S=S.contiguous(), V=(V * signs).contiguous())


def cache_key(fingerprint: str, r_max: int, targets: list[str]) -> str:
    h = hashlib.sha256(f"{fingerprint}|{r_max}|{','.join(targets)}".encode()).hexdigest()
    return h[:16]


def cache_path(cache_dir: str, fingerprint: str, r_max: int, targets: list[str]) -> str:
    """The cache file of one (weights, r_max, targets) key."""
    return os.path.join(cache_dir, f"factors-{cache_key(fingerprint, r_max, targets)}.safetensors")


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compute_factors(targets: dict[str, nn.Linear], r_max: int, progress: bool = True) -> dict[str, LayerFactors]:
    """SVD of every target weight; `r_max` is clipped to each layer's min(d, k)."""
    out = {}
    for name, mod in tqdm(targets.items(), desc="SVD factors", unit="layer", disable=not progress):
        out[name] = canonical_svd(mod.weight.detach().cpu(), min(r_max, *mod.weight.shape))
    return out


def _flatten(factors: dict[str, LayerFactors]) -> dict[str, torch.Tensor]:
    flat = {}
    for name, f in factors.items():
        flat[f"{name}.U"], flat[f"{name}.S"], flat[f"{name}.V"] = f.U, f.S, f.V
    return flat


def _write_atomic(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_cache(path: str, key: str, targets: list[str]) -> dict[str, LayerFactors] | None:
    """The cached factors, or None (with a logged reason) if the file is missing, stale or corrupt."""
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                log.warning("factor cache %s is stale; rebuilding", path)
                return None
            flat = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as exc:  # a truncated or garbled file: safetensors raises various errors
        log.warning("factor cache %s is unreadable (%s); rebuilding", path, exc)
        return None
    expected = {f"{t}.{p}" for t in targets for p in "USV"}
    if set(flat) != expected or _checksum(flat) != meta.get("sha256"):
        log.warning("factor cache %s is corrupt; rebuilding", path)
        return None
    return {t: LayerFactors(flat[f"{t}.U"], flat[f"{t}.S"], flat[f"{t}.V"]) for t in targets}


def load_or_build_factors(
    targets: dict[str, nn.Linear],
    fingerprint: str,
    r_max: int,
    cache_dir: str | None,
    progress: bool = True,
) -> dict[str, LayerFactors]:
    """Factors of every target (float32, CPU), from `cache_dir` when a valid cache exists there."""
    names = list(targets)
    key = cache_key(fingerprint, r_max, names)
    path = cache_path(cache_dir, fingerprint, r_max, names) if cache_dir else None
    if path:
        cached = _read_cache(path, key, names)
        if cached is not None:
            return cached
    factors = compute_factors(targets, r_max, progress)
    if path:
        flat = _flatten(factors)
        meta = {"format": CACHE_FORMAT, "key": key, "fingerprint": fingerprint, "r_max": str(r_max),
                "sha256": _checksum(flat)}
        _write_atomic(path, flat, meta)
    return factors


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "svdserve", "factors")
