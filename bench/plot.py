"""The throughput plot of docs/benchmarks.md: decode tokens/s against distinct adapters in a batch,
svdserve (each method, unmerged) vs PEFT's mixed-batch LoRA, from bench/results/mixed_adapters.json.

    python bench/plot.py [docs/throughput.png [results.json ...]]

Several results files combine, a later file's row replacing the same configuration of an earlier one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def throughput_plot(rows: list[dict], out: str | Path, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min(r["batch"] for r in rows)
    rows = [r for r in rows if r["batch"] == batch and not r["merged"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["distinct"]:
            name = "PEFT LoRA r=16" if r["engine"] == "peft" else f"svdserve {r['method']} r={r['rank']}"
            series.setdefault(name, []).append(r)
    for name, rs in sorted(series.items(), key=lambda kv: (kv[0].startswith("PEFT"), kv[0])):
        rs.sort(key=lambda r: r["distinct"])
        style = dict(marker="s", linestyle="--", color="black") if name.startswith("PEFT") else dict(marker="o")
        ax.plot([r["distinct"] for r in rs], [r["tok_s"] for r in rs], label=name, **style)
        ax2.plot([r["distinct"] for r in rs], [r["ratio"] for r in rs], label=name, **style)
    for r in rows:
        if not r["distinct"] and r["engine"] in ("svdserve", "transformers"):
            who = "svdserve base" if r["engine"] == "svdserve" else "transformers generate base"
            ax.axhline(r["tok_s"], color="grey" if r["engine"] == "svdserve" else "silver", linestyle=":")
            ax.annotate(who, (1, r["tok_s"]), fontsize=7, va="bottom", color="dimgrey")
    ax2.axhline(1.0, color="grey", linestyle=":")
    for a, ylabel in ((ax, f"decode tokens/s (batch {batch})"), (ax2, "× its own base model")):
        a.set_xscale("log", base=2)
        a.set_xlabel("distinct adapters in the batch")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
    ax2.set_ylim(0, 1.1)
    ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Mixed-adapter decode, SmolLM2-135M, {machine.get('cpu', '')} "
                 f"({machine.get('cores', '?')} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot written to {out}")


def combined(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """Rows of several mixed_adapters results files, a later file's row replacing an earlier row of the same
    configuration (a re-measurement); also returns each file's header data."""
    rows: dict[str, dict] = {}
    heads = []
    for path in paths:
        data = json.loads(path.read_text())
        heads.append(data)
        for r in data["rows"]:
            rows[r["config"]] = {**r, "source": path.name}
    return list(rows.values()), heads


def default_sources(res: Path | None = None) -> list[Path]:
    """<res>/mixed_adapters.json, then any mixed_adapters_<re-measurement>.json of the same dtype (not _quick;
    a bfloat16 run is its own table, as its rows carry the same labels). res: bench/results by default."""
    res = res or ROOT / "bench/results"
    main = res / "mixed_adapters.json"
    dtype = json.loads(main.read_text()).get("dtype") if main.exists() else None
    extra = sorted(p for p in res.glob("mixed_adapters_*.json")
                   if not p.stem.endswith("quick") and json.loads(p.read_text()).get("dtype") == dtype)
    return [main, *extra]


if __name__ == "__main__":
    dst = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs/throughput.png"
    srcs = [Path(p) for p in sys.argv[2:]] or default_sources()
    rows, heads = combined(srcs)
    throughput_plot(rows, dst, heads[0]["machine"])
