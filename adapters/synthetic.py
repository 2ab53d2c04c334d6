"""Random adapters of every method, for tests and benchmarks (a stand-in for trained tenants)."""

from __future__ import annotations

import torch

from adapters.file import Adapter, BaseSpec
from adapters.factors import LayerFactors
from adapters.methods import get_method


def random_adapter(method: str, spec: BaseSpec, factors: dict[str, LayerFactors], rank: int, seed: int,
                   strength: float = 0.3, modules: list[str] | None = None,
                   alpha: float | None = None, vera_seed: int = 0) -> Adapter:
    """An adapter whose delta is a visible but moderate change of the base model.

    OSoRA: S' = S_r·(1 + ε), O = 1 + ε; LoRA-XS: R small; SORSA: factors near the SVD ones; VeRA: shared
    projections from `vera_seed` (so VeRA adapters with one vera_seed share them); LoRA: small A, B.
    """
    g = torch.Generator().manual_seed(seed)
    m = get_method(method)
    modules = modules or list(spec.shapes)

    def noise(*shape):
        return torch.randn(*shape, generator=g) * strength

    layers = {}
    for name in modules:
        d, k = spec.shapes[name]
        f = factors[name]
        S = f.S[:rank].float()
        if method == "osora":
            p = {"osora_S": S * (1 + noise(rank)), "osora_O": 1 + noise(d)}
        elif method == "loraxs":
            p = {"loraxs_R": noise(rank, rank)}
        elif method == "sorsa":
            p = {"sorsa_A": f.V[:, :rank].T + noise(rank, k) / k**0.5,
                 "sorsa_S": S * (1 + noise(rank)),
                 "sorsa_B": f.U[:, :rank] + noise(d, rank) / d**0.5}
        elif method == "vera":
            p = {"vera_lambda_b": noise(d), "vera_lambda_d": 1 + noise(rank)}
        elif method == "lora":
            p = {"lora_A.weight": noise(rank, k) / k**0.5, "lora_B.weight": noise(d, rank) / rank**0.5}
        else:
            raise ValueError(method)
        assert set(p) == set(m.layer_shapes(d, k, rank))
        layers[name] = {n: t.contiguous() for n, t in p.items()}
    glob = {}
    if method == "vera":
        gshape = m.global_shapes({n: spec.shapes[n] for n in modules}, rank)
        gv = torch.Generator().manual_seed(vera_seed)
        glob = {n: torch.randn(*s, generator=gv) / s[1] ** 0.5 for n, s in sorted(gshape.items())}
    return Adapter(method=method, rank=rank, layers=layers, glob=glob, alpha=alpha,
                   base_fingerprint=spec.fingerprint, description=f"random {method} r={rank} seed={seed}")
