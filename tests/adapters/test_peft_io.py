"""PEFT import and export against PEFT itself, on a tiny random Llama: logits must agree."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import save_file

from adapters.base_model import from_module
from adapters.exporter import export_peft_lora
from adapters.factors import compute_factors
from adapters.file import BaseSpec
from adapters.importers import AdapterImportError, import_adapter, vera_projections
from adapters.runtime import AdaptedModel
from adapters.synthetic import random_adapter

from .conftest import R_MAX, tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def tiny():
    """(spec, factors) of the tiny base; every test builds its own model copies from the same seed."""
    base = from_module(tiny_llama())
    factors = compute_factors(base.targets, R_MAX, progress=False)
    return BaseSpec(shapes=base.shapes(), r_max=R_MAX, fingerprint=base.fingerprint), factors


def our_logits(adapter, factors) -> torch.Tensor:
    adapted = AdaptedModel(from_module(tiny_llama()), factors, n_slots=2)
    adapted.load(1, adapter)
    with torch.no_grad(), adapted.use(adapted.batch([1] * IDS.shape[0])):
        return adapted.model(IDS).logits


def peft_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def base_logits() -> torch.Tensor:
    with torch.no_grad():
        return tiny_llama()(IDS).logits


def randomize(model, names: tuple[str, ...], seed: int) -> None:
    """PEFT initialises lora_B / vera_lambda_b to zero: make every adapter tensor random and non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---- import ---------------------------------------------------------------------------------------------
