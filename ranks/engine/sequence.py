"""Sequence: one request's state inside a worker's engine (plain ints and lists, no tensors)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvrelay.core.request import Request, RequestResult, SamplingParams, TokenLogprob


def sample_key(request_id: str, index: int) -> str:
    """Names sample `index` of a request in the engine's per-sequence tables."""
    return request_id if index == 0 else f"{request_id}#{index}"


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    LOADING = "loading"  # admitted; its host tier blocks are being copied in
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then every sampled token
    num_prompt_tokens: int
    sampling: SamplingParams
    max_total_tokens: int  # prompt + output may not pass the context length
    status: SeqStatus = SeqStatus.WAITING
    # Tokens whose KV is in the cache. Tokens in [num_computed_tokens, len(token_ids)) run next.
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of the full blocks of token_ids, extended as blocks fill.
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache at first admission
    logprobs: list[TokenLogprob] | None = None
    handoff: bool = False  # on a prefill worker: leave the batch after the first token, keep the KV
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    first_token_time: float | None = None  # time.time() when the first output token was sampled
    index: int = 0  # sample i of a request with best_of > 1; sample 0 computes the prompt
    cumulative_logprob: float | None = None  # summed logprobs of its tokens, when best_of > n

    @property
    def key(self) -> str:
        """Names the sequence in the engine's per-sequence tables (generator, history, grammar)."""
        return sample_key(self.request_id, self.index)

    @classmethod
    def from_request(cls, req: Request, max_model_len: int, handoff: bool = False) -> Sequence:
        return cls(
            handoff=handoff,
            request_id=req.request_id,
            token_ids=list(req.prompt_token_ids),
            num_prompt_tokens=len(req.prompt_token_ids),
            sampling=req.sampling,
            max_total_tokens=min(max_model_len, len(req.prompt_token_ids) + req.sampling.max_tokens),
            logprobs=[] if req.sampling.logprobs is not None else None,
            cumulative_logprob=0.0 if req.sampling.tracks_logprob else None,
        )

    def fork(self, index: int) -> Sequence:
        """Sample `index` of this request, before its first token: the prompt, no blocks yet."""
        assert self.index == 0 and self.num_output_tokens == 0
        return Sequence(
            request_id=self.request_id, token_ids=list(self.token_ids), num_prompt_tokens=self.num_prompt_tokens,
            sampling=self.sampling, max_total_tokens=self.max_total_tokens, num_cached_tokens=self.num_cached_tokens,
            logprobs=None if self.logprobs is None else [], index=index,
            cumulative_logprob=None if self.cumulative_logprob is None else 0.0,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def result(self) -> RequestResult:
        assert self.finish_reason is not None
        return RequestResult(
            request_id=self.request_id,
            output_token_ids=self.output_token_ids,
            finish_reason=self.finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=max(self.num_cached_tokens, 0),
            stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            first_token_time=self.first_token_time,
            finish_time=time.time(),
            index=self.index,
            cumulative_logprob=self.cumulative_logprob,
        )
