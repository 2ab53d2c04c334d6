"""PEFT's own mixed-batch LoRA inference, the baseline of bench/mixed_adapters.py.

The model is the same base (the default GGUF, dequantized to float32 by transformers) with PEFT LoRA
adapters (r=16, the same target modules, random non-zero weights) and `generate(adapter_names=[...])`,
which PEFT runs by splitting the batch into one sub-batch per adapter in every LoRA layer.

Decode throughput is timed from inside `generate` with a logits processor that stamps every step, so
the prefill is excluded exactly as in the svdserve measurement.
"""

from __future__ import annotations

import copy
import time

import torch

from adapters.base_model import DEFAULT_TARGETS, load_base_model


class StepClock:
    """A logits processor that records the time of every decode step (it changes nothing)."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []  # (wall, process CPU) time

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append((time.perf_counter(), time.process_time()))
        return scores

    def decode_seconds(self) -> tuple[int, float, float]:
        """(decode steps, wall seconds, CPU seconds) from the first sampled token (end of prefill) to the last."""
        (w0, c0), (w1, c1) = self.stamps[0], self.stamps[-1]
        return len(self.stamps) - 1, w1 - w0, c1 - c0


class PeftBaseline:
    """The base model wrapped by PEFT with `n_adapters` LoRA adapters named a0, a1, ..."""

    def __init__(self, model_path: str | None, n_adapters: int, rank: int = 16, dtype: torch.dtype = torch.float32):
        from peft import LoraConfig, get_peft_model

        base = load_base_model(model_path)
        self.tokenizer = base.tokenizer
        model = base.model.to(dtype)
        self.plain = copy.deepcopy(model)  # the same base model without PEFT: transformers' own generate
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(DEFAULT_TARGETS),
                         init_lora_weights=False, lora_dropout=0.0)
        torch.manual_seed(0)
        self.model = get_peft_model(model, cfg, adapter_name="a0")
        for i in range(1, n_adapters):
            self.model.add_adapter(f"a{i}", cfg)
        self.model.eval()
        self.n_adapters = n_adapters

    @torch.inference_mode()
    def decode_plain(self, prompts: torch.Tensor, steps: int) -> tuple[int, float, float]:
        """The base model alone with transformers' generate; returns (decode steps, wall s, CPU s)."""
        return self._generate(self.plain, prompts, steps)

    @torch.inference_mode()
    def decode(self, prompts: torch.Tensor, steps: int, n_distinct: int) -> tuple[int, float, float]:
        """Greedy-decode `steps` tokens for every prompt row; rows cycle over n_distinct adapters
        (0 = the base model, with the adapters disabled). Returns (decode steps, wall s, CPU s)."""
        if n_distinct == 0:
            with self.model.disable_adapter():
                return self._generate(self.model, prompts, steps)
        names = [f"a{i % n_distinct}" for i in range(prompts.shape[0])]
        return self._generate(self.model, prompts, steps, adapter_names=names)

    def _generate(self, model, prompts: torch.Tensor, steps: int, **extra) -> tuple[int, float, float]:
        from transformers import LogitsProcessorList

        clock = StepClock()
        model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=steps + 1,
                       min_new_tokens=steps + 1, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                       pad_token_id=self.tokenizer.eos_token_id, **extra)
        return clock.decode_seconds()