LORA_CASES = [
    ("all-modules", dict(r=4, lora_alpha=8, target_modules=ALL)),
    ("rslora", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    ("one-layer", dict(r=2, lora_alpha=2, target_modules=["down_proj", "k_proj"], layers_to_transform=[1])),
    ("rank-pattern", dict(r=4, lora_alpha=8, target_modules=ALL, rank_pattern={"v_proj": 2, "mlp.down_proj": 6},
                          alpha_pattern={"q_proj": 3})),
]


@pytest.mark.parametrize("name,kwargs", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_import_peft_lora_matches_peft(tiny, tmp_path, name, kwargs):
    spec, factors = tiny
    peft_model = get_peft_model(tiny_llama(), LoraConfig(**kwargs)).eval()
    randomize(peft_model, ("lora_A", "lora_B"), seed=1)
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = import_adapter(str(tmp_path / "peft"), spec)
    assert adapter.method == "lora" and adapter.base_fingerprint == spec.fingerprint
    ranks = [kwargs["r"], *kwargs.get("rank_pattern", {}).values()]
    assert adapter.rank == max(ranks)
    ours, theirs = our_logits(adapter, factors), peft_logits(peft_model)
    assert not torch.allclose(theirs, base_logits(), atol=1e-3)  # the adapter does change the model
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("save_projection", [False, True])
def test_import_peft_vera_matches_peft(tiny, tmp_path, save_projection):
    spec, factors = tiny
    config = VeraConfig(r=8, target_modules=ALL, save_projection=save_projection, projection_prng_key=123)
    peft_model = get_peft_model(tiny_llama(), config).eval()
    randomize(peft_model, ("vera_lambda",), seed=2)
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = import_adapter(str(tmp_path / "peft"), spec)
    assert adapter.method == "vera" and adapter.rank == 8
    torch.testing.assert_close(adapter.glob["vera_A"], peft_model.base_model.vera_A["default"])
    torch.testing.assert_close(our_logits(adapter, factors), peft_logits(peft_model), atol=1e-4, rtol=0)


def test_vera_projections_follow_peft_generator():
    """Same generator, same draw order, same bounds as PEFT's own initialisation."""
    from peft.tuners.vera.model import _kaiming_init

    g = torch.Generator().manual_seed(7)
    want_a, want_b = _kaiming_init((4, 96), generator=g), _kaiming_init((64, 4), generator=g)
    a, b = vera_projections(7, 4, [(64, 64), (32, 96)])
    assert torch.equal(a, want_a) and torch.equal(b, want_b)


REFUSED = [
    ("dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "DoRA"),
    ("bias", LoraConfig(r=2, target_modules=["q_proj"], bias="all"), "bias='all'"),
    ("modules-to-save", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    ("lm-head", LoraConfig(r=2, target_modules=["q_proj", "lm_head"]), "target module 'lm_head' is not an adapted layer"),
    ("vera-bias", VeraConfig(r=2, target_modules=["q_proj"], bias="all"), "bias='all'"),
]


@pytest.mark.parametrize("name,config,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_import_refuses_what_svdserve_cannot_serve(tiny, tmp_path, name, config, message):
    spec, _ = tiny
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterImportError, match=message):
        import_adapter(str(tmp_path / "peft"), spec)


def test_import_refuses_another_base_model(tiny, tmp_path):
    spec, _ = tiny
    bigger = spec.shapes | {"model.layers.0.self_attn.q_proj": (128, 64)}
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "p")
    with pytest.raises(AdapterImportError, match="do not fit a 128×64 layer"):
        import_adapter(str(tmp_path / "p"), BaseSpec(bigger, spec.r_max, spec.fingerprint))


def test_import_refuses_pickled_weights(tiny, tmp_path):
    spec, _ = tiny
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "p", safe_serialization=False)
    with pytest.raises(AdapterImportError, match="pickled adapter_model.bin"):
        import_adapter(str(tmp_path / "p"), spec)


# ---- OSoRA checkpoints ----------------------------------------------------------------------------------
def osora_checkpoint(spec, factors, r: int, flip: bool = False, transpose: bool = False, wrong_u: bool = False,
                     flip_v_only: bool = False) -> dict[str, torch.Tensor]:
    """A PEFT-style OSoRA state dict built from our factors: U as an nn.Linear(r, d) weight [d, r], V as an
    nn.Linear(k, r) weight [r, k] (or both transposed)."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for module, (d, k) in spec.shapes.items():
        f = factors[module]
        u, v = f.U[:, :r].clone(), f.V[:, :r].clone()
        signs = torch.where(torch.arange(r) % 2 == 1, -1.0, 1.0) if flip or flip_v_only else torch.ones(r)
        u = u if flip_v_only else u * signs
        v = v * signs
        if wrong_u:
            u = torch.linalg.qr(torch.randn(d, r, generator=g))[0]
        key = f"base_model.model.{module}"
        out[f"{key}.osora_S"] = f.S[:r] * (1 + 0.2 * torch.randn(r, generator=g))
        out[f"{key}.osora_O"] = 1 + 0.2 * torch.randn(d, generator=g)
        out[f"{key}.osora_U.weight"] = (u.T if transpose else u).contiguous()
        out[f"{key}.osora_V.weight"] = (v if transpose else v.T).contiguous()
    return out


@pytest.mark.parametrize("flip,transpose", [(False, False), (True, False), (True, True)])
def test_import_osora_checkpoint(tiny, tmp_path, flip, transpose):
    spec, factors = tiny
    ckpt = osora_checkpoint(spec, factors, r=6, flip=flip, transpose=transpose)
    save_file(ckpt, tmp_path / "osora.safetensors")
    adapter = import_adapter(str(tmp_path / "osora.safetensors"), spec, factors)
    assert adapter.method == "osora" and adapter.rank == 6
    module = "model.layers.1.mlp.up_proj"
    assert set(adapter.layers[module]) == {"osora_S", "osora_O"}
    assert torch.equal(adapter.layers[module]["osora_S"], ckpt[f"base_model.model.{module}.osora_S"])
    assert torch.equal(adapter.layers[module]["osora_O"], ckpt[f"base_model.model.{module}.osora_O"])


@pytest.mark.parametrize("kind,message", [
    ("wrong_u", "differ from the base model's SVD factors"),
    ("flip_v_only", "opposite signs"),
])
def test_import_osora_refuses_other_factors(tiny, tmp_path, kind, message):
    spec, factors = tiny
    save_file(osora_checkpoint(spec, factors, r=6, **{kind: True}), tmp_path / "bad.safetensors")
    with pytest.raises(AdapterImportError, match=message):
        import_adapter(str(tmp_path / "bad.safetensors"), spec, factors)


def test_import_osora_refuses_rank_above_cache(tiny, tmp_path):
    spec, factors = tiny
    save_file(osora_checkpoint(spec, factors, r=6), tmp_path / "c.safetensors")
    with pytest.raises(AdapterImportError, match="exceeds the factor cache's max rank 4"):
        import_adapter(str(tmp_path / "c.safetensors"), BaseSpec(spec.shapes, 4, spec.fingerprint), factors)


# ---- export ---------------------------------------------------------------------------------------------
EXPORT_CASES = [
    ("osora", 6, None, None),
    ("loraxs", 4, 8.0, None),
    ("sorsa", 4, 2.0, None),
    ("vera", 8, None, None),
    ("lora", 4, 12.0, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
    ("lora", 3, None, None),
]


@pytest.mark.parametrize("method,rank,alpha,modules", EXPORT_CASES, ids=[f"{c[0]}-r{c[1]}" for c in EXPORT_CASES])
def test_export_loads_in_peft_with_same_logits(tiny, tmp_path, method, rank, alpha, modules):
    spec, factors = tiny
    adapter = random_adapter(method, spec, factors, rank=rank, seed=11, alpha=alpha, modules=modules)
    export_peft_lora(adapter, spec, factors, str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == (2 * rank if method == "sorsa" else rank)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")).eval()
    ours = our_logits(adapter, factors)
    assert not torch.allclose(ours, base_logits(), atol=1e-3)
    torch.testing.assert_close(peft_logits(peft_model), ours, atol=1e-4, rtol=0)


def test_export_then_import_round_trip(tiny, tmp_path):
    spec, factors = tiny
    adapter = random_adapter("osora", spec, factors, rank=5, seed=4)
    export_peft_lora(adapter, spec, factors, str(tmp_path / "out"))
    back = import_adapter(str(tmp_path / "out"), spec)
    assert back.method == "lora" and back.rank == 5 and back.alpha == 5.0
    assert os.path.isfile(tmp_path / "out" / "adapter_model.safetensors")
    torch.testing.assert_close(our_logits(back, factors), our_logits(adapter, factors), atol=1e-4, rtol=0)
