"""What the llama.cpp and transformers-serve baselines need, built once into a work directory:

* `base_hf_dir`: the default model (loaded from its GGUF, as svdserve loads it) saved as a Hugging Face
  directory — config and tokenizer for `convert_lora_to_gguf.py`, the whole model for `transformers serve`;
* `lora_ggufs`: random PEFT LoRA adapters (r=16, the same target modules as svdserve's) exported with PEFT
  and converted with llama.cpp's own `convert_lora_to_gguf.py`, so llama-server serves real PEFT LoRAs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def base_hf_dir(work: Path, model_path: str | None) -> Path:
    out = work / "base-hf"
    if (out / "config.json").exists():
        return out
    from adapters.base_model import load_base_model

    base = load_base_model(model_path)  # drops the GGUF quantization_config, which blocks save_pretrained
    base.model.save_pretrained(out)
    base.tokenizer.save_pretrained(out)
    return out


def find_convert_script(binary: str | None, explicit: str | None) -> Path | None:
    """convert_lora_to_gguf.py: `explicit`, else next to the sources the binary was built from."""
    if explicit:
        return Path(explicit)
    if not binary:
        return None
    for parent in Path(binary).resolve().parents:
        for cand in [parent / "convert_lora_to_gguf.py", *parent.glob("*/vendor/llama.cpp/convert_lora_to_gguf.py"),
                     *parent.glob("*/convert_lora_to_gguf.py")]:
            if cand.is_file():
                return cand
    return None


def lora_ggufs(work: Path, model_path: str | None, n: int, convert: Path, rank: int = 16) -> list[Path]:
    """n LoRA GGUF files (seeds 0..n-1), converted once and reused."""
    base_dir = base_hf_dir(work, model_path)
    out = [work / "lora-gguf" / f"lora{i}.gguf" for i in range(n)]
    missing = [i for i, p in enumerate(out) if not p.exists()]
    if not missing:
        return out
    peft_dirs = _export_peft(work, model_path, missing, rank)
    env = {**os.environ, "PYTHONPATH": str(convert.parent / "gguf-py") + os.pathsep + str(convert.parent)}
    for i, d in zip(missing, peft_dirs):
        out[i].parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(convert), "--base", str(base_dir), "--outtype", "f16",
                        "--outfile", str(out[i]), str(d)], check=True, env=env, capture_output=True)
        print(f"  converted {out[i].name}", flush=True)
    return out


def _export_peft(work: Path, model_path: str | None, seeds: list[int], rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from adapters.base_model import DEFAULT_TARGETS, load_base_model

    base = load_base_model(model_path)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(DEFAULT_TARGETS), init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(base.model, cfg, adapter_name="default")
    dirs = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # random, moderate weights: a visible change that keeps the model coherent
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3 / p.shape[-1] ** 0.5)
        d = work / "lora-peft" / f"lora{seed}"
        model.save_pretrained(d)
        dirs.append(d)
    return dirs
