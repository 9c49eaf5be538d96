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


class DiskCoefficients(_Strict):
    read_gb_s: float = Field(gt=0.0, description="KV bytes per second read from the disk tier's files, in GB/s")
    write_gb_s: float = Field(gt=0.0, description="KV bytes per second written to them, in GB/s")
    latency_s: float = Field(0.0, ge=0.0, description="fixed cost of one block's read or write")


# Pinned host <-> device copies measured on an H200 (issue 15, 2026-11-27, 1 GiB copies).
DEFAULT_HOST = HostCoefficients(bandwidth_gb_s=55.0, latency_s=0.0)
# NOTE: not measured here: the sequential read of one datacenter NVMe drive (PCIe 4, ~3 GB/s per
# drive is the low end of what GPU nodes' local scratch gives); set `disk:` in the YAML to calibrate.
DEFAULT_DISK = DiskCoefficients(read_gb_s=3.0, write_gb_s=2.0, latency_s=0.0)


class TensorParallelCoefficients(_Strict):
    """What a worker of tp ranks needs beyond the one-GPU coefficients (`TimingModel.for_tp`)."""

    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    activation_bytes: int = Field(2, gt=0, description="bytes per activation element all-reduced (bf16: 2)")
    decode_fixed_s: float = Field(ge=0.0, description="the part of decode.base_s that tp does not split (launches, sampling, host work)")
    weights_gib: float = Field(0.0, ge=0.0, description="the model's weights: each of tp ranks holds 1/tp, and its KV cache gets the rest")
    min_tp: int = Field(1, ge=1, description="the fewest ranks whose memory holds the model (a 70B in bf16: 2 H200)")
    kv_cache_gib_by_tp: dict[int, float] = Field(
        default_factory=dict, description="tp -> KV memory of one rank as measured at that tp; used instead of the estimate"
    )
    # NCCL all-reduce on 2-4 H200 outside CUDA graphs (2026-11-27): 16 KiB in 23-25 us, 4 MiB in 40-51 us.
    allreduce_latency_s: float = Field(24e-6, ge=0.0, description="one all-reduce of a few KiB")
    allreduce_bus_gb_s: float = Field(180.0, gt=0.0, description="bus bandwidth of a large all-reduce, GB/s")


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
    disk: DiskCoefficients = DEFAULT_DISK
    tp: TensorParallelCoefficients | None = None

    def for_tp(self, tp: int) -> TimingModel:
        """The timing model of a worker of `tp` ranks (tensor parallel, one GPU each; itself at tp=1).

        The matmuls and attention split over the ranks (prefill b and c, decode f: each rank reads its
        KV heads), and so does the weight streaming of a decode step (decode.base_s less its fixed part);
        each layer adds two all-reduces of the step's [tokens, hidden] activations (ring: 2 (tp-1)/tp of
        the bytes over the bus, plus a latency each). Each rank's KV cache gains the weights it no longer
        holds (or is what `tp.kv_cache_gib_by_tp` measured); the handoff and the host copies run on every
        rank at once (tp times the bandwidth). A tp below `tp.min_tp` is refused."""
        c = self.tp
        if c is not None and tp < c.min_tp:
            raise ModelConfigError(
                f"this timing model ({self.source!r}) is of a model that needs tp >= {c.min_tp} (its weights do not fit "
                f"fewer GPUs); set roles.*tp (or kvrelay plan --tp) to {c.min_tp} or more"
            )
        if tp == 1:
            return self
        if c is None:
            raise ModelConfigError(
                f"this timing model ({self.source!r}) has no `tp` section, so it cannot model a worker of {tp} ranks; "
                "add tp: {num_layers, hidden_size, decode_fixed_s} to its YAML, or set roles.*tp to 1"
            )
        if c.decode_fixed_s > self.decode.base_s:
            raise ModelConfigError(f"tp.decode_fixed_s ({c.decode_fixed_s}) exceeds decode.base_s ({self.decode.base_s}) in {self.source!r}")
        allreduces = 2 * c.num_layers
        per_token = allreduces * c.hidden_size * c.activation_bytes * 2 * (tp - 1) / tp / (c.allreduce_bus_gb_s * 1e9)
        latency = allreduces * c.allreduce_latency_s
        p, d = self.prefill, self.decode
        return self.model_copy(update={
            "source": f"{self.source}; at tp={tp}",
            "kv_cache_gib": tp * c.kv_cache_gib_by_tp.get(tp, self.kv_cache_gib + c.weights_gib * (1 - 1 / tp)),
            "prefill": PrefillCoefficients(base_s=p.base_s + latency, per_token_s=p.per_token_s / tp + per_token,
                                           per_attn_pair_s=p.per_attn_pair_s / tp),
            "decode": DecodeCoefficients(base_s=c.decode_fixed_s + (d.base_s - c.decode_fixed_s) / tp + latency,
                                         per_seq_s=d.per_seq_s + per_token, per_kv_token_s=d.per_kv_token_s / tp),
            "handoff": self.handoff.model_copy(update={"bandwidth_gb_s": self.handoff.bandwidth_gb_s * tp}),
            "host": self.host.model_copy(update={"bandwidth_gb_s": self.host.bandwidth_gb_s * tp}),
        })

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

    def disk_io_s(self, num_tokens: int, write: bool = False) -> float:
        """Modeled time of reading (or writing) `num_tokens` tokens' KV from (to) the disk tier."""
        if num_tokens == 0:
            return 0.0
        rate = self.disk.write_gb_s if write else self.disk.read_gb_s
        return num_tokens * self.model.kv_bytes_per_token / (rate * 1e9) + self.disk.latency_s

    def tier_credit(self, block_size: int, gpu_blocks: int, host_blocks: int, disk_blocks: int = 0) -> float:
        """What `host_blocks` blocks from the host tier and then `disk_blocks` from disk, after
        `gpu_blocks` GPU hits, are worth in blocks recomputed (placement credits a GPU block as 1):
        the recompute they save less the time to bring them in (all copied in from the host, the
        disk's read there first), over the recompute time of one of them. 0 when bringing them in
        costs more."""
        n = host_blocks + disk_blocks
        if n == 0:
            return 0.0
        new, cached = n * block_size, gpu_blocks * block_size
        recompute = self.prefill_s(new, cached)
        bring_in = self.host_copy_s(new) + self.disk_io_s(disk_blocks * block_size)
        return max(0.0, recompute - bring_in) / recompute * n if recompute else 0.0

    def pull_credit(self, block_size: int, own_blocks: int, pulled_blocks: int, overhead_s: float = 0.0,
                    host_blocks: int = 0) -> float:
        """What `pulled_blocks` blocks pulled from another worker after `own_blocks` blocks of its
        own are worth to a worker, in blocks recomputed (as `tier_credit`): the pull goes over the
        handoff link and waits `overhead_s` more for its control round trips; the last
        `host_blocks` of them come from the source's host tier, copied to its device first
        (`host_copy_s`, one batch, not overlapped with the link: an upper bound)."""
        host_s = self.host_copy_s(host_blocks * block_size) if host_blocks else 0.0
        return self._credit(block_size, own_blocks, pulled_blocks, lambda n: self.handoff_s(n) + overhead_s + host_s)

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
