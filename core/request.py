"""The typed records that travel from the router to a worker and back.

A request is validated and tokenized on the router; a worker receives only what it needs to run
it (token ids and sampling parameters) and returns token ids, logprobs and a finish reason. The
router turns the result into the OpenAI output line. Both records are plain dataclasses with one
dict form (`to_wire` / `from_wire`) so that a rank boundary can carry them with msgpack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StructuredOutput:
    """A grammar the output must follow (core/grammar.py turns it into xgrammar's). `kind` is "json"
    (`spec`: a JSON schema's text), "regex" (the pattern) or "choice" (a JSON list of the strings)."""

    kind: str
    spec: str


@dataclass
class SamplingParams:
    """vLLM's names and meanings. Validated on the router (see router/batch_input.py)."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1 on input) means no top-k
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives per sampled token; None = off
    presence_penalty: float = 0.0  # OpenAI's: minus this from a logit whose token is in the output
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # transformers': on tokens of prompt or output, logit / p if > 0, else * p
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    structured: StructuredOutput | None = None
    n: int = 1  # completions returned
    best_of: int = 1  # samples drawn from the one prefill (>= n); the n of highest cumulative logprob return

    @property
    def tracks_logprob(self) -> bool:
        """Sums each sample's logprobs to rank best_of samples."""
        return self.best_of > self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Needs the sequence's token history (ranks/engine/penalties.py)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @classmethod
    def from_wire(cls, d: dict) -> SamplingParams:
        d = dict(d)
        # msgpack keeps the int keys; a JSON round trip would have made them strings.
        d["logit_bias"] = {int(k): float(v) for k, v in (d.get("logit_bias") or {}).items()}
        if d.get("structured") is not None:
            d["structured"] = StructuredOutput(**d["structured"])
        return cls(**d)


@dataclass
class Request:
    """One prompt to run: what a worker needs and nothing more."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams

    def to_wire(self) -> dict:
        # NOTE: not asdict(self): it deep-copies the token list one int at a time (~20 ms for a
        # 12k-token prompt, which made the router the bottleneck of a trace replay).
        return {"request_id": self.request_id, "prompt_token_ids": self.prompt_token_ids,
                "sampling": asdict(self.sampling)}

    @classmethod
    def from_wire(cls, d: dict) -> Request:
        return cls(d["request_id"], list(d["prompt_token_ids"]), SamplingParams.from_wire(d["sampling"]))


@dataclass
class TokenLogprob:
    """Logprob of one sampled token and its top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestResult:
    """What a worker returns when a request finishes."""

    request_id: str
    output_token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None
    # Wall clock (time.time()) when the first output token was sampled and when the request
    # finished, on the worker that did it: TTFT and inter-token latency for benchmarks.
    first_token_time: float | None = None
    finish_time: float | None = None
    index: int = 0  # which of the request's best_of samples
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs (best_of > n)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict) -> RequestResult:
        d = dict(d)
        if d.get("logprobs") is not None:
            d["logprobs"] = [
                TokenLogprob(lp["token_id"], lp["logprob"], [tuple(t) for t in lp["top"]])
                for lp in d["logprobs"]
            ]
        return cls(**d)
