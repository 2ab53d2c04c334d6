"""The throughput plot of docs/benchmarks.md: decode tokens/s against distinct adapters in a batch,
svdserve (each method, unmerged) vs PEFT's mixed-batch LoRA, from bench/results/mixed_adapters.json.

    python bench/plot.py [bench/results/mixed_adapters.json] [docs/throughput.png]
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
        if not r["distinct"]:
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


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench/results/mixed_adapters.json"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs/throughput.png"
    data = json.loads(src.read_text())
    throughput_plot(data["rows"], dst, data["machine"])
