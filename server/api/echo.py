"""Completions' `echo` (the prompt before the completion, with its tokens' logprobs when `logprobs` is set — what
evaluation harnesses send for log-likelihoods, often with `max_tokens: 0`) and vLLM's `prompt_logprobs`."""

from __future__ import annotations

from typing import Any

from server.engine import TokenLogprob
from server.protocol import CompletionLogprobs, CompletionRequest
from server.sequence import PromptLogprob


def prompt_logprobs_k(req: CompletionRequest) -> int | None:
    """How many alternatives the engine computes per prompt token (None: no prompt logprobs)."""
    wanted = [k for k in ((req.logprobs if req.echo else None), req.prompt_logprobs) if k is not None]
    return max(wanted) if wanted else None


def prompt_texts(req: CompletionRequest, prompts: list[list[int]], tokenizer: Any) -> list[str]:
    """The prompts as text: as sent, or decoded from the token ids sent."""
    return [p if isinstance(p, str) else tokenizer.decode(ids) for p, ids in zip(req.prompts(), prompts)]


def logprobs(prompt_ids: list[int], prefix: list[PromptLogprob | None] | None,
             completion: list[TokenLogprob] | None, k: int | None, tokenizer: Any, offset: int = 0) -> CompletionLogprobs:
    """OpenAI's completion logprobs: the prompt's tokens first when echoed (the first has none), then the
    completion's."""
    dec = lambda t: tokenizer.decode([t])  # noqa: E731
    out = CompletionLogprobs()
    entries: list[tuple[str, float | None, dict[str, float] | None]] = []
    for token_id, plp in zip(prompt_ids, prefix or []):
        if plp is None:
            entries.append((dec(token_id), None, None))
        else:
            entries.append((dec(plp.token_id), plp.logprob, {dec(t): v for t, v in plp.top[:k or 0]}))
    entries += [(lp.token, lp.logprob, dict(lp.top)) for lp in completion or []]
    for token, lp, top in entries:
        out.tokens.append(token)
        out.token_logprobs.append(lp)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def vllm_prompt_logprobs(plps: list[PromptLogprob | None], k: int, tokenizer: Any) -> list[dict[str, dict] | None]:
    """vLLM's shape: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}} with the
    prompt's own token and the top-k alternatives."""
    out: list[dict[str, dict] | None] = []
    for plp in plps:
        if plp is None:
            out.append(None)
            continue
        ranks = {t: r + 1 for r, (t, _) in enumerate(plp.top)}
        entry = {str(t): {"logprob": v, "rank": ranks[t], "decoded_token": tokenizer.decode([t])}
                 for t, v in plp.top[:k]}
        entry.setdefault(str(plp.token_id), {"logprob": plp.logprob, "rank": ranks.get(plp.token_id),
                                             "decoded_token": tokenizer.decode([plp.token_id])})
        out.append(entry)
    return out

