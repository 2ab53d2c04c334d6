"""The adapter file: round trip, and every bad file refused with its own message."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save

from adapters.file import FORMAT, AdapterFormatError, parse_adapter, read_adapter, write_adapter
from adapters.synthetic import random_adapter


@pytest.fixture
def spec(tiny_adapted):
    return tiny_adapted.spec


@pytest.fixture
def good(spec, tiny_factors):
    return random_adapter("osora", spec, tiny_factors, 8, seed=0)


def raw(tensors, **meta):
    base = {"format": FORMAT, "method": "osora", "rank": "8"}
    base.update({k: v for k, v in meta.items() if v is not None})
    for k in [k for k, v in meta.items() if v is None]:
        base.pop(k, None)
    return save(tensors, metadata=base)


@pytest.mark.parametrize("method", ["osora", "loraxs", "sorsa", "vera", "lora"])
def test_round_trip(tmp_path, spec, tiny_factors, method):
    a = random_adapter(method, spec, tiny_factors, 4, seed=1, alpha=8.0)
    path = tmp_path / "a.safetensors"
    write_adapter(a, str(path))
    b = read_adapter(str(path), spec)
    assert (b.method, b.rank, b.alpha, b.base_fingerprint) == (method, 4, 8.0, spec.fingerprint)
    assert b.tensors().keys() == a.tensors().keys()
    for n, t in a.tensors().items():
        assert torch.equal(b.tensors()[n], t)


def test_peft_prefix_is_stripped(spec, good):
    tensors = {"base_model.model." + n: t for n, t in good.tensors().items()}
    a = parse_adapter(raw(tensors), spec)
    assert set(a.layers) == set(good.layers)


def _bad_cases(good, spec):
    t = good.tensors()
    name = next(iter(t))
    first_module = next(iter(good.layers))
    nan = dict(t)
    nan[name] = t[name].clone()
    nan[name][0] = float("nan")
    inf = dict(t)
    inf[name] = t[name].clone()
    inf[name][-1] = float("inf")
    wrong = dict(t)
    wrong[f"{first_module}.osora_O"] = torch.ones(3)
    extra = dict(t)
    extra["model.layers.9.self_attn.q_proj.osora_S"] = torch.ones(8)
    missing = {n: v for n, v in t.items() if n != f"{first_module}.osora_O"}
    ints = dict(t)
    ints[name] = torch.ones(8, dtype=torch.int64)
    header = json.dumps({"__metadata__": {"format": FORMAT}}).encode()
    return [
        ("pickle", pickle.dumps({"w": [1.0, 2.0]}), "not a safetensors file"),
        ("empty", b"", "not a safetensors file"),
        ("truncated", raw(t)[:-10], "bad safetensors file"),
        ("header not json", struct.pack("<Q", 4) + b"\xff\xfe{}", "header is not JSON"),
        ("header too long", struct.pack("<Q", 1 << 40) + b"{}", "header length exceeds"),
        ("no format", raw(t, format=None), "'format' must be"),
        ("unknown method", raw(t, method="dora"), "unknown adapter method 'dora'"),
        ("bad rank", raw(t, rank="zero"), "'rank' must be a positive integer"),
        ("bad alpha", raw(t, alpha="lots"), "'alpha' is not a number"),
        ("rank above r_max", raw({}, rank=str(spec.r_max + 1)), f"exceeds this server's max rank r_max={spec.r_max}"),
        ("nan", raw(nan), "contains NaN or Inf"),
        ("inf", raw(inf), "contains NaN or Inf"),
        ("wrong shape", raw(wrong), "has shape [3], expected"),
        ("unknown module", raw(extra), "is not an adapted layer of the base model"),
        ("missing param", raw(missing), "needs tensors"),
        ("not a float", raw(ints), "is not floating point"),
        ("foreign param", raw({f"{first_module}.lora_A.weight": torch.ones(8, 4)}), "is not a osora parameter"),
        ("no layers", raw({}), "the adapter has no layer tensors"),
        ("no method", struct.pack("<Q", len(header)) + header, "unknown adapter method None"),
        ("fingerprint", raw(t, base_fingerprint="0123456789abcdef"), "is not this server's base model"),
    ]


def test_every_bad_file_is_refused_with_its_own_message(good, spec):
    seen = set()
    for label, data, expected in _bad_cases(good, spec):
        with pytest.raises(AdapterFormatError) as err:
            parse_adapter(data, spec)
        assert expected in str(err.value), (label, str(err.value))
        seen.add(str(err.value))
    assert len(seen) >= 15


def test_rank_above_r_max_refused(spec, tiny_factors):
    big = random_adapter("loraxs", spec, tiny_factors, 4, seed=0)
    big.rank = spec.r_max + 1
    with pytest.raises(AdapterFormatError, match="exceeds this server's max rank"):
        parse_adapter(big.to_bytes(), spec)


def test_vera_needs_projections(spec, tiny_factors):
    a = random_adapter("vera", spec, tiny_factors, 4, seed=0)
    a.glob = {}
    with pytest.raises(AdapterFormatError, match="needs top-level tensors"):
        parse_adapter(a.to_bytes(), spec)


def test_same_adapter_same_bytes(spec, tiny_factors):
    """One adapter, one sha256: the store versions adapters by it."""
    a = random_adapter("vera", spec, tiny_factors, 4, seed=0, alpha=3.0)
    assert len({a.to_bytes() for _ in range(10)}) == 1


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value_named_in_any_dtype(good, spec, dtype, bad):
    """The finite check reads the raw bytes (exponent bits): every dtype, the tensor named, whichever tensor of
    the file holds it, next to tensors of other dtypes."""
    t = good.tensors()
    names = sorted(t)
    victim = names[len(names) // 2]
    mixed = {n: t[n].to(FLOAT_DTYPES[i % 4]) for i, n in enumerate(names)}  # neighbours of every dtype
    mixed[victim] = t[victim].to(dtype)
    mixed[victim][-1] = bad
    with pytest.raises(AdapterFormatError, match="contains NaN or Inf") as err:
        parse_adapter(raw(mixed), spec)
    assert victim in str(err.value)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_extreme_finite_values_accepted(good, spec, dtype):
    """The largest and smallest finite values (and subnormals, zeros) of each dtype are not NaN or Inf."""
    t = good.tensors()
    name = next(n for n in t if n.endswith("osora_O"))
    info = torch.finfo(dtype)
    edge = t[name].to(dtype)
    edge[:6] = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, 0.0, -0.0], dtype=dtype)
    a = parse_adapter(raw({**t, name: edge}), spec)
    module, _, param = name.rpartition(".")
    assert torch.equal(a.layers[module][param], edge)
