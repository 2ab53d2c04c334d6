"""The engine: a background thread that steps schedule → run → update, and async streams per request.

The HTTP layer calls `generate()` on its event loop; the request is validated there (so errors surface
before the first output), then handed to the scheduler. The step thread publishes each step's news to the
requests' asyncio queues with `loop.call_soon_threadsafe`. The scheduler is only touched under `_lock`;
the forward pass runs outside it, so submissions and aborts never wait for a step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from adapters.runtime import AdaptedModel, SlotImage
from server.config import EngineConfig
from server.grammar import Grammars
from server.kv.blocks import BlockManager
from server.kv.budget import bytes_per_token, num_blocks
from server.kv.hashing import namespace
from server.model_runner import ModelRunner
from server.residency import Residency
from server.scheduler import QueueFull, Scheduler, SchedulerOutput
from server.sequence import AdapterKey, ContextLengthExceeded, Detokenizer, PromptLogprob, SampledToken, SamplingParams, Sequence, Status
from server.store import AdapterStore, StoredAdapter, qualified

__all__ = ["Engine", "GenerationFailed", "GenerationRequest", "QueueFull", "RequestOutput", "SamplingParams", "TokenLogprob"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's load at one moment (Engine.snapshot())."""

    running: int  # sequences in the running batch
    waiting: int  # queued, including preempted sequences waiting to be recomputed
    kv_blocks_used: int  # KV blocks referenced by running sequences
    kv_blocks_total: int  # blocks in the pool (cached but unreferenced blocks count as free)
    kv_usage: float  # kv_blocks_used / kv_blocks_total
    running_adapters: dict[str, int]  # adapter `tenant/id` -> running sequences (base model left out)
    waiting_adapters: dict[str, int]  # adapter `tenant/id` -> waiting sequences


class GenerationFailed(Exception):
    """The engine failed one request alone (its adapter overflowed, or could not be loaded)."""


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None  # `tenant/id` (a plain id is the default tenant's); None = base model
    tenant: str = ""  # whose request: fair admission takes turns across tenants ("" = open mode)
    cache_salt: str | None = None  # isolates its prefix-cache blocks from every request without the same salt
    stored: StoredAdapter | None = None  # the adapter as the caller resolved it (its version fixed) off the event
    # loop — a cold download from object storage never blocks it; None: the engine looks `adapter_id` up
    image: SlotImage | None = None  # `stored` prepared for a slot (Engine.resolve), so that admitting it
    # costs the engine thread one row copy; None: a prepared image is looked up, else it loads layer by layer


@dataclass
class TokenLogprob:
    token: str  # decoded text of the chosen token
    logprob: float
    top: dict[str, float]  # top-k alternatives: decoded text -> logprob


@dataclass
class RequestOutput:
    """One per engine step per request (streamed); the last has finished=True."""

    request_id: str
    text: str  # new text since the previous output (stop-string safe)
    token_ids: list[int]  # new token ids since the previous output
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    prompt_tokens: int
    completion_tokens: int  # total so far
    error: str | None = None  # why, when finish_reason is "error"
    prompt_logprobs: list[PromptLogprob | None] | None = None  # with the first output, when asked
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


def eos_ids(tokenizer, model: torch.nn.Module) -> set[int]:
    """The tokenizer's eos and every id of the model's generation_config eos list."""
    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return ids


