"""The adapter file: one safetensors file, read, written and validated here.

Tensor names are `<module>.<param>` (a leading `base_model.model.` from PEFT is stripped); VeRA's shared
projections are the top-level `vera_A` and `vera_B`. `__metadata__` holds `format`
(`svdserve-adapter/1`), `method`, `rank`, and optionally `base_fingerprint`, `alpha`, `description`.

Parsing never unpickles: the header is read as JSON and checked here, entry by entry (types, dtypes,
shapes, offsets against the bytes actually there), before safetensors reads the tensors. Every check raises
`AdapterFormatError` naming the problem, so the server can answer a 400 that says what is wrong; no other
exception escapes `parse_adapter`, whatever the bytes (tests/adapters/test_file_fuzz.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.methods import REGISTRY, get_method

FORMAT = "svdserve-adapter/1"
PEFT_PREFIX = "base_model.model."
GLOBAL_TENSORS = ("vera_A", "vera_B")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER = 100_000_000  # bytes; safetensors' own limit
MAX_RANK = 2**31 - 1
MAX_DIMS = 8  # adapter tensors have 1 or 2; more is refused before torch sees it
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
# little-endian word of each dtype and its exponent bits (all ones: Inf or NaN)
EXPONENT_BITS = {"F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80),
                 "F64": ("<u8", 0x7FF0000000000000)}
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 control characters


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


def _show(value: object, limit: int = 80) -> str:
    """A value for an error message: its repr, cut short (a header can hold megabytes in one string)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: object) -> str:
    """The JSON type of a parsed header value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false parse as bool, an int


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:  # json keeps the last, other readers the first: refuse rather than guess
            raise AdapterFormatError(f"bad safetensors header: key {_show(key)} appears twice")
        obj[key] = value
    return obj


def _no_constant(name: str) -> object:
    raise AdapterFormatError(f"not a safetensors file: the header is not JSON ({name} is not a JSON value)")


def _header(data: bytes) -> dict:
    """The header, as JSON, checked only for being an object; refused before anything the size of a number
    in the file is allocated (the length prefix is checked against the bytes actually there)."""
    if len(data) < 8:
        raise AdapterFormatError("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise AdapterFormatError("not a safetensors file: header length exceeds the file size")
    try:
        text = data[8 : 8 + n].decode("utf-8")  # strict: json.loads would guess UTF-16/32 from bytes
    except UnicodeDecodeError:
        raise AdapterFormatError("not a safetensors file: the header is not JSON (not valid UTF-8)") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError:  # the exact message is what `svdserve inspect` prints (tests/adapters/test_cli.py)
        raise AdapterFormatError("not a safetensors file: the header is not JSON") from None
    except RecursionError:
        raise AdapterFormatError("not a safetensors file: the header is not JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer literal longer than int()'s digit limit
        if isinstance(exc, AdapterFormatError):
            raise
        raise AdapterFormatError(f"not a safetensors file: the header is not JSON ({_show(str(exc))})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError("bad safetensors header: not a JSON object")
    return header


def _text(value: str, what: str) -> str:
    """A header string that is real text: JSON may escape a lone surrogate ("\\ud800"), which Python keeps
    and every UTF-8 encoder (database, log, HTTP response) later chokes on."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterFormatError(f"bad header: {what} is not valid Unicode text (a lone surrogate)") from None
    return value


def _metadata(header: dict) -> dict[str, str]:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise AdapterFormatError(
            f"bad header: __metadata__ is not an object of strings, got {_kind(meta)}")
    for key, value in meta.items():
        _text(key, f"metadata key {_show(key)}")
        if not isinstance(value, str):
            raise AdapterFormatError(
                f"bad header: metadata {_show(key)} must be a string, got {_kind(value)}: {_show(value)}")
        _text(value, f"metadata {_show(key)}")
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(
            f"bad header: metadata 'format' must be {FORMAT!r}, got {_show(meta.get('format'))}")
    if meta.get("method") not in REGISTRY:
        raise AdapterFormatError(
            f"unknown adapter method {_show(meta.get('method'))}; known: {', '.join(sorted(REGISTRY))}")
    rank = meta.get("rank", "")
    # ASCII digits only (int() would also take " 8", "+8", "8_0", "٨"), and short enough to be an int
    if not (rank.isascii() and rank.isdigit() and len(rank) <= 10 and 1 <= int(rank) <= MAX_RANK):
        raise AdapterFormatError(
            f"bad header: metadata 'rank' must be a positive integer (at most {MAX_RANK}), got {_show(rank)}")
    if "alpha" in meta:
        try:
            alpha = float(meta["alpha"])
        except ValueError:
            raise AdapterFormatError(f"bad header: metadata 'alpha' is not a number: {_show(meta['alpha'])}") from None
        if not math.isfinite(alpha):
            raise AdapterFormatError(f"bad header: metadata 'alpha' is not finite: {_show(meta['alpha'])}")
    return meta


