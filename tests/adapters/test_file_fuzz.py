"""Every bad adapter file is a clear AdapterFormatError (a 400), never another exception (a 500).

`parse_adapter` is fed random bytes, mutated valid files and a table of hand-made bad files, one or more per
class of problem: the length prefix, the header text, the metadata, the tensor entries. Whatever it is given,
it returns a valid Adapter or raises AdapterFormatError with a short message that names the problem.
Hypothesis runs derandomized, so a failure here fails the same way everywhere.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.base_model import from_module
from adapters.factors import compute_factors
from adapters.file import FORMAT, Adapter, AdapterFormatError, BaseSpec, parse_adapter
from adapters.methods import REGISTRY
from adapters.synthetic import random_adapter
from tests.adapters.conftest import R_MAX, tiny_llama

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])
META_KEYS = ("format", "method", "rank", "base_fingerprint", "alpha", "description")


# ---- a tiny base model and a few valid files, built once (hypothesis reruns a test body, not fixtures) ----
def _build():
    base = from_module(tiny_llama())
    factors = compute_factors(base.targets, R_MAX, progress=False)
    spec = BaseSpec(shapes=base.shapes(), r_max=R_MAX, fingerprint=base.fingerprint)
    two = list(spec.shapes)[:2]  # two layers keep the files small, so mutations land everywhere
    files = [random_adapter("osora", spec, factors, 4, seed=0, modules=two).to_bytes(),
             random_adapter("vera", spec, factors, 2, seed=1, modules=two, alpha=4.0).to_bytes(),
             random_adapter("lora", spec, factors, 2, seed=2, modules=two[:1], alpha=2.0).to_bytes()]
    return spec, files


SPEC, VALID = _build()


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict | str | bytes, body: bytes = b"") -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)  # ensure_ascii: a lone surrogate goes out as the escape "\ud800"
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header)) + header + body


def check(data: bytes) -> Adapter | AdapterFormatError:
    """The property: an Adapter that round-trips, or an AdapterFormatError with a short, printable message."""
    try:
        adapter = parse_adapter(data, SPEC)
    except AdapterFormatError as exc:
        msg = str(exc)
        assert msg and len(msg) < 1200, msg[:2000]
        msg.encode("utf-8")  # no lone surrogate: the message goes into a JSON response and the logs
        return exc
    assert adapter.method in REGISTRY and adapter.rank >= 1
    assert adapter.alpha is None or math.isfinite(adapter.alpha)
    for t in adapter.tensors().values():
        assert t.dtype.is_floating_point and torch.isfinite(t).all()
    again = parse_adapter(adapter.to_bytes(), SPEC)  # what was accepted can be written and read back
    assert again.tensors().keys() == adapter.tensors().keys()
    return adapter


def test_valid_files_parse():
    for data in VALID:
        assert isinstance(check(data), Adapter)


# ---- 1. random bytes -----------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    check(data)


@FUZZ
@given(st.binary(max_size=256), st.binary(max_size=64), st.integers(-8, 8))
def test_random_bytes_behind_a_plausible_length(header, body, skew):
    """Random bytes get past the length check only rarely; here the prefix is about right."""
    check(struct.pack("<Q", max(0, len(header) + skew)) + header + body)


# ---- 2. valid files, mutated ---------------------------------------------------------------------------
surrogate_text = st.text(alphabet=st.characters() | st.sampled_from(["\ud800", "\udfff", "\x00", "\n"]),
                         max_size=12)
json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([10**400, -(10**30)])
             | st.floats(allow_nan=True, allow_infinity=True) | surrogate_text
             | st.sampled_from(["8", "0", "-1", "1e400", "nan", "inf", "", FORMAT, "osora", "vera", "F32", "I64"]))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(surrogate_text, inner, max_size=4), max_leaves=8)
number_text = (st.integers(-(2**70), 2**70).map(str) | st.floats().map(repr)
               | st.sampled_from(["", " 4", "+4", "4_0", "٤", "0x4", "4.0", "1e3", "nan", "-inf", "9" * 5000]))


@st.composite
def edited_header(draw, data: bytes) -> bytes:
    """A valid file with its header JSON edited: metadata values, tensor entries, names."""
    header, body = split(data)
    for _ in range(draw(st.integers(1, 3))):
        names = [n for n in header if n != "__metadata__"] or ["x"]
        what = draw(st.sampled_from(["meta", "meta_number", "meta_drop", "meta_all", "dtype", "shape",
                                     "offsets", "entry", "rename", "add"]))
        meta = header.get("__metadata__")
        meta = meta if isinstance(meta, dict) else {}
        if what == "meta":
            meta[draw(st.sampled_from(META_KEYS) | surrogate_text)] = draw(json_value)
        elif what == "meta_number":
            meta[draw(st.sampled_from(["rank", "alpha"]))] = draw(number_text)
        elif what == "meta_drop" and meta:
            meta.pop(draw(st.sampled_from(sorted(meta))))
        elif what == "meta_all":
            header["__metadata__"] = draw(json_value)
            continue
        elif what == "rename":
            name = draw(st.sampled_from(names))
            new = draw(st.sampled_from(["base_model.model." + name, name + "\x00", "\ud800" + name, ""])
                       | surrogate_text)
            header[new] = header.pop(name, None)
        elif what == "add":
            header[draw(surrogate_text)] = draw(json_value)
        else:
            entry = header.get(draw(st.sampled_from(names)))
            if isinstance(entry, dict):
                if what == "dtype":
                    entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL"]) | json_value)
                elif what == "shape":
                    entry["shape"] = draw(st.lists(st.integers(-2, 2**64), max_size=10) | json_value)
                elif what == "offsets":
                    entry["data_offsets"] = draw(st.lists(st.integers(-2, len(body) + 64) | st.just(2**64),
                                                          max_size=3) | json_value)
                else:
                    entry.clear()
                    entry.update(draw(st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
                                                      json_value, max_size=4)))
        header["__metadata__"] = meta
    text = json.dumps(header, ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8", "surrogatepass")  # unescaped surrogates: bytes that are not UTF-8
    raw += b" " * draw(st.integers(0, 7))
    return join(raw, body)


@st.composite
def mutated(draw) -> bytes:
    """A valid file (its header perhaps edited), then byte-level damage: flips in the header or the data,
    truncation, insertion, deletion, a new length prefix."""
    data = draw(st.sampled_from(VALID))
    if draw(st.booleans()):
        data = draw(edited_header(data))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        n = struct.unpack("<Q", bytes(buf[:8]))[0] if len(buf) >= 8 else 0
        body = 8 + n if 8 + n < len(buf) else 0
        op = draw(st.sampled_from(["flip_header", "flip_body", "flip_body", "flip", "truncate", "insert",
                                   "delete", "prefix"]))
        lo, hi = {"flip_header": (8, 8 + n), "flip_body": (body, len(buf))}.get(op, (0, len(buf)))
        at = draw(st.integers(lo, max(lo, min(hi, len(buf)) - 1)))
        if op.startswith("flip") and at < len(buf):
            buf[at] ^= draw(st.sampled_from([0x80, 0x7F, 0xFF, 0x01]) | st.integers(1, 255))
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[at : at + draw(st.integers(1, 16))]
        elif op == "prefix" and len(buf) >= 8:
            buf[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 8), n + 8)))
    return bytes(buf)


DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@st.composite
def consistent_file(draw) -> bytes:
    """A well-formed safetensors file of random tensors: mostly the right module.param names of some method
    with their right shapes, some wrong or foreign ones; float dtypes, offsets that fit, random data (NaN and
    Inf included), metadata sometimes off. It gets past the container checks, so what is fuzzed is the
    method, module, rank and shape checks."""
    method = draw(st.sampled_from(sorted(REGISTRY)))
    m = REGISTRY[method]
    rank = draw(st.integers(1, 5) | st.sampled_from([R_MAX, R_MAX + 1, 2**31 - 1]))
    meta = {"format": FORMAT, "method": method, "rank": str(rank), "base_fingerprint": SPEC.fingerprint}
    if draw(st.integers(0, 3)) == 0:
        meta[draw(st.sampled_from(META_KEYS))] = draw(number_text | st.sampled_from(sorted(REGISTRY)) | surrogate_text)
    modules = draw(st.lists(st.sampled_from(list(SPEC.shapes)), min_size=1, max_size=3, unique=True))
    want = {}
    for mod in modules:
        d, k = SPEC.shapes[mod]
        prefix = draw(st.sampled_from(["", "", "base_model.model."]))
        want.update({f"{prefix}{mod}.{p}": s for p, s in m.layer_shapes(d, k, min(rank, 100)).items()})
    want.update(m.global_shapes({mod: SPEC.shapes[mod] for mod in modules}, min(rank, 100)))
    dims = st.sampled_from([0, 1, 2, 32, 64, 96]) | st.integers(0, 100)
    tensors = []
    for name, shape in want.items():
        how = draw(st.integers(0, 9))
        if how == 0:
            continue  # a missing tensor
        if how == 1:
            shape = tuple(draw(st.lists(dims, max_size=3)))
        tensors.append((name, list(shape)))
    for name in draw(st.lists(st.sampled_from(["vera_A", "vera_B", "x"]) | surrogate_text, max_size=1)):
        tensors.append((name, draw(st.lists(dims, max_size=2))))
    header: dict = {"__metadata__": meta}
    body = b""
    for name, shape in tensors:
        dtype = draw(st.sampled_from(sorted(DTYPE_BYTES)))
        size = DTYPE_BYTES[dtype] * math.prod(shape)
        if size > 2**20:
            continue
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + size]}
        body += draw(st.binary(min_size=size, max_size=size)) if size <= 32 else bytes(size)
    return join(header, body)


@FUZZ
@given(consistent_file())
def test_consistent_random_files(data):
    check(data)


@FUZZ
@given(mutated())
def test_mutated_valid_files(data):
    check(data)


@FUZZ
@given(st.sampled_from(VALID).flatmap(edited_header))
def test_valid_files_with_edited_headers(data):
    check(data)


@FUZZ
@given(json_value | st.dictionaries(st.sampled_from(["__metadata__", "vera_A"]) | surrogate_text, json_value,
                                    max_size=4), st.binary(max_size=32))
def test_any_json_as_the_header(header, body):
    check(join(json.dumps(header), body))


# ---- 3. one hand-made file per class of problem, each refused with a message naming it --------------------
def _edit(fn, base: bytes | None = None) -> bytes:
    header, body = split(base or VALID[0])
    fn(header)
    return join(header, body)


def _meta(**kv):
    def fn(h):
        h["__metadata__"].update(kv)
        for k in [k for k, v in kv.items() if v is _DROP]:
            h["__metadata__"].pop(k)
    return _edit(fn)


_DROP = object()
NAME = next(n for n in split(VALID[0])[0] if n != "__metadata__")  # first tensor, at offset 0 or not
FIRST = min((n for n in split(VALID[0])[0] if n != "__metadata__"),
            key=lambda n: split(VALID[0])[0][n]["data_offsets"][0])
BODY = len(split(VALID[0])[1])


def _entry(name=NAME, **kv):
    return _edit(lambda h: h[name].update(kv))


def _edit_text(old: str, new: str, fn) -> bytes:
    """As _edit, then a textual replacement in the header (for JSON that json.dumps does not write)."""
    header, body = split(VALID[0])
    fn(header)
    return join(json.dumps(header).replace(old, new), body)


def _overlap(h: dict) -> None:
    other = next(n for n in h if n not in ("__metadata__", FIRST))
    begin, end = h[other]["data_offsets"]
    h[other]["data_offsets"] = [0, end - begin]


def _shifted(by: int) -> bytes:
    """Every tensor moved `by` bytes on, with `by` zero bytes before them: a gap at the start."""
    header, body = split(VALID[0])
    for name, e in header.items():
        if name != "__metadata__":
            e["data_offsets"] = [o + by for o in e["data_offsets"]]
    return join(header, b"\0" * by + body)


def _deep(n: int, open_: str, close: str) -> bytes:
    return join(open_ * n + close * n)


CASES = [
    # the length prefix
    ("empty", b"", "shorter than its 8-byte header length"),
    ("short prefix", b"\x08\x00\x00", "shorter than its 8-byte header length"),
    ("huge prefix", struct.pack("<Q", 2**60) + b"{}", "header length exceeds the file size"),
    ("max prefix", struct.pack("<Q", 2**64 - 1) + b"{}" * 8, "header length exceeds the file size"),
    ("prefix beyond data", struct.pack("<Q", 3) + b"{}", "header length exceeds the file size"),
    ("zero prefix", struct.pack("<Q", 0) + b"{}", "header is not JSON"),
    # the header text
    ("not utf-8", join(b'{"a": "\xff"}'), "not valid UTF-8"),
    ("utf-16", join('{"__metadata__": {}}'.encode("utf-16")), "not valid UTF-8"),
    ("unescaped surrogate", join('{"\ud800": 1}'.encode("utf-8", "surrogatepass")), "not valid UTF-8"),
    ("not json", join(b"{not json"), "header is not JSON"),
    ("trailing garbage", join(b"{} {}"), "header is not JSON"),
    ("NaN literal", join(b'{"__metadata__": NaN}'), "NaN is not a JSON value"),
    ("Infinity literal", join(b'{"a": [-Infinity]}'), "Infinity is not a JSON value"),
    ("json list", join(b"[]"), "not a JSON object"),
    ("json number", join(b"1"), "not a JSON object"),
    ("json string", join(b'"{}"'), "not a JSON object"),
    ("json null", join(b"null"), "not a JSON object"),
    ("nested lists 1e5", _deep(10**5, "[", "]"), "nested too deeply"),
    ("nested objects 1e5", join('{"a":' * 10**5 + "1" + "}" * 10**5), "nested too deeply"),
    ("int literal 5000 digits", join(b'{"a": ' + b"9" * 5000 + b"}"), "header is not JSON"),
    ("duplicate key", join(b'{"a": 1, "a": 2}'), "key 'a' appears twice"),
    ("duplicate metadata key", join(b'{"__metadata__": {"rank": "1", "rank": "2"}}'), "key 'rank' appears twice"),
    ("1e400 shape", _edit_text('"@"', "[1e400]", lambda h: h[NAME].update(shape="@")), "shape must be a list"),
    ("1e400 offset", _edit_text('"@"', "[0, 1e400]", lambda h: h[NAME].update(data_offsets="@")),
     "data_offsets must be [begin, end] integers"),
    ("10**400 offsets", _edit(lambda h: h[NAME].update(data_offsets=[0, 10**400])), "outside the"),
    # __metadata__ itself
    ("no metadata", _edit(lambda h: h.pop("__metadata__")), "metadata 'format' must be"),
    *[(f"metadata {v!r}", _edit(lambda h, v=v: h.update(__metadata__=v)), "__metadata__ is not an object")
      for v in ([], ["format"], "x", 1, 1.5, None, True, False)],
    ("metadata key surrogate", _meta(**{"\ud800": "x"}), "metadata key '\\ud800' is not valid Unicode"),
    ("metadata extra non-string", _meta(extra=1), "metadata 'extra' must be a string, got a number"),
    # every metadata key: the wrong JSON type, and a lone surrogate
    *[(f"{key} {_v!r}", _meta(**{key: _v}), f"metadata '{key}' must be a string, got {kind}")
      for key in META_KEYS
      for _v, kind in (([1], "a list"), ({"a": "b"}, "an object"), (8, "a number"), (8.5, "a number"),
                       (None, "null"), (True, "a boolean"), (False, "a boolean"), ([], "a list"), ({}, "an object"))],
    *[(f"{key} surrogate", _meta(**{key: "a\ud800b"}), f"metadata '{key}' is not valid Unicode text")
      for key in META_KEYS],
    ("wrong format", _meta(format="svdserve-adapter/2"), "metadata 'format' must be 'svdserve-adapter/1'"),
    ("unknown method", _meta(method="dora"), "unknown adapter method 'dora'"),
    ("no rank", _meta(rank=_DROP), "metadata 'rank' must be a positive integer"),
    *[(f"rank {r!r}" if len(r) <= 24 else f"rank of {len(r)} digits", _meta(rank=r),
       "metadata 'rank' must be a positive integer")
      for r in ("zero", "", "-1", "0", "00", "1.5", "4.0", "1e3", " 4", "4 ", "+4", "4_0", "٤", "0x4", "nan",
                str(2**31), str(2**64), str(2**64 + 1), "9" * 40, "9" * 5000)],
    ("rank above r_max", _meta(rank=str(R_MAX + 1)), "exceeds this server's max rank"),
    *[(f"alpha {a!r}", _meta(alpha=a), "metadata 'alpha' is not a number") for a in ("lots", "", "1,5", "0x10")],
    *[(f"alpha {a!r}", _meta(alpha=a), "metadata 'alpha' is not finite")
      for a in ("nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400")],
    ("fingerprint", _meta(base_fingerprint="0123456789abcdef"), "is not this server's base model"),
    # tensor entries
    *[(f"entry {v!r}", _edit(lambda h, v=v: h.update({NAME: v})), "is not an object")
      for v in ([], "F32", 1, None, True)],
    *[(f"no {k}", _edit(lambda h, k=k: h[NAME].pop(k)), f"has no {k}") for k in ("dtype", "shape", "data_offsets")],
    *[(f"dtype {d!r}", _entry(dtype=d), "is not floating point")
      for d in ("I64", "U8", "BOOL", "F8_E4M3", "f32", "FLOAT", "", ["F32"], {"F32": 1}, None, 4, True, "F\ud800")],
    *[(f"shape {s!r}", _entry(shape=s), "shape must be a list of at most 8 non-negative integers")
      for s in ("4", 4, None, {"0": 4}, [-1], [4.0], [1.5], [True], ["4"], [None], [[4]], [2**63], [2**64],
                [10**400], [1] * 9)],
    *[(f"offsets {o!r}", _entry(data_offsets=o), "data_offsets must be [begin, end] integers")
      for o in ([0], [0, 16, 32], "0,16", None, 16, [0.0, 16.0], [False, True], [0, "16"], [[0], [16]])],
    *[(f"offsets {o!r}", _entry(data_offsets=o), "outside the")
      for o in ([-1, 15], [16, 0], [0, BODY + 1], [0, 2**64], [2**63, 2**63 + 16], [0, 10**400])],
    ("offsets not shape x dtype", _entry(FIRST, shape=[3]), "needs 12"),
    ("offsets not dtype size", _entry(FIRST, dtype="F64"), "of F64 needs"),
    ("shape claims 2**124 bytes", _entry(FIRST, shape=[2**62, 2**62]), "needs"),
    ("offsets overlap", _edit(_overlap), "overlaps another tensor"),
    ("offsets leave a gap", _shifted(8), "leaves a gap"),
    ("trailing data", join(split(VALID[0])[0], split(VALID[0])[1] + b"\0" * 8), "cover"),
    ("truncated data", VALID[0][:-10], "bad safetensors file"),
    *[(f"name {c!r}", _edit(lambda h, c=c: h.update({NAME + c: h.pop(NAME)})), "contains a control character")
      for c in ("\x00", "\n", "\t", "\x1b", "\x7f", "\x85", "\x9f")],
    ("name surrogate", _edit(lambda h: h.update({NAME + "\udc00": h.pop(NAME)})), "tensor name"),
]


def test_cases_are_distinct():
    labels = [label for label, _, _ in CASES]
    assert len(labels) == len(set(labels))
    assert len(CASES) > 150


@pytest.mark.parametrize("label,data,expected", CASES, ids=[c[0].encode("unicode_escape").decode() for c in CASES])
def test_bad_file_refused_with_message(label, data, expected):
    with pytest.raises(AdapterFormatError) as err:
        parse_adapter(data, SPEC)
    assert expected in str(err.value), (label, str(err.value))
    check(data)  # and the message is short and printable


def test_name_twice_with_and_without_prefix():
    """Two tensors that are one parameter once PEFT's prefix is stripped: refused, not one silently kept."""
    header, body = split(VALID[0])
    name = FIRST
    t = header[name]
    size = t["data_offsets"][1] - t["data_offsets"][0]
    header["base_model.model." + name] = dict(t, data_offsets=[len(body), len(body) + size])
    data = join(header, body + body[t["data_offsets"][0] : t["data_offsets"][1]])
    with pytest.raises(AdapterFormatError, match="appears twice"):
        parse_adapter(data, SPEC)


@pytest.mark.parametrize("data", [
    struct.pack("<Q", 2**60) + b"{}",
    _entry(FIRST, shape=[2**40, 2**40]),
    _entry(FIRST, data_offsets=[0, 2**60]),
    join(b'{"a": [' + b"[" * 10**5 + b"]"),
], ids=["header length", "shape", "offsets", "nesting"])
def test_claimed_sizes_allocate_nothing(data):
    """A number in the file is never a size to allocate: refused having used memory of the order of the
    file itself (tracemalloc sees Python's allocations, json's included)."""
    tracemalloc.start()
    try:
        with pytest.raises(AdapterFormatError):
            parse_adapter(data, SPEC)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data) + 2**20, peak


def test_bytearray_and_memoryview():
    assert isinstance(parse_adapter(bytearray(VALID[0]), SPEC), Adapter)
    assert isinstance(parse_adapter(memoryview(VALID[1]), SPEC), Adapter)
