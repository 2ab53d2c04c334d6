"""The adapter file: one safetensors file, read, written and validated here.

Tensor names are `<module>.<param>` (a leading `base_model.model.` from PEFT is stripped); VeRA's shared
projections are the top-level `vera_A` and `vera_B`. `__metadata__` holds `format`
(`svdserve-adapter/1`), `method`, `rank`, and optionally `base_fingerprint`, `alpha`, `description`.

Parsing never unpickles: the header is read as JSON and the tensors by safetensors. Every check raises
`AdapterFormatError` naming the problem, so the server can answer a 400 that says what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.methods import REGISTRY, get_method

FORMAT = "svdserve-adapter/1"
PEFT_PREFIX = "base_model.model."
GLOBAL_TENSORS = ("vera_A", "vera_B")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER = 100_000_000


class AdapterFormatError(ValueError):
    """An adapter file that cannot be served; the message says why."""


@dataclass
class Adapter:
    """A parsed, validated adapter. layers: module -> param -> tensor (CPU)."""

    method: str
    rank: int
    layers: dict[str, dict[str, torch.Tensor]]
    glob: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None
    base_fingerprint: str | None = None
    description: str | None = None

    @property
    def scale(self) -> float:
        return get_method(self.method).scale(self.rank, self.alpha)

    def metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "method": self.method, "rank": str(self.rank)}
        if self.alpha is not None:
            meta["alpha"] = repr(float(self.alpha))
        if self.base_fingerprint:
            meta["base_fingerprint"] = self.base_fingerprint
        if self.description:
            meta["description"] = self.description
        return meta

    def tensors(self) -> dict[str, torch.Tensor]:
        flat = {f"{m}.{p}": t.contiguous() for m, ps in self.layers.items() for p, t in ps.items()}
        flat.update({n: t.contiguous() for n, t in self.glob.items()})
        return flat

    def to_bytes(self) -> bytes:
        """The file's bytes; deterministic (safetensors writes its metadata in hash order, so the header is
        re-serialized with sorted keys: the same adapter always has the same sha256, hence one version)."""
        data = st_save(self.tensors(), metadata=self.metadata())
        (n,) = struct.unpack("<Q", data[:8])
        header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # keep the data section 8-byte aligned, as safetensors does
        return struct.pack("<Q", len(header)) + header + data[8 + n :]

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass(frozen=True)
class BaseSpec:
    """What validation needs to know of the base model."""

    shapes: dict[str, tuple[int, int]]  # module -> (d, k)
    r_max: int
    fingerprint: str


def _header(data: bytes) -> dict:
    if len(data) < 8:
        raise AdapterFormatError("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise AdapterFormatError("not a safetensors file: header length exceeds the file size")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFormatError("not a safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise AdapterFormatError("bad safetensors header: not a JSON object")
    return header


def _metadata(header: dict) -> dict[str, str]:
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise AdapterFormatError("bad header: __metadata__ is not an object of strings")
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(f"bad header: metadata 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("method") not in REGISTRY:
        raise AdapterFormatError(
            f"unknown adapter method {meta.get('method')!r}; known: {', '.join(sorted(REGISTRY))}"
        )
    try:
        rank = int(meta.get("rank", ""))
        assert rank >= 1
    except (ValueError, AssertionError):
        raise AdapterFormatError(f"bad header: 'rank' must be a positive integer, got {meta.get('rank')!r}") from None
    if "alpha" in meta:
        try:
            float(meta["alpha"])
        except ValueError:
            raise AdapterFormatError(f"bad header: 'alpha' is not a number: {meta['alpha']!r}") from None
    return meta


def _tensors(data: bytes, header: dict) -> dict[str, torch.Tensor]:
    for name, info in header.items():
        if name != "__metadata__" and (not isinstance(info, dict) or info.get("dtype") not in FLOAT_DTYPES):
            raise AdapterFormatError(f"tensor {name!r} is not floating point (F32, F16, BF16)")
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise AdapterFormatError(f"bad safetensors file: {exc}") from None
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise AdapterFormatError(f"tensor {name!r} contains NaN or Inf")
    return tensors


def _split(tensors: dict[str, torch.Tensor], method: str, spec: BaseSpec):
    params = set(get_method(method).layer_shapes(1, 1, 1))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    glob: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in GLOBAL_TENSORS:
            glob[name] = t
            continue
        name = name.removeprefix(PEFT_PREFIX)
        param = next((p for p in params if name.endswith("." + p)), None)
        if param is None:
            raise AdapterFormatError(f"tensor {name!r} is not a {method} parameter ({', '.join(sorted(params))})")
        module = name[: -len(param) - 1]
        if module not in spec.shapes:
            raise AdapterFormatError(f"module {module!r} is not an adapted layer of the base model")
        layers.setdefault(module, {})[param] = t
    return layers, glob


def _check_shapes(a: Adapter, spec: BaseSpec) -> None:
    m = get_method(a.method)
    if m.uses_factors and a.rank > spec.r_max:
        raise AdapterFormatError(f"rank {a.rank} exceeds this server's max rank r_max={spec.r_max}")
    if not a.layers:
        raise AdapterFormatError("the adapter has no layer tensors")
    for module, ps in a.layers.items():
        d, k = spec.shapes[module]
        want = m.layer_shapes(d, k, a.rank)
        if set(ps) != set(want):
            raise AdapterFormatError(f"module {module!r} needs tensors {sorted(want)}, got {sorted(ps)}")
        for p, shape in want.items():
            if tuple(ps[p].shape) != shape:
                raise AdapterFormatError(
                    f"tensor '{module}.{p}' has shape {list(ps[p].shape)}, expected {list(shape)}")
    gwant = m.global_shapes({mod: spec.shapes[mod] for mod in a.layers}, a.rank)
    if set(a.glob) != set(gwant):
        raise AdapterFormatError(f"{a.method} needs top-level tensors {sorted(gwant)}, got {sorted(a.glob)}")
    for n, want_shape in gwant.items():
        # a projection may be wider than the layers it is used for (PEFT slices it per layer)
        t = a.glob[n]
        if t.dim() != 2 or any(have < want for have, want in zip(t.shape, want_shape)) or (
            t.shape[0 if n == "vera_A" else 1] != a.rank
        ):
            raise AdapterFormatError(f"tensor {n!r} has shape {list(t.shape)}, expected {list(want_shape)}")


def parse_adapter(data: bytes, spec: BaseSpec) -> Adapter:
    """Parse and validate adapter file bytes against the base model; raises AdapterFormatError."""
    header = _header(data)
    meta = _metadata(header)
    fp = meta.get("base_fingerprint")
    if fp and fp != spec.fingerprint:
        raise AdapterFormatError(
            f"base_fingerprint {fp!r} is not this server's base model ({spec.fingerprint!r})")
    tensors = _tensors(data, header)
    layers, glob = _split(tensors, meta["method"], spec)
    adapter = Adapter(method=meta["method"], rank=int(meta["rank"]), layers=layers, glob=glob,
                      alpha=float(meta["alpha"]) if "alpha" in meta else None,
                      base_fingerprint=fp, description=meta.get("description"))
    _check_shapes(adapter, spec)
    if adapter.alpha is not None and not math.isfinite(adapter.alpha):
        raise AdapterFormatError("bad header: 'alpha' is not finite")
    return adapter


def read_adapter(path: str, spec: BaseSpec) -> Adapter:
    with open(path, "rb") as f:
        return parse_adapter(f.read(), spec)


def write_adapter(adapter: Adapter, path: str) -> None:
    """Write atomically: temporary file, fsync, rename."""
    data = adapter.to_bytes()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def peek_metadata(data: bytes) -> dict[str, str]:
    """The metadata of a file, checked only for being ours (used by `inspect`)."""
    return _metadata(_header(data))