class Engine:
    def __init__(self, config: EngineConfig, model: AdaptedModel, tokenizer, store: AdapterStore,
                 seed: int | None = None, weight: Callable[[str], int] | None = None):
        """`weight(tenant)` is a tenant's share in fair admission (default 1 each); it must not block."""
        self.config, self.model, self.tokenizer, self.store = config, model, tokenizer, store
        self.vocab_size = model.model.config.vocab_size
        self.residency = Residency(model, config.merge_policy, config.max_resident_adapters)
        blocks = self._num_blocks(config, model)
        kv = BlockManager(blocks, config.kv_block_size, caching=config.prefix_caching)
        self.scheduler = Scheduler(max_batch_size=config.max_batch_size, max_model_len=config.max_model_len,
                                   max_queue=config.max_queue, eos_ids=eos_ids(tokenizer, model.model),
                                   slots=self.residency, kv=kv, max_num_batched_tokens=config.max_num_batched_tokens,
                                   weight=weight)
        self.runner = ModelRunner(model, self.residency, blocks, config.kv_block_size, config.max_model_len, seed,
                                  tuple(self.scheduler.eos_ids))
        self._lock = threading.Lock()
        self._grammar_lock = threading.Lock()
        self._grammars: Grammars | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._images: OrderedDict[AdapterKey, SlotImage] = OrderedDict()  # prepared adapters, least recent first
        self._images_lock = threading.Lock()
        self.observer = None  # metrics (server.metrics.Metrics): on_step(sched) after each schedule, in this thread
        self.counters = {"tokens_generated_total": 0, "requests_total": 0, "step_count": 0,
                         "prefill_steps": 0, "decode_steps": 0, "aborted_total": 0, "preemptions_total": 0,
                         "batched_tokens_total": 0}

    @staticmethod
    def _num_blocks(config: EngineConfig, model: AdaptedModel) -> int:
        """Blocks the --kv-cache-memory budget buys for this model (raises ValueError when too few)."""
        cfg = model.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_token = bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, model.dtype)
        return num_blocks(config.kv_cache_memory, per_token=per_token, block_size=config.kv_block_size,
                          max_batch_size=config.max_batch_size, max_model_len=config.max_model_len,
                          device=model.device)

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="svdserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._wake.clear()  # a submission after this point wakes the wait below
                try:
                    busy = self.step()
                except Exception:  # keep serving: fail what was running, not the server
                    log.exception("engine step failed; aborting running requests")
                    self._fail_running()
                    busy = True
                if not busy:
                    self._wake.wait(timeout=1.0)

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> bool:
        """One engine step; False when there was nothing to do."""
        sched = self._schedule()
        results = self.runner.run(sched)
        return self._update(sched, results)

    def _schedule(self) -> SchedulerOutput:
        with self._lock:
            sched = self.scheduler.schedule()
        if self.observer is not None:
            self.observer.on_step(sched)
        return sched

    def _update(self, sched: SchedulerOutput, results: list[SampledToken]) -> bool:
        with self._lock:
            changed = self.scheduler.update(sched, results)
            self._count(sched, results, changed)
            outputs = [self._output(s) for s in changed]
        self._publish(outputs)
        return not sched.empty or bool(changed)

    def _count(self, sched: SchedulerOutput, results: list[SampledToken], changed: list[Sequence]) -> None:
        c = self.counters
        if not sched.empty:
            c["step_count"] += 1
            c["prefill_steps" if sched.prefill else "decode_steps"] += 1
            c["batched_tokens_total"] += sched.num_tokens
        c["preemptions_total"] += len(sched.preempted)
        c["tokens_generated_total"] += len(results)
        c["aborted_total"] += len(sched.aborted)

    def _fail_running(self) -> None:
        # the queue head too: if admitting it is what fails (e.g. loading its adapter), it would fail forever
        with self._lock:
            waiting, parked = self.scheduler.waiting, self.scheduler.preempted
            head = parked[0] if parked else waiting.peek() if waiting else None
            ids = [s.request_id for s in self.scheduler.running] + ([head.request_id] if head else [])
        for request_id in ids:
            self.abort(request_id)

    # ---- requests ---------------------------------------------------------------------------------
    async def generate(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request. Raises (before the first output) QueueFull,
        AdapterNotFound, InvalidAdapterId, ValueError. Stopping the iteration aborts the request."""
        seq = self._sequence(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._lock:
            if req.request_id in self._streams:
                raise ValueError(f"request id {req.request_id!r} is already running")
            self.scheduler.add(seq)  # raises QueueFull
            self._streams[req.request_id] = (loop, queue)
            self.counters["requests_total"] += 1
        self.start()
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(req.request_id)

    def _sequence(self, req: GenerationRequest) -> Sequence:
        p, ids = req.params, req.prompt_token_ids
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if any(not 0 <= t < self.vocab_size for t, _ in p.logit_bias) or any(
                not 0 <= t < self.vocab_size for t in p.stop_token_ids):
            raise ValueError(f"logit_bias and stop_token_ids name token ids in [0, {self.vocab_size})")
        if p.max_tokens < 0 or (p.max_tokens == 0 and p.prompt_logprobs is None):
            raise ValueError("max_tokens must be at least 1 (0 only with echo or prompt_logprobs)")
        if len(ids) + p.max_tokens > self.config.max_model_len:
            raise ContextLengthExceeded(f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceeds "
                             f"max_model_len ({self.config.max_model_len})")
        if p.temperature < 0 or not 0 < p.top_p <= 1 or (p.logprobs is not None and p.logprobs < 0):
            raise ValueError("temperature must be >= 0, top_p in (0, 1], logprobs >= 0")
        key = adapter = None
        if req.adapter_id is not None:
            stored = req.stored or self.store.get(req.adapter_id)  # the version is fixed here
            key = (stored.info.name, stored.version)
            image = req.image if req.image is not None and req.stored is not None else self._image(key)
            adapter = image if image is not None and image.adapter is stored.adapter else stored.adapter
        matcher = None
        if p.grammar is not None:
            if p.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with structured output (the grammar ends the text)")
            matcher = self.grammars.matcher(p.grammar)
        decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        return Sequence(request_id=req.request_id, prompt_ids=list(ids), params=p,
                        detok=Detokenizer(decode, ids), adapter_key=key, adapter=adapter, tenant=req.tenant,
                        matcher=matcher, kv_root=namespace(key, req.cache_salt or p.cache_salt))

    def resolve(self, name: str) -> tuple[StoredAdapter, SlotImage]:
        """The current version of adapter `name` (`tenant/id`), parsed and prepared for a slot: the blocking and
        CPU work of a cold adapter (index read, download, parse, its slot-table row), for a worker thread — the
        routes call it there and pass both on in the GenerationRequest, so the engine thread, which every running
        stream waits on, only copies the row in. Raises as `store.get`."""
        stored = self.store.get(name)
        key = (stored.info.name, stored.version)
        image = self._image(key)
        if image is None or image.adapter is not stored.adapter:
            try:
                image = self.model.prepare(stored.adapter)
            except Exception:  # never fail the request here: loading it layer by layer fails it alone if need be
                log.exception("preparing adapter %s for a slot failed; it will load layer by layer", name)
                return stored, SlotImage(stored.adapter, None)
            with self._images_lock:
                self._images[key] = image
                while len(self._images) > self.config.max_resident_adapters:
                    self._images.popitem(last=False)
        return stored, image

    def _image(self, key: AdapterKey) -> SlotImage | None:
        with self._images_lock:
            image = self._images.get(key)
            if image is not None:
                self._images.move_to_end(key)
            return image

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.scheduler.abort(request_id)
        self._wake.set()

    @property
    def grammars(self) -> Grammars:
        """Structured output on this tokenizer, made on first use (building its token table takes a moment)."""
        with self._grammar_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.vocab_size, self.scheduler.eos_ids)
            return self._grammars

    def abort_all(self) -> int:
        """Abort every running and waiting request (shutdown); returns how many."""
        with self._lock:
            sch = self.scheduler
            ids = [s.request_id for s in [*sch.running, *sch.preempted, *sch.waiting]]
            for request_id in ids:
                self.scheduler.abort(request_id)
        self._wake.set()
        return len(ids)

    def forget_adapter(self, name: str) -> None:
        """Unload every resident version of the adapter `tenant/id` (or a default-tenant id) and forget its
        prefix-cache blocks: a deleted adapter's K/V are never served again, even to a re-upload."""
        # the adapter banks are inference tensors (made in the step thread): clearing them needs inference
        # mode in the caller's thread too
        with self._lock, torch.inference_mode():
            self.residency.forget(qualified(name))
            self.scheduler.drop_adapter(qualified(name))
        with self._images_lock:
            for key in [k for k in self._images if k[0] == qualified(name)]:
                del self._images[key]

    def stats(self) -> dict[str, float | int]:
        """Numbers only (GET /metrics turns each into a sample): the scheduler's state, the KV pool, counters."""
        with self._lock:
            r, kv = self.residency, self.scheduler.kv
            return {"running": len(self.scheduler.running), "waiting": self.scheduler.num_waiting,
                    "resident_adapters": len(r.slot_of), "merged": int(r.merged is not None),
                    "adapter_loads_total": r.loads, "adapter_evictions_total": r.evictions,
                    "merges_total": r.merges, "kv_blocks_total": kv.num_blocks - 1, "kv_blocks_used": kv.num_used,
                    "kv_usage": kv.num_used / (kv.num_blocks - 1), "kv_block_size": kv.block_size,
                    "kv_cached_blocks": kv.cached_blocks, "prefix_cache_queried_tokens_total": kv.query_tokens,
                    "prefix_cache_hit_tokens_total": kv.hit_tokens, **self.counters}

    def snapshot(self) -> EngineSnapshot:
        """Who runs and waits, by adapter, and how full the KV pool is (for metrics and routers)."""
        with self._lock:
            sch, kv = self.scheduler, self.scheduler.kv
            return EngineSnapshot(
                running=len(sch.running), waiting=sch.num_waiting, kv_blocks_used=kv.num_used,
                kv_blocks_total=kv.num_blocks - 1, kv_usage=kv.num_used / (kv.num_blocks - 1),
                running_adapters=dict(Counter(s.kv_owner for s in sch.running if s.kv_owner is not None)),
                waiting_adapters=dict(Counter(s.kv_owner for s in [*sch.preempted, *sch.waiting]
                                              if s.kv_owner is not None)))

    # ---- outputs ----------------------------------------------------------------------------------
    def _output(self, seq: Sequence) -> tuple[str, RequestOutput]:
        text, ids, lps = seq.take_new()
        done = seq.status is Status.FINISHED
        prompt = None
        if seq.prompt_logprobs is not None and not seq.prompt_sent:
            prompt, seq.prompt_sent = seq.prompt_logprobs, True
        out = RequestOutput(request_id=seq.request_id, text=text, token_ids=ids,
                            logprobs=self._logprobs(lps) if lps is not None else None, finished=done,
                            finish_reason=seq.finish_reason if done else None,
                            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
                            error=seq.error if done else None, prompt_logprobs=prompt,
                            cached_tokens=max(seq.cached_tokens, 0))
        return seq.request_id, out

    def _logprobs(self, lps: list[SampledToken]) -> list[TokenLogprob]:
        dec = lambda t: self.tokenizer.decode([t])  # noqa: E731
        return [TokenLogprob(token=dec(s.token_id), logprob=s.logprob,
                             top={dec(t): lp for t, lp in s.top or []}) for s in lps]

    def _publish(self, outputs: list[tuple[str, RequestOutput]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, out in outputs:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[request_id]
                by_loop.setdefault(stream[0], []).append((stream[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
