"""`python -m adapters` as subprocesses on real files: a tiny random Llama saved to disk, PEFT directories,
adapter files; one end-to-end run of `factors` on the default model."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from adapters.base_model import from_module
from adapters.cli import main
from adapters.factors import compute_factors
from adapters.file import BaseSpec, read_adapter, write_adapter
from adapters.runtime import AdaptedModel
from adapters.synthetic import random_adapter

from .conftest import tiny_llama

IDS = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(9))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapters", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """The tiny random Llama saved like a real local model: weights, config and a word-level tokenizer."""
    path = tmp_path_factory.mktemp("tiny-model")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny():
    base = from_module(tiny_llama())
    factors = compute_factors(base.targets, 64, progress=False)  # what --max-rank 64 builds
    return BaseSpec(shapes=base.shapes(), r_max=64, fingerprint=base.fingerprint), factors


def logits(adapter, factors) -> torch.Tensor:
    adapted = AdaptedModel(from_module(tiny_llama()), factors, n_slots=2)
    adapted.load(1, adapter)
    with torch.no_grad(), adapted.use(adapted.batch([1] * IDS.shape[0])):
        return adapted.model(IDS).logits


def test_factors_builds_then_loads(model_dir, tmp_path):
    first = cli("factors", "--model", model_dir, "--cache-dir", str(tmp_path / "cache"))
    second = cli("factors", "--model", model_dir, "--cache-dir", str(tmp_path / "cache"))
    assert first.returncode == 0, first.stderr
    assert "built in" in first.stdout and "loaded from cache in" in second.stdout, second.stdout
    assert "SVD factors" in first.stderr  # the progress bar


def test_import_then_inspect_peft_lora(model_dir, tiny, tmp_path):
    spec, factors = tiny
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    out = tmp_path / "imported.safetensors"
    done = cli("import", str(tmp_path / "peft"), "-o", str(out), "--model", model_dir,
               "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    adapter = read_adapter(str(out), spec)
    assert (adapter.method, adapter.rank, adapter.alpha) == ("lora", 4, 16.0)
    with torch.no_grad():
        torch.testing.assert_close(logits(adapter, factors), peft_model.eval()(IDS).logits, atol=1e-4, rtol=0)

    shown = cli("inspect", str(out))
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"method:\s+lora", shown.stdout) and re.search(r"modules:\s+4 \(q_proj, up_proj\)", shown.stdout)
    assert f"fingerprint: {spec.fingerprint}" in shown.stdout
    assert f"{out.stat().st_size:,} on disk" in shown.stdout


def test_export_loads_in_peft(model_dir, tiny, tmp_path):
    spec, factors = tiny
    adapter = random_adapter("osora", spec, factors, rank=8, seed=1)
    write_adapter(adapter, str(tmp_path / "a.safetensors"))
    done = cli("export", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "peft"), "--model", model_dir,
               "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "PEFT LoRA r=8" in done.stdout
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, logits(adapter, factors), atol=1e-4, rtol=0)


def test_import_refuses_osora_checkpoint_of_other_factors(model_dir, tiny, tmp_path):
    spec, factors = tiny
    ckpt = {}
    for module, (d, k) in spec.shapes.items():
        key = f"base_model.model.{module}"
        ckpt |= {f"{key}.osora_S": torch.ones(4), f"{key}.osora_O": torch.ones(d),
                 f"{key}.osora_U.weight": torch.linalg.qr(torch.randn(d, 4))[0].contiguous(),  # not the model's U
                 f"{key}.osora_V.weight": factors[module].V[:, :4].T.contiguous()}
    save_file(ckpt, tmp_path / "osora.safetensors")
    done = cli("import", str(tmp_path / "osora.safetensors"), "-o", str(tmp_path / "x.safetensors"),
               "--model", model_dir, "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 1
    assert "differ from the base model's SVD factors" in done.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_inspect_refuses_bad_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    done = cli("inspect", str(tmp_path / "bad.safetensors"))
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {tmp_path / 'bad.safetensors'}: not a safetensors file: the header is not JSON"


# In-process: the same validation messages for files that are wrong in other ways.
BAD_FILES = [
    ("wrong-format", {"w.lora_A.weight": torch.ones(2, 3)}, {"format": "peft"}, "metadata 'format'"),
    ("unknown-method", {"m.x": torch.ones(2)}, {"format": "svdserve-adapter/1", "method": "ia3", "rank": "2"},
     "unknown adapter method 'ia3'"),
    ("shape", {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 3)},
     {"format": "svdserve-adapter/1", "method": "lora", "rank": "2"}, r"'m.lora_B.weight' has shape \[4, 3\]"),
    ("nan", {"m.osora_S": torch.tensor([1.0, float("nan")]), "m.osora_O": torch.ones(3)},
     {"format": "svdserve-adapter/1", "method": "osora", "rank": "2"}, "NaN or Inf"),
    ("missing", {"m.sorsa_A": torch.ones(2, 3)}, {"format": "svdserve-adapter/1", "method": "sorsa", "rank": "2"},
     "needs tensors"),
]


@pytest.mark.parametrize("name,tensors,meta,message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_inspect_validation_messages(tmp_path, capsys, name, tensors, meta, message):
    save_file(tensors, tmp_path / "f.safetensors", metadata=meta)
    assert main(["inspect", str(tmp_path / "f.safetensors")]) == 1
    assert re.search(message, capsys.readouterr().err)


def test_inspect_good_file_in_process(tiny, tmp_path, capsys):
    spec, factors = tiny
    write_adapter(random_adapter("vera", spec, factors, rank=4, seed=0), str(tmp_path / "v.safetensors"))
    assert main(["inspect", str(tmp_path / "v.safetensors")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"rank:\s+4", out) and "vera_A [4, 96]" in out and "modules:     14" in out


def test_train_is_delegated(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    assert "usage: python -m adapters train" in capsys.readouterr().out


@pytest.mark.e2e
def test_factors_on_default_model(tmp_path):
    cache = str(tmp_path / "cache")
    first, second = cli("factors", "--cache-dir", cache), cli("factors", "--cache-dir", cache)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "built in" in first.stdout and "loaded from cache in" in second.stdout
    assert "210 layers" in first.stdout  # SmolLM2-135M: 30 layers × 7 targets
    print(first.stdout, second.stdout, sep="\n")
