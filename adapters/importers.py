"""Importers: PEFT LoRA and VeRA directories and PEFT-style OSoRA checkpoints → svdserve adapters.

Every importer needs the base model's `BaseSpec` (target modules and shapes, r_max, fingerprint); the OSoRA
importer also needs its SVD factors. The result is validated with `parse_adapter` against that spec and
stamped with the base fingerprint, so a file that imports is a file the server accepts.

Only safetensors files are read (a pickled `adapter_model.bin` is refused, never unpickled). Tensors are
stored as float32.

What is imported, and how (all exact up to float32 rounding):
  * LoRA: lora_A / lora_B per module. PEFT's scale is lora_alpha / r (rsLoRA: lora_alpha / √r). When
    `rank_pattern` gives modules different ranks, the file keeps one rank, the largest: smaller modules
    are zero-padded (extra rows of A and columns of B are zero, so B A is unchanged). When every module
    has the same scale s, the file stores alpha = s · rank; otherwise alpha = rank (scale 1) and each
    module's scale is folded into its B.
  * VeRA: vera_lambda_b / vera_lambda_d per module; the shared vera_A / vera_B come from the file when
    PEFT saved them (`save_projection=True`), else they are regenerated from `projection_prng_key` exactly
    as PEFT does (`VeraModel._init_vera_A_vera_B`: one CPU torch.Generator seeded with the key, Kaiming-
    uniform A of shape (r, max in_features), then B of shape (max out_features, r)).
  * OSoRA: osora_S and osora_O per module are kept; osora_U and osora_V are dropped after a check that
    they are the cached factors U_r, V_r (see `check_osora_factors`).
Anything that changes the forward pass beyond these (DoRA, biases, modules_to_save, trainable tokens,
layer replication, ...) is refused with a message that names it.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors.torch import load_file

from adapters.factors import LayerFactors
from adapters.file import FORMAT, PEFT_PREFIX, Adapter, AdapterFormatError, BaseSpec, parse_adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Max entry-wise difference allowed between a checkpoint's osora_U / osora_V columns and the cached ones
# (unit-norm columns, after aligning signs). Two float32 SVDs of one matrix (CPU LAPACK, cuSOLVER) agree to
# ~1e-5 on well separated singular values; 2e-3 leaves room for that and still refuses factors of another
# model or columns that rotated inside a near-degenerate pair, where S' would scale other directions.
OSORA_TOL = 2e-3

# PEFT config fields that change the forward pass in ways an svdserve LoRA/VeRA file cannot express.
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "a LoRA bias (lora_bias=true)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora=true)",
    "target_parameters": "LoRA on nn.Parameters (target_parameters)",
    "fan_in_fan_out": "transposed (Conv1D) weights (fan_in_fan_out=true)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}


class AdapterImportError(ValueError):
    """A source that cannot be imported; the message says why."""


# ---- detection ------------------------------------------------------------------------------------------
def detect_kind(src: str) -> str:
    """'lora', 'vera' or 'osora' for a PEFT directory or an OSoRA safetensors checkpoint (file or dir)."""
    if os.path.isdir(src):
        config = os.path.join(src, CONFIG_FILE)
        if os.path.isfile(config):
            peft_type = str(_read_config(src).get("peft_type", "")).upper()
            if peft_type in ("LORA", "VERA"):
                return peft_type.lower()
            if peft_type != "OSORA" and not _has_osora_keys(os.path.join(src, WEIGHTS_FILE)):
                raise AdapterImportError(f"{config}: peft_type {peft_type!r} cannot be imported (LORA, VERA, "
                                         "or an OSoRA checkpoint)")
        return "osora"
    if not os.path.isfile(src):
        raise AdapterImportError(f"{src}: no such file or directory")
    if not src.endswith(".safetensors"):
        raise AdapterImportError(f"{src}: not a .safetensors file or a PEFT directory (pickled checkpoints "
                                 "are never loaded)")
    return "osora"


def _has_osora_keys(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return any(".osora_" in k for k in f.keys())
    except Exception:  # unreadable: reading it as a checkpoint later reports why
        return False


def import_adapter(src: str, spec: BaseSpec, factors: dict[str, LayerFactors] | None = None,
                   description: str | None = None) -> Adapter:
    """Import `src` (kind auto-detected); `factors` are needed for OSoRA checkpoints only."""
    kind = detect_kind(src)
    if kind == "lora":
        adapter = import_peft_lora(src, spec)
    elif kind == "vera":
        adapter = import_peft_vera(src, spec)
    else:
        if factors is None:
            raise AdapterImportError("importing an OSoRA checkpoint needs the base model's SVD factors")
        adapter = import_osora(src, spec, factors)
    adapter.description = description or f"imported from {os.path.basename(os.path.normpath(src))}"
    return validated(adapter, spec)


def validated(adapter: Adapter, spec: BaseSpec) -> Adapter:
    """Stamp the base fingerprint and run the server's own validation on the result."""
    adapter.base_fingerprint = spec.fingerprint
    try:
        return parse_adapter(adapter.to_bytes(), spec)
    except AdapterFormatError as exc:
        raise AdapterImportError(f"the imported adapter is not valid: {exc}") from None


