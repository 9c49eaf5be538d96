"""Layout advice: how many prefill, decode or aggregated workers a workload wants on G GPUs.

    kvrelay plan --gpus 2 --input-len 3000 --output-len 150 [--timing configs/sim/h100-llama8b.yaml] [--tp 2]

A steady-state model of a saturated batch job (every worker always has work, as in an offline run
with `router.max_inflight` requests in flight), built on the same timing model that simulated
workers use (ranks/engine/sim_runner.py). Plain arithmetic on floats: no MPI, no torch.

Per worker, with B sequences decoding at a mean context of `input + output / 2` tokens:

- a decode step costs `decode.base + e * B + f * B * ctx` and finishes B / output requests;
- an aggregated worker adds the prompts of the requests it finishes to its steps (chunked prefill),
  so each step also carries `B / output` prompts' prefill work, and B is limited by the step's token
  budget: `B * (1 + new / output) <= max_batch_tokens`;
- a prefill worker fills steps of `max_batch_tokens` prompt tokens; a decode worker keeps as many
  sequences as its KV cache and `max_seqs` allow, and its steps carry no prefill.

A split layout runs at the slower of its two sides; requests cross by handoff, whose time adds to
the time to first token. The advice is the layout with the most requests per second per GPU that
meets the latency targets; aggregated wins near-ties (within `TIE`), since it moves no KV.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvrelay.core.timing import TimingModel

TIE = 0.02  # a split layout must beat aggregated by more than this to be advised


@dataclass
class Workload:
    input_tokens: float  # mean prompt tokens per request
    output_tokens: float  # mean output tokens per request
    cached_fraction: float = 0.0  # of the prompt tokens, expected prefix-cache hits

    def __post_init__(self) -> None:
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError("the workload needs input and output lengths of at least 1 token")
        if not 0.0 <= self.cached_fraction < 1.0:
            raise ValueError(f"cached fraction must be in [0, 1), got {self.cached_fraction}")

    @property
    def new_tokens(self) -> float:
        return max(1.0, self.input_tokens * (1.0 - self.cached_fraction))

    @property
    def cached_tokens(self) -> float:
        return self.input_tokens - self.new_tokens


@dataclass
class Limits:
    max_batch_tokens: int  # scheduler.max_batch_tokens
    max_seqs: int  # scheduler.max_seqs
    kv_tokens: int  # KV cache size of one worker, in tokens


@dataclass
class Estimate:
    layout: str  # "2 aggregated", "1 prefill + 1 decode"
    prefill: int
    decode: int
    aggregated: int
    requests_per_s: float  # the whole layout, saturated
    requests_per_s_per_gpu: float
    output_tokens_per_s: float
    ttft_s: float  # unloaded path of one request: its prefill (+ handoff)
    itl_s: float  # decode step time at the saturated batch
    bound: str  # what limits it: "prefill", "decode", "kv cache", "max_seqs", "step tokens"
    meets_targets: bool = True

    def to_json(self) -> dict:
        return asdict(self)


def _decode_step_s(t: TimingModel, batch: float, ctx: float) -> float:
    return t.decode.base_s + t.decode_s(batch, batch * ctx)


def _prefill_work_s(t: TimingModel, w: Workload) -> float:
    """Compute time of one prompt, fixed step cost excluded (it rides in steps that run anyway)."""
    return t.prefill_s(round(w.new_tokens), round(w.cached_tokens))


def _resident(w: Workload, lim: Limits) -> tuple[float, str]:
    """Sequences a worker can hold decoding at once, and which limit binds."""
    by_kv = lim.kv_tokens / (w.input_tokens + w.output_tokens)
    return (lim.max_seqs, "max_seqs") if lim.max_seqs <= by_kv else (max(1.0, by_kv), "kv cache")


def aggregated(t: TimingModel, w: Workload, lim: Limits, n: int) -> Estimate:
    batch, bound = _resident(w, lim)
    by_budget = lim.max_batch_tokens / (1.0 + w.new_tokens / w.output_tokens)
    if by_budget < batch:
        batch, bound = max(1.0, by_budget), "step tokens"
    ctx = w.input_tokens + w.output_tokens / 2
    finished_per_step = batch / w.output_tokens
    step = max(t.decode.base_s, t.prefill.base_s) + (_decode_step_s(t, batch, ctx) - t.decode.base_s) \
        + finished_per_step * _prefill_work_s(t, w)
    per_worker = finished_per_step / step
    chunks = -(-w.new_tokens // max(1.0, lim.max_batch_tokens - batch))
    return Estimate(
        layout=f"{n} aggregated", prefill=0, decode=0, aggregated=n,
        requests_per_s=n * per_worker, requests_per_s_per_gpu=per_worker,
        output_tokens_per_s=n * per_worker * w.output_tokens,
        ttft_s=chunks * step, itl_s=step, bound=bound,
    )


def split(t: TimingModel, w: Workload, lim: Limits, p: int, d: int) -> Estimate:
    steps_per_prompt = w.new_tokens / lim.max_batch_tokens
    prefill_s = _prefill_work_s(t, w) + t.prefill.base_s * max(1.0, steps_per_prompt)
    prefill_rate = p / prefill_s
    batch, bound = _resident(w, lim)
    step = _decode_step_s(t, batch, w.input_tokens + w.output_tokens / 2)
    decode_rate = d * (batch / w.output_tokens) / step
    rate = min(prefill_rate, decode_rate)
    return Estimate(
        layout=f"{p} prefill + {d} decode", prefill=p, decode=d, aggregated=0,
        requests_per_s=rate, requests_per_s_per_gpu=rate / (p + d),
        output_tokens_per_s=rate * w.output_tokens,
        ttft_s=prefill_s + t.handoff_s(round(w.input_tokens)), itl_s=step,
        bound="prefill" if prefill_rate < decode_rate else bound if bound != "max_seqs" else "decode",
    )


def plan(t: TimingModel, w: Workload, lim: Limits, gpus: int, ttft_s: float | None = None,
         itl_s: float | None = None, tp: int = 1) -> tuple[Estimate, list[Estimate]]:
    """Every layout of `gpus` GPUs as workers of `tp` GPUs each, and the advised one. `t` is one
    GPU's timing model (a worker runs at `t.for_tp(tp)`); `lim` is one worker's."""
    if gpus < 1 or tp < 1:
        raise ValueError("plan needs at least 1 GPU and tp >= 1")
    if gpus % tp:
        raise ValueError(f"{gpus} GPUs do not split into workers of tp={tp}; give a multiple of {tp}")
    t = t.for_tp(tp)
    n = gpus // tp
    options = [aggregated(t, w, lim, n)] + [split(t, w, lim, p, n - p) for p in range(1, n)]
    for e in options:
        e.requests_per_s_per_gpu /= tp
        if tp > 1:
            e.layout += f" (tp={tp})"
    for e in options:
        e.meets_targets = (ttft_s is None or e.ttft_s <= ttft_s) and (itl_s is None or e.itl_s <= itl_s)
    eligible = [e for e in options if e.meets_targets] or options
    best = max(eligible, key=lambda e: e.requests_per_s)
    agg = options[0]
    if best is not agg and agg in eligible and best.requests_per_s <= agg.requests_per_s * (1 + TIE):
        best = agg
    return best, options
