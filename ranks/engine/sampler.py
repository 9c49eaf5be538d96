"""Sampler: next tokens from the last-position logits of a batch, with vLLM's sampling semantics.

Greedy rows take the argmax. Other rows apply temperature, then top-k, top-p and min-p, and draw
with the exponential race (argmax of p / q with q ~ Exp(1)), which needs one random draw per
vocabulary entry from the row's own generator. Each request owns its generator, seeded by its
`seed` (or by the job seed and its id), so a request's tokens do not depend on which other
requests shared its batches, nor on preemptions: the generator advances once per sampled token.

Before the draw, in vLLM's order: the grammar's token bitmask (ranks/engine/structured.py),
logit_bias, then the penalties (ranks/engine/penalties.py), each applied to the rows that use it
with batched tensor ops, never a device op per row.

Logprobs are those of the model's distribution before any sampling transform but the grammar's
mask, as in vLLM. Rows of a request with best_of > n get the sampled token's logprob even when the
request asked for no logprobs (no alternatives then): the engine sums them to rank the samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvrelay.core.request import SamplingParams, TokenLogprob
from kvrelay.ranks.engine.device import to_device
from kvrelay.ranks.engine.penalties import TokenHistory, apply_penalties

if TYPE_CHECKING:
    from kvrelay.ranks.engine.structured import GrammarMask


@dataclass
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    banned: list[int]  # token ids that may not be sampled now (stop tokens before min_tokens)
    request_id: str = ""
    history: int | None = None  # the sequence's row in the TokenHistory (rows with penalties)
    matcher: object | None = None  # the sequence's xgrammar.GrammarMatcher (structured output), in the engine's Grammars


class PendingTokens:
    """Sampled ids still on their way to the host: `tokens` can feed the next step on the device
    (ModelRunner.execute's `fed`) before `result()` waits for them."""

    def __init__(self, tokens: torch.Tensor) -> None:  # [N] int64 on the model's device
        self.tokens = tokens
        self._ready = None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tokens

    def result(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


@torch.inference_mode()
def sample(
    logits: torch.Tensor, rows: list[SampleRow], history: TokenHistory | None = None,
    mask: GrammarMask | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [N, vocab] float32 on the model's device; one row per sampling sequence. Rows with
    penalties name their row of `history`, which counts the tokens sampled here; rows with a
    grammar take only the tokens `mask` allows (Grammars.fill_bitmask; the caller has their
    matchers accept the tokens)."""
    assert (mask is None) == all(r.matcher is None for r in rows), "grammar rows need their step's mask"
    want_logprobs = [r.params.logprobs for r in rows]
    # best_of rows need the sampled token's logprob to rank their samples, even without logprobs.
    need_raw = [n is not None or r.params.tracks_logprob for n, r in zip(want_logprobs, rows)]
    tokens, raw_logprobs = _draw(logits, rows, history, mask, any(need_raw))
    token_list = tokens.tolist()  # the wait for the device

    out_logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if raw_logprobs is not None:
        # One gather and one top-k for the whole batch, so the host waits once, not once per row.
        chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        k = max((n for n in want_logprobs if n is not None), default=0)
        top_vals, top_ids = (raw_logprobs.topk(k, dim=-1) if k > 0 else (tokens[:, None], tokens[:, None]))
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for i, n in enumerate(want_logprobs):
            if not need_raw[i]:
                continue
            top = list(zip(top_ids[i][:n], top_vals[i][:n])) if n is not None else []
            out_logprobs[i] = TokenLogprob(token_list[i], chosen[i], top)
    return token_list, out_logprobs


@torch.inference_mode()
def sample_later(
    logits: torch.Tensor, rows: list[SampleRow], history: TokenHistory | None = None, mask: GrammarMask | None = None,
) -> PendingTokens:
    """`sample` without the wait, for rows that need no logprobs. The ids come back through
    `PendingTokens.result()`."""
    assert all(r.params.logprobs is None and not r.params.tracks_logprob for r in rows)
    assert (mask is None) == all(r.matcher is None for r in rows), "grammar rows need their step's mask"
    return PendingTokens(_draw(logits, rows, history, mask, False)[0])


def _draw(
    logits: torch.Tensor, rows: list[SampleRow], history: TokenHistory | None, mask: GrammarMask | None,
    need_raw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # [N] int64 token ids, [N, vocab] f32 logprobs (need_raw), device
    """The draw of every row, all on the device: no host sync."""
    assert logits.dim() == 2 and logits.shape[0] == len(rows)
    if mask is not None:
        mask.apply(logits)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if need_raw else None

    device = logits.device
    banned = [(i, t) for i, r in enumerate(rows) for t in r.banned]
    if banned:
        index = to_device(banned, device)
        logits.index_put_((index[:, 0], index[:, 1]), torch.full((len(banned),), float("-inf"), device=device))
    _add_logit_bias(logits, rows)
    penalized = [i for i, r in enumerate(rows) if r.history is not None]
    if penalized:
        assert history is not None
        slots = to_device([rows[i].history for i in penalized], device)
        params = to_device([[rows[i].params.repetition_penalty, rows[i].params.presence_penalty,
                             rows[i].params.frequency_penalty] for i in penalized], device, torch.float32)
        penalized_rows = to_device(penalized, device)
        apply_penalties(logits, penalized_rows, history.counts[slots], history.in_prompt[slots],
                        params[:, 0], params[:, 1], params[:, 2])

    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = to_device(random_rows, device)
        probs = _filtered_probs(logits[idx], [rows[i].params for i in random_rows])
        q = torch.empty_like(probs)
        for j, i in enumerate(random_rows):
            q[j].exponential_(generator=rows[i].generator)
        tokens[idx] = (probs / q).argmax(dim=-1)
    if penalized:
        history.record([rows[i].request_id for i in penalized], slots, tokens[penalized_rows])
    return tokens, raw_logprobs


def _add_logit_bias(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """One scatter for every (row, token id, bias) of the batch."""
    biased = [(i, r.params.logit_bias) for i, r in enumerate(rows) if r.params.logit_bias]
    if not biased:
        return
    index = to_device([(i, t) for i, bias in biased for t in bias], logits.device)
    values = to_device([v for _, bias in biased for v in bias.values()], logits.device, logits.dtype)
    logits.index_put_((index[:, 0], index[:, 1]), values, accumulate=True)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[n, vocab] float32 logits -> probabilities after temperature, top-k, top-p, min-p."""
    device = logits.device
    temps = to_device([p.temperature for p in params], device, logits.dtype)
    logits = logits / temps.unsqueeze(1)
    vocab = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if any(top_k):
            k = to_device([k or vocab for k in top_k], device)
            drop |= torch.arange(vocab, device=device).unsqueeze(0) >= k.unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        if any(p < 1.0 for p in top_p):
            p = to_device(top_p, device, logits.dtype)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
            # before it already does. The first token is always kept.
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop |= mass_before >= p.unsqueeze(1)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        m = to_device(min_p, device, probs.dtype).unsqueeze(1)
        probs = probs.masked_fill(probs < m * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def request_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g