def _entries(header: dict, data_len: int) -> list[tuple[int, int, str, str]]:
    """Every tensor entry checked before the safetensors library sees the file: a float dtype, a shape of
    at most MAX_DIMS non-negative ints, data_offsets inside the data section matching shape × dtype, the
    entries packed one after another over the whole data section (as safetensors itself requires)."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _text(name, f"tensor name {_show(name)}")
        if CONTROL.search(name):
            raise AdapterFormatError(f"bad header: tensor name {_show(name)} contains a control character")
        if not isinstance(info, dict):
            raise AdapterFormatError(f"bad header: tensor {_show(name)} is not an object, got {_kind(info)}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise AdapterFormatError(f"bad header: tensor {_show(name)} has no {', '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in FLOAT_DTYPES:
            raise AdapterFormatError(
                f"tensor {_show(name)} is not floating point (F32, F16, BF16, F64): dtype {_show(dtype)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(_is_int(s) and 0 <= s < 2**63 for s in shape)):
            raise AdapterFormatError(
                f"bad header: tensor {_show(name)} shape must be a list of at most {MAX_DIMS} non-negative "
                f"integers, got {_show(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise AdapterFormatError(
                f"bad header: tensor {_show(name)} data_offsets must be [begin, end] integers, got {_show(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise AdapterFormatError(
                f"bad safetensors file: tensor {_show(name)} data_offsets {_show(offsets)} are outside the "
                f"{data_len}-byte data section")
        size = DTYPE_SIZES[dtype] * math.prod(shape)
        if end - begin != size:
            raise AdapterFormatError(
                f"bad safetensors file: tensor {_show(name)} data_offsets {_show(offsets)} span {end - begin} "
                f"bytes, but shape {shape} of {dtype} needs {size}")
        spans.append((begin, end, name, dtype))
    spans.sort()
    at = 0
    for begin, end, name, _ in spans:
        if begin != at:
            what = "overlaps another tensor" if begin < at else "leaves a gap before it"
            raise AdapterFormatError(f"bad safetensors file: tensor {_show(name)} data_offsets {what}")
        at = end
    if at != data_len:
        raise AdapterFormatError(
            f"bad safetensors file: the tensors cover {at} of the {data_len}-byte data section")
    return spans


def _tensors(data: bytes, header: dict) -> dict[str, torch.Tensor]:
    (n,) = struct.unpack("<Q", data[:8])
    spans = _entries(header, len(data) - 8 - n)
    _check_finite(data, 8 + n, spans)
    try:
        return st_load(data)
    except Exception as exc:  # the checks above should leave nothing for it to refuse; its word, if any
        raise AdapterFormatError(f"bad safetensors file: {_show(str(exc), 300)}") from None


def _check_finite(data: bytes, base: int, spans: list[tuple[int, int, str, str]]) -> None:
    """Raise naming a tensor that holds NaN or Inf, read from the raw bytes (`base`: where the data section
    starts; `spans`: (begin, end, name, dtype) in file order, packed). A value is NaN or Inf exactly when its
    exponent bits are all ones. Adjacent tensors of one dtype are checked together with numpy (one pass over a
    typical file, single-threaded, the GIL released): a check per tensor, hundreds of them, cost more than the
    rest of parsing, in a worker thread that holds the GIL while the engine decodes."""
    runs: list[list[tuple[int, int, str, str]]] = []
    for span in spans:
        if runs and runs[-1][-1][3] == span[3]:
            runs[-1].append(span)
        else:
            runs.append([span])
    for run in runs:
        if not _finite(data, base + run[0][0], base + run[-1][1], run[0][3]):
            name = next(n for b, e, n, dt in run if not _finite(data, base + b, base + e, dt))
            raise AdapterFormatError(f"tensor {_show(name)} contains NaN or Inf")


def _finite(data: bytes, begin: int, end: int, dtype: str) -> bool:
    word, exponent = EXPONENT_BITS[dtype]
    bits = np.frombuffer(data, dtype=word, count=(end - begin) // DTYPE_SIZES[dtype], offset=begin)
    return not np.any((bits & exponent) == exponent)


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
            raise AdapterFormatError(
                f"tensor {_show(name)} is not a {method} parameter ({', '.join(sorted(params))})")
        module = name[: -len(param) - 1]
        if module not in spec.shapes:
            raise AdapterFormatError(f"module {_show(module)} is not an adapted layer of the base model")
        if param in layers.get(module, {}):  # both `m.p` and `base_model.model.m.p`
            raise AdapterFormatError(f"tensor {_show(name)} appears twice (with and without {PEFT_PREFIX!r})")
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
    """Parse and validate adapter file bytes against the base model.

    For any bytes at all, this returns a valid Adapter or raises AdapterFormatError naming the problem
    (tests/adapters/test_file_fuzz.py holds it to that); nothing is allocated by a size the file claims."""
    if not isinstance(data, bytes):
        data = bytes(data)  # bytearray, memoryview
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
