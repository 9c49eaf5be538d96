"""Per-sequence token history on the device, for the repetition, presence and frequency penalties.

A sequence that asks for a penalty gets a slot: one row of `counts` (how often each token id is in
its output so far) and one of `in_prompt` (which token ids its prompt holds). The slot is filled
from the sequence's token ids the first time it samples on this engine (a sequence handed off by a
prefill worker arrives with its first output token), and from then on one scatter per step adds the
step's sampled tokens. So a step costs a gather of the penalized rows and a scatter, whatever the
prompt and output lengths, and rows that use no penalty cost nothing. A preempted sequence keeps its
slot: recomputing its KV samples no token, so nothing is counted twice.

NOTE: the two tables are allocated on first use and grow by doubling: slots x vocab x 5 bytes
(256 sequences of a 128k vocabulary: 160 MiB), taken from what the KV cache left free.
"""

from __future__ import annotations

import torch


class TokenHistory:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.counts: torch.Tensor | None = None  # [capacity, vocab] int32, the logits' device
        self.in_prompt: torch.Tensor | None = None  # [capacity, vocab] bool, the logits' device
        self.slots: dict[str, int] = {}  # request id -> row
        self.counted: dict[str, int] = {}  # request id -> output tokens in its row (a check)
        self.free: list[int] = []

    def slot(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, device: torch.device) -> int:
        """The row of a sequence whose tokens are `token_ids` (prompt, then output)."""
        row = self.slots.get(request_id)
        num_output = len(token_ids) - num_prompt_tokens
        if row is not None:
            assert self.counted[request_id] == num_output, "a sampled token was not recorded"
            return row
        row = self._take(device)
        self.counts[row].zero_()
        self.in_prompt[row].zero_()
        ids = torch.tensor(token_ids, dtype=torch.int64).to(device, non_blocking=True)
        self.in_prompt[row, ids[:num_prompt_tokens]] = True
        if num_output:
            self.counts[row].index_put_((ids[num_prompt_tokens:],), torch.ones_like(ids[num_prompt_tokens:], dtype=torch.int32), accumulate=True)
        self.slots[request_id] = row
        self.counted[request_id] = num_output
        return row

    def record(self, request_ids: list[str], rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the sampled `tokens` ([P] int64) in `rows` ([P] int64), both on the device."""
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        for r in request_ids:
            self.counted[r] += 1

    def release(self, request_id: str) -> None:
        row = self.slots.pop(request_id, None)
        if row is not None:
            del self.counted[request_id]
            self.free.append(row)

    def _take(self, device: torch.device) -> int:
        if not self.free:
            old = 0 if self.counts is None else self.counts.shape[0]
            new = max(8, 2 * old)
            counts = torch.zeros(new, self.vocab_size, dtype=torch.int32, device=device)
            in_prompt = torch.zeros(new, self.vocab_size, dtype=torch.bool, device=device)
            if old:
                counts[:old] = self.counts
                in_prompt[:old] = self.in_prompt
            self.counts, self.in_prompt = counts, in_prompt
            self.free = list(range(new - 1, old - 1, -1))
        return self.free.pop()


def apply_penalties(
    logits: torch.Tensor,  # [N, vocab] float32, changed in place
    rows: torch.Tensor,  # [P] int64: the penalized rows of logits
    counts: torch.Tensor,  # [P, vocab] int32: output token counts of those rows
    in_prompt: torch.Tensor,  # [P, vocab] bool
    repetition: torch.Tensor,  # [P] float32
    presence: torch.Tensor,  # [P] float32
    frequency: torch.Tensor,  # [P] float32
) -> None:
    """vLLM's order: the repetition penalty (transformers' rule) on tokens of the prompt or the
    output, then OpenAI's frequency and presence penalties on tokens of the output."""
    x = logits[rows]
    in_output = counts > 0
    rep = repetition.unsqueeze(1)
    x = torch.where(in_prompt | in_output, torch.where(x > 0, x / rep, x * rep), x)
    x = x - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * in_output
    logits[rows] = x