# ---- PEFT directories -----------------------------------------------------------------------------------
def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AdapterImportError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)") from None
    except json.JSONDecodeError as exc:
        raise AdapterImportError(f"{path}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterImportError(f"{path}: not a JSON object")
    return config


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            raise AdapterImportError(f"{directory}: only a pickled adapter_model.bin, which is never loaded; "
                                     "save with safe_serialization=True")
        raise AdapterImportError(f"{directory}: no {WEIGHTS_FILE}")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises several error types for a damaged file
        raise AdapterImportError(f"{path}: not a readable safetensors file ({exc})") from None


def _check_config(config: dict, peft_type: str) -> None:
    if str(config.get("peft_type", "")).upper() != peft_type:
        raise AdapterImportError(f"peft_type is {config.get('peft_type')!r}, expected {peft_type!r}")
    if config.get("bias", "none") != "none":
        raise AdapterImportError(f"bias={config['bias']!r} is not supported (only 'none'): svdserve adapters "
                                 "never change the base model's biases")
    for name, what in UNSUPPORTED_FIELDS.items():
        if config.get(name):
            raise AdapterImportError(f"{what} is not supported by svdserve adapters")


def _check_targets(config: dict, spec: BaseSpec) -> None:
    """Every entry of a list-valued `target_modules` must name adapted layers of the base model (a regex
    string is checked through the tensors it produced instead)."""
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return
    for t in targets:
        if not any(m == t or m.endswith("." + t) for m in spec.shapes):
            raise AdapterImportError(f"target module {t!r} is not an adapted layer of the base model "
                                     f"(adapted: {_target_suffixes(spec)})")


def _target_suffixes(spec: BaseSpec) -> str:
    return ", ".join(sorted({m.rsplit(".", 1)[-1] for m in spec.shapes}))


def _split_keys(weights: dict[str, torch.Tensor], params: tuple[str, ...], spec: BaseSpec,
                ) -> dict[str, dict[str, torch.Tensor]]:
    """module -> param -> tensor for keys `[base_model.model.]<module>.<param>`; anything else is refused."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        param = next((p for p in params if name.endswith("." + p)), None)
        if param is None:
            raise AdapterImportError(f"tensor {key!r} is not one of {', '.join(params)}; "
                                     "it would change the model in a way svdserve cannot serve")
        module = name[: -len(param) - 1]
        if module not in spec.shapes:
            raise AdapterImportError(
                f"module {module!r} is not an adapted layer of the base model (adapted: {_target_suffixes(spec)})")
        layers.setdefault(module, {})[param] = t.float()
    if not layers:
        raise AdapterImportError("the checkpoint has no adapter tensors")
    for module, ps in layers.items():
        if set(ps) != set(params):
            raise AdapterImportError(f"module {module!r} has {sorted(ps)}, needs {list(params)}")
    return layers


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's `get_pattern_key`: the first pattern key that matches the end of the module name."""
    for key in pattern or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def import_peft_lora(directory: str, spec: BaseSpec) -> Adapter:
    """A PEFT LoRA directory as an svdserve `lora` adapter (see the module docstring for ranks and scale)."""
    config = _read_config(directory)
    _check_config(config, "LORA")
    _check_targets(config, spec)
    layers = _split_keys(_read_weights(directory), ("lora_A.weight", "lora_B.weight"), spec)
    scales: dict[str, float] = {}
    for module, ps in layers.items():
        a, b = ps["lora_A.weight"], ps["lora_B.weight"]
        d, k = spec.shapes[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != k or tuple(b.shape) != (d, r):
            raise AdapterImportError(f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do "
                                     f"not fit a {d}×{k} layer of the base model (another base model?)")
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scales[module] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    rank = max(ps["lora_A.weight"].shape[0] for ps in layers.values())
    common = len(set(scales.values())) == 1
    for module, ps in layers.items():
        a, b = ps["lora_A.weight"], ps["lora_B.weight"]
        if not common:
            b = b * scales[module]  # fold this module's own scale in; the file's scale is 1
        pad = rank - a.shape[0]  # zero rows of A / columns of B leave B A unchanged
        ps["lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        ps["lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).contiguous()
    alpha = next(iter(scales.values())) * rank if common else float(rank)
    return Adapter(method="lora", rank=rank, layers=layers, alpha=alpha)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's vera `_kaiming_init`: U(−b, b) with b = √3 · √2 / √fan_in, fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def vera_projections(key: int, r: int, shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """vera_A (r × max k), vera_B (max d × r) regenerated from PEFT's `projection_prng_key`."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    d_max, k_max = max(d for d, _ in shapes), max(k for _, k in shapes)
    a = _kaiming_uniform((r, k_max), generator)
    b = _kaiming_uniform((d_max, r), generator)  # drawn second, from the same generator, as PEFT does
    return a, b


def import_peft_vera(directory: str, spec: BaseSpec) -> Adapter:
    """A PEFT VeRA directory as an svdserve `vera` adapter (projections from the file or the PRNG key)."""
    config = _read_config(directory)
    _check_config(config, "VERA")
    _check_targets(config, spec)
    weights = _read_weights(directory)
    glob = {}
    for name in ("vera_A", "vera_B"):
        for key in (f"base_model.{name}", name):
            if key in weights:
                glob[name] = weights.pop(key).float().contiguous()
    layers = _split_keys(weights, ("vera_lambda_b", "vera_lambda_d"), spec)
    r = int(config.get("r", 256))
    for module, ps in layers.items():
        if tuple(ps["vera_lambda_d"].shape) != (r,) or tuple(ps["vera_lambda_b"].shape) != (spec.shapes[module][0],):
            raise AdapterImportError(
                f"module {module!r}: lambda shapes {list(ps['vera_lambda_b'].shape)}, "
                f"{list(ps['vera_lambda_d'].shape)} do not fit r={r} and this base model")
    if len(glob) == 1:
        raise AdapterImportError(f"the checkpoint has {next(iter(glob))} but not the other projection")
    if not glob:
        if "projection_prng_key" not in config:
            raise AdapterImportError("no saved projections and no projection_prng_key to regenerate them")
        a, b = vera_projections(int(config["projection_prng_key"]), r, [spec.shapes[m] for m in layers])
        glob = {"vera_A": a, "vera_B": b}
    return Adapter(method="vera", rank=r, layers=layers, glob=glob)


# ---- OSoRA checkpoints ----------------------------------------------------------------------------------
OSORA_PARAMS = ("osora_S", "osora_O", "osora_U.weight", "osora_V.weight")


def _read_osora(src: str) -> dict[str, torch.Tensor]:
    path = os.path.join(src, WEIGHTS_FILE) if os.path.isdir(src) else src
    if not os.path.isfile(path):
        raise AdapterImportError(f"{src}: no {WEIGHTS_FILE} (an OSoRA checkpoint is one safetensors file)")
    try:
        weights = load_file(path)
    except Exception as exc:
        raise AdapterImportError(f"{path}: not a readable safetensors file ({exc})") from None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("format") == FORMAT:
            raise AdapterImportError(f"{path} is already an svdserve adapter file; nothing to import")
    # osora_U / osora_V may be saved as nn.Linear weights (`.weight`) or as bare tensors
    return {(k + ".weight" if k.endswith((".osora_U", ".osora_V")) else k): t for k, t in weights.items()}


def _orientations(t: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
    """`t` read as a [rows, cols] matrix: as stored and/or transposed (both when square)."""
    out = [t] if tuple(t.shape) == (rows, cols) else []
    if tuple(t.shape) == (cols, rows):
        out.append(t.T)
    return out


def _factor_error(u: torch.Tensor, v: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[float, bool]:
    """Max entry-wise difference of u, v from U, V after aligning each column's sign, and whether u_i and
    v_i needed the same sign flips (if not, u_i v_iᵀ is negated: another matrix, not a sign convention)."""
    su, sv = torch.sign((u * U).sum(0)), torch.sign((v * V).sum(0))
    err = max(float((u * su - U).abs().max()), float((v * sv - V).abs().max()))
    return err, torch.equal(su, sv)


def check_osora_factors(module: str, u: torch.Tensor, v: torch.Tensor, f: LayerFactors, r: int,
                        tol: float = OSORA_TOL) -> None:
    """Refuse unless osora_U / osora_V are the cached U_r / V_r, up to one sign per column (u_i and v_i
    flipped together leave u_i v_iᵀ, and so the model, unchanged).

    `u` is [d, r] (an nn.Linear(r, d) weight) or [r, d]; `v` is [r, k] (an nn.Linear(k, r) weight) or
    [k, r]. A square tensor is tried both ways and accepted if either reading matches.
    """
    U, V = f.U[:, :r].float(), f.V[:, :r].float()
    us, vs = _orientations(u.float(), *U.shape), _orientations(v.float(), *V.shape)
    if not us or not vs:
        raise AdapterImportError(f"module {module!r}: osora_U {list(u.shape)} and osora_V {list(v.shape)} do not "
                                 f"fit rank {r} of a {U.shape[0]}×{V.shape[0]} layer (another base model?)")
    results = [_factor_error(uu, vv, U, V) for uu in us for vv in vs]
    if any(err <= tol and same for err, same in results):
        return
    if any(err <= tol for err, _ in results):
        raise AdapterImportError(f"module {module!r}: some columns of osora_U and osora_V have opposite signs "
                                 "relative to the base model's SVD factors, so U_r S V_rᵀ is not the base weight's")
    raise AdapterImportError(
        f"module {module!r}: osora_U/osora_V differ from the base model's SVD factors by "
        f"{min(e for e, _ in results):.2e} (tolerance {tol:g}, up to sign per column): the checkpoint was made "
        "for another base model or with another SVD, and its singular values would scale the wrong directions")


def import_osora(src: str, spec: BaseSpec, factors: dict[str, LayerFactors], tol: float = OSORA_TOL) -> Adapter:
    """A PEFT-style OSoRA checkpoint as an svdserve `osora` adapter; U and V are checked, then dropped."""
    layers = _split_keys(_read_osora(src), OSORA_PARAMS, spec)
    ranks = {ps["osora_S"].numel() for ps in layers.values()}
    if len(ranks) != 1:
        raise AdapterImportError(f"osora_S has different lengths across modules ({sorted(ranks)}); "
                                 "an adapter file has one rank")
    r = ranks.pop()
    if r > spec.r_max:
        raise AdapterImportError(f"rank {r} exceeds the factor cache's max rank {spec.r_max} (use --max-rank)")
    out = {}
    for module, ps in layers.items():
        check_osora_factors(module, ps["osora_U.weight"], ps["osora_V.weight"], factors[module], r, tol)
        out[module] = {"osora_S": ps["osora_S"].reshape(-1).contiguous(),
                       "osora_O": ps["osora_O"].reshape(-1).contiguous()}
    return Adapter(method="osora", rank=r, layers=out)
