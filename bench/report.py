"""Print the Markdown tables of docs/benchmarks.md from bench/results/*.json (so the tables are never
typed by hand): `python bench/report.py [--dir bench/results/xeon] [mixed_adapters serve_load adapter_ops fleet engine]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import RESULTS_DIR, table


def header(data: dict) -> str:
    m = data["machine"]
    return (f"`{data['command']}` — {data['date']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
            f"({m['torch_threads']} threads), load average at start {_load(m)}")


def _load(m: dict) -> str:
    la = m.get("loadavg_at_start")
    return "–" if not la else f"{la[0]:.1f}"


def mixed(data: dict) -> str:
    rows = sorted(data["rows"], key=lambda r: (r["engine"] != "svdserve", r["batch"], r["method"] != "base",
                                               r["method"], r["rank"], r["merged"], r["distinct"]))
    for r in rows:
        r["× base"] = r["ratio"]
        r["tok/s"] = r["tok_s"]
        r["× base (CPU time)"] = r.get("cpu_ratio")
        r["rounds tok/s"] = ", ".join(f"{v:.0f}" for v in r["rounds"])
        r["run"] = "re-run" if r.get("source", "mixed_adapters.json") != "mixed_adapters.json" else ""
    return table(rows, ["config", "tok/s", "× base", "× base (CPU time)", "rounds tok/s", "run"],
                 {"× base": 2, "× base (CPU time)": 2})


def serve(data: dict) -> str:
    rows = data["rows"]
    for r in rows:
        r["tok/s"] = r["tok_s"]
        r["TTFT p50/p99 ms"] = _pair(r["ttft_p50_ms"], r["ttft_p99_ms"])
        r["ITL p50/p99 ms"] = _pair(r["itl_p50_ms"], r["itl_p99_ms"])
    return table(rows, ["config", "clients", "tok/s", "TTFT p50/p99 ms", "ITL p50/p99 ms", "errors"])


def _pair(a: float | None, b: float | None) -> str:
    return "–" if a is None else f"{a:.0f} / {b:.0f}"


def ops(data: dict) -> str:
    rows = data["methods"]
    for r in rows:
        r["file KiB"] = r["file_bytes"] / 1024
        r["resident KiB"] = r["resident_bytes"] / 1024
        r[f"fit in {data['memory_gb']:g} GiB"] = r["fit_in_memory"]
    cols = ["method", "rank", "file KiB", "resident KiB", f"fit in {data['memory_gb']:g} GiB", "put_ms", "get_ms",
            "load_ms", "unload_ms", "merge_ms", "restore_ms", "restore_bit_exact"]
    digits = {c: 1 for c in cols}
    out = table(rows, cols, digits) + "\n\n" + table(data["cold_load"], ["case", "ttft_ms"])
    busy = data.get("under_load")
    if busy:  # cold loads while other streams decode (1,000 adapters cycling through the slots)
        out += "\n\n" + table(busy["rows"], ["case", "requests", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                                              "itl_p99_ms", "stream_tok_s", "slot_loads", "parses", "full_gcs"],
                              {"ttft_p50_ms": 0, "ttft_p99_ms": 0, "itl_p50_ms": 0, "itl_p99_ms": 0})
    return out


def fleet(data: dict) -> str:
    rows = data["rows"]
    for r in rows:
        r["req/s"], r["tok/s"] = r.get("req_s", r["requests"] / r["seconds"]), r["tok_s"]
        r["TTFT p50/p99 ms"] = _pair(r["ttft_p50_ms"], r["ttft_p99_ms"])
        r["cold loads /100 req"], r["parses /100 req"] = r.get("cold_per_100"), r.get("parses_per_100")
        r["busiest replica's share"] = r.get("busiest_share")
        r["1-token latency p50/p99 ms"] = _pair(r.get("latency_p50_ms"), r.get("latency_p99_ms"))
    return table(rows, ["config", "req/s", "tok/s", "TTFT p50/p99 ms", "cold loads /100 req", "parses /100 req",
                        "busiest replica's share", "1-token latency p50/p99 ms", "errors"],
                 {"req/s": 2, "busiest replica's share": 2})


def engine(data: dict) -> str:
    rows = [{**r, "p99 ÷ window p50": r["a"] / r["during_p50_ms"]} if "during_p50_ms" in r else r
            for r in data["rows"]]
    cols = ["case", "a", "b", "ratio", "target"]
    if any("during_p50_ms" in r for r in rows):  # ITL: also against the median of the same window
        cols.insert(4, "p99 ÷ window p50")
    return table(rows, cols, {"ratio": 2, "p99 ÷ window p50": 2})


def structured(data: dict) -> str:
    rows = table(data["rows"], ["schemas", "constrained", "tok/s", "× unconstrained", "tokens/round", "rounds tok/s"],
                 {"× unconstrained": 2})
    return rows + "\n\n" + table(data["compile"], ["schema", "cold ms", "cached ms"], {"cold ms": 1, "cached ms": 3})


def grammar_engines(data: dict) -> str:
    mask = [r | {"fill + apply ms": r["fill_apply_ms_p50"], "fill ms": r["fill_ms_p50"], "apply ms": r["apply_ms_p50"],
                 "accept µs/token": r["accept_us_per_token"]} for r in data["mask"]]
    apply = [r | {"ms p50": r["ms_p50"], "first call ms": r.get("first_call_ms")} for r in data["apply"]]
    cov = {e: sum(c[e]["compiles"] and c[e]["accepts_valid"] and c[e]["rejects_invalid"] for c in data["coverage"])
           for e in ("xgrammar", "llguidance")}
    return (table(mask, ["engine", "fill", "fill ms", "apply ms", "fill + apply ms", "accept µs/token"],
                  {"fill ms": 2, "apply ms": 2, "fill + apply ms": 2, "accept µs/token": 1})
            + "\n\n" + table(apply, ["apply", "ms p50", "first call ms"], {"ms p50": 2, "first call ms": 1})
            + f"\n\nSchema coverage ({len(data['coverage'])} schemas): xgrammar {cov['xgrammar']}, llguidance "
              f"{cov['llguidance']}. {data['recommendation_text']}")


RENDER = {"mixed_adapters": mixed, "serve_load": serve, "adapter_ops": ops, "fleet": fleet, "engine": engine,
          "structured": structured, "grammar_engines": grammar_engines}


def main(names: list[str], results_dir: Path = RESULTS_DIR) -> None:
    from plot import combined, default_sources

    if not names or "mixed_adapters" in names:
        srcs = [p for p in default_sources(results_dir) if p.exists()]
        if srcs:
            rows, heads = combined(srcs)
            print("### mixed_adapters\n")
            for h in heads:
                print(f"- {header(h)}")
            print("\n" + mixed({"rows": rows}) + "\n")
        names = [n for n in names or list(RENDER) if n != "mixed_adapters"]
    if "serve_load" in names:
        srcs = [results_dir / "serve_load.json", *sorted(results_dir.glob("serve_load_*.json"))]
        srcs = [p for p in srcs if p.exists() and not p.stem.endswith("quick") and p.stem not in names]
        if srcs:
            rows: dict[tuple, dict] = {}
            print("### serve_load\n")
            for p in srcs:  # a later file's cell replaces the same cell of an earlier one (a re-measurement)
                data = json.loads(p.read_text())
                print(f"- {header(data)}")
                rows.update({(r["config"], r["clients"]): r for r in data["rows"]})
            print("\n" + serve({"rows": list(rows.values())}) + "\n")
        names.remove("serve_load")
    for name in names:
        path = results_dir / f"{name}.json"
        if not path.exists():
            print(f"<!-- {path.name}: not measured -->\n")
            continue
        data = json.loads(path.read_text())
        render = RENDER[max((k for k in RENDER if name.startswith(k)), key=len)]
        print(f"### {name}\n\n{header(data)}\n\n{render(data)}\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    where = RESULTS_DIR
    if args[:1] == ["--dir"]:
        where, args = Path(args[1]).resolve(), args[2:]
    main(args, where)
