"""The timing model of one worker (step, prefill, decode, handoff and pull times from a few fitted
coefficients): simulated workers sleep for it (ranks/engine/sim_runner.py) and `kvrelay plan`
(router/layout_advice.py) advises layouts with it. Coefficients live in a YAML file such as
configs/sim/h100-llama8b.yaml; `bench/calibrate.py` fits them on a real engine.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvrelay.core.model_files import ModelConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrefillCoefficients(_Strict):
    base_s: float = Field(ge=0.0, description="a: fixed cost of a step that prefills")
    per_token_s: float = Field(ge=0.0, description="b: per new token (the matmuls)")
    per_attn_pair_s: float = Field(ge=0.0, description="c: per (query, key) pair of attention")


class DecodeCoefficients(_Strict):
    base_s: float = Field(ge=0.0, description="d: fixed cost of a step that decodes (reading the weights)")
    per_seq_s: float = Field(ge=0.0, description="e: per decoding sequence")
    per_kv_token_s: float = Field(ge=0.0, description="f: per context token whose KV is read")


class HandoffCoefficients(_Strict):
    bandwidth_gb_s: float = Field(gt=0.0, description="KV bytes per second, prefill -> decode worker, in GB/s")
    latency_s: float = Field(ge=0.0)


class HostCoefficients(_Strict):
    bandwidth_gb_s: float = Field(gt=0.0, description="KV bytes per second between host memory and the device, in GB/s")
    latency_s: float = Field(0.0, ge=0.0, description="fixed cost of one batch of copies")


# Pinned host <-> device copies measured on an H200 (issue 15, 2026-11-27, 1 GiB copies).
DEFAULT_HOST = HostCoefficients(bandwidth_gb_s=55.0, latency_s=0.0)


class SimModel(_Strict):
    name: str
    vocab_size: int = Field(gt=1)
    max_model_len: int = Field(gt=1)
    kv_bytes_per_token: int = Field(gt=0)


class TimingModel(_Strict):
    """One YAML file: what it was derived or fitted from, the model shape, the coefficients."""

    source: str = Field(description="how the numbers were obtained: 'derived: ...' or 'calibrated: ...'")
    model: SimModel
    kv_cache_gib: float = Field(gt=0.0, description="KV memory per worker, unless cache.num_blocks is set")
    prefill: PrefillCoefficients
    decode: DecodeCoefficients
    handoff: HandoffCoefficients
    host: HostCoefficients = DEFAULT_HOST

    @classmethod
    def load(cls, path: str | Path) -> TimingModel:
        p = Path(path)
        if not p.is_file():
            raise ModelConfigError(f"sim.timing: timing model file {str(p)!r} does not exist")
        try:
            return cls.model_validate(yaml.safe_load(p.read_text()))
        except (ValidationError, yaml.YAMLError) as e:
            raise ModelConfigError(f"sim.timing: {str(p)!r} is not a valid timing model: {e}") from None

    def prefill_s(self, new: int, cached: int) -> float:
        p = self.prefill
        return p.per_token_s * new + p.per_attn_pair_s * new * (new / 2 + cached)

    def decode_s(self, batch: int, kv_tokens: int) -> float:
        return self.decode.per_seq_s * batch + self.decode.per_kv_token_s * kv_tokens

    def step_s(self, chunks: list[tuple[int, int]], decodes: list[int]) -> float:
        """Modeled time of one step: prefill `chunks` of (new, cached) tokens and decodes reading
        `decodes[i]` context tokens each."""
        base = max(self.prefill.base_s if chunks else 0.0, self.decode.base_s if decodes else 0.0)
        return base + sum(self.prefill_s(n, c) for n, c in chunks) + self.decode_s(len(decodes), sum(decodes))

    def host_copy_s(self, num_tokens: int) -> float:
        """Modeled time of one batch of host <-> device copies of `num_tokens` tokens' KV."""
        if num_tokens == 0:
            return 0.0
        return num_tokens * self.model.kv_bytes_per_token / (self.host.bandwidth_gb_s * 1e9) + self.host.latency_s

    def host_hit_saving_s(self, num_tokens: int, cached: int) -> float:
        """What a prefill of `num_tokens` tokens after `cached` ones saves when their KV is brought
        in from the host tier instead of recomputed (negative when the copy costs more)."""
        return self.prefill_s(num_tokens, cached) - self.host_copy_s(num_tokens)

    def host_credit(self, block_size: int, gpu_blocks: int, host_blocks: int) -> float:
        """What `host_blocks` blocks from the host tier after `gpu_blocks` GPU hits are worth, in
        blocks recomputed: the recompute they save less their copy-in, over the recompute time of
        one of them (placement credits a GPU block as 1). 0 when bringing them in costs more."""
        return self._credit(block_size, gpu_blocks, host_blocks, self.host_copy_s)

    def pull_credit(self, block_size: int, own_blocks: int, pulled_blocks: int, overhead_s: float = 0.0) -> float:
        """What `pulled_blocks` blocks pulled from another worker after `own_blocks` blocks of its
        own are worth to a worker, in blocks recomputed (as `host_credit`): the pull goes over the
        handoff link and waits `overhead_s` more for its control round trips."""
        return self._credit(block_size, own_blocks, pulled_blocks, lambda n: self.handoff_s(n) + overhead_s)

    def _credit(self, block_size: int, have: int, blocks: int, bring_in_s) -> float:
        if blocks == 0:
            return 0.0
        new, cached = blocks * block_size, have * block_size
        recompute = self.prefill_s(new, cached)
        return max(0.0, recompute - bring_in_s(new)) / recompute * blocks if recompute else 0.0

    def handoff_s(self, num_tokens: int) -> float:
        h = self.handoff
        return num_tokens * self.model.kv_bytes_per_token / (h.bandwidth_gb_s * 1e9) + h.latency_s


DEFAULT_TIMING = Path(__file__).resolve().parents[1] / "configs" / "sim" / "h100-llama8b.yaml"


def load_timing(cfg) -> TimingModel:
    """The timing model of a job config's `sim.timing` (the shipped H100 / 8B file by default)."""
    return TimingModel.load(cfg.sim.timing or DEFAULT_TIMING)


def sim_max_model_len(cfg, timing: TimingModel) -> int:
    return min(cfg.model.max_model_len or timing.model.max_model_len, timing.model.max_model_len)
