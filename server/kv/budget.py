"""How many KV blocks a memory budget buys.

`--kv-cache-memory` is either a size ("4GiB", "512MB", "1000000" bytes) or a fraction of the device's
memory ("0.2": of the GPU's memory on CUDA, of physical RAM on the CPU). The pool never gets more blocks than
max_batch_size full-length sequences need, and must hold at least one full-length sequence.
"""

from __future__ import annotations

import os
import re

import torch

from server.startup import StartupError


class KVCacheTooSmall(StartupError, ValueError):
    """--kv-cache-memory cannot hold one --max-model-len sequence."""

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def parse_memory(spec: str) -> int | float:
    """"0.2" -> 0.2 (a fraction); "4GiB" -> 4 * 2**30; "1000" -> 1000 (bytes). Raises ValueError."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", spec)
    if m is None or m.group(2).lower() not in UNITS:
        raise ValueError(f"kv cache memory {spec!r}: give bytes ('4GiB', '512MB', '1000000') or a fraction ('0.2')")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not unit and value < 1:
        if value <= 0:
            raise ValueError("a kv cache memory fraction must be in (0, 1)")
        return value
    return int(value * UNITS[unit])


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bytes_per_token(n_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * n_layers * n_kv * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks(spec: str, *, per_token: int, block_size: int, max_batch_size: int, max_model_len: int,
               device: torch.device) -> int:
    """Blocks in the pool (the null block included)."""
    budget = parse_memory(spec)
    if isinstance(budget, float):
        budget = int(budget * device_memory(device))
    per_block = per_token * block_size
    per_seq = -(-max_model_len // block_size)
    n = min(budget // per_block, max_batch_size * per_seq)
    if n < per_seq:
        raise KVCacheTooSmall(f"--kv-cache-memory {spec} ({budget} bytes) holds {n * block_size} tokens of K/V, fewer "
                              f"than one --max-model-len {max_model_len} sequence needs: raise it or lower "
                              f"--max-model-len")
    return n + 1
