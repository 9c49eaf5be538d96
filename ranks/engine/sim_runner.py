"""SimRunner: the model forward replaced by a timing model, for simulated workers (`sim.enabled`).

Everything else of a worker stays real: the scheduler, the block pool and its prefix cache, the
window it publishes, the handoff messages. Only `execute` differs: instead of running the model
it sleeps for the step's modeled time divided by `sim.speed`, and sampling returns a fixed token
(simulated requests run to `max_tokens`). Reported latencies are wall times times the speed.

Timing model (coefficients in a YAML, e.g. configs/sim/h100-llama8b.yaml; `bench/calibrate.py`
fits them on a real engine):

    prefill(new, cached) = b * new + c * new * (new / 2 + cached)   (per sequence chunk)
    decode(batch, kv)    = e * batch + f * kv                        (kv = context tokens read)
    step                 = max(a if the step prefills, d if it decodes) + the terms above
    handoff(tokens)      = tokens * kv_bytes_per_token / bandwidth + latency
    host copies(tokens)  = tokens * kv_bytes_per_token / host bandwidth + latency   (added to the next step)

NOTE: one step may mix prefill chunks and decodes (chunked prefill); its fixed part is the larger
of the two base costs (both mostly read the weights once), not their sum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvrelay.core.timing import TimingModel
from kvrelay.ranks.engine.scheduler import ScheduledSeq

SIM_TOKEN = 1  # every simulated sampled token; 0 < id < any vocab
MAX_LAG_S = 0.25  # wall seconds a busy worker may run behind its modeled clock and still catch up


@dataclass
class SimStats:
    modeled_s: float = 0.0  # sum of modeled step times
    slept_s: float = 0.0  # wall time spent sleeping for them
    late_steps: int = 0  # steps that began more than a step late on the modeled clock (caught up later)
    slip_s: float = 0.0  # wall time the modeled clock lost for good (behind by more than MAX_LAG_S)
    host_copy_s: float = 0.0  # modeled time of host tier copies (part of modeled_s)


class SimRunner:
    """Stands where a ModelRunner stands in the engine; holds no weights and no KV tensors."""

    simulated = True
    last_step_graph = False  # engine stats: a simulated step never replays a CUDA graph

    def __init__(self, timing: TimingModel, block_size: int, speed: float) -> None:
        assert speed > 0
        self.timing = timing
        self.block_size = block_size
        self.speed = speed
        self.device = torch.device("cpu")
        self.num_blocks = 0
        self.stats = SimStats()
        self._last_end = 0.0
        self._idle = True
        self._copies_s = 0.0  # modeled host tier copies issued since the last step

    def allocate_host(self, num_slots: int) -> None:
        """The host tier holds no bytes here: its copies only take modeled time."""

    # NOTE: the real runner issues host tier copies on the step's stream before its forward, so
    # their modeled time is added to the next step's, not overlapped with it.
    def copy_out(self, block_ids: list[int], slots: list[int]) -> None:
        self._copies_s += self.timing.host_copy_s(len(block_ids) * self.block_size)

    def copy_in(self, slots: list[int], block_ids: list[int]) -> None:
        self._copies_s += self.timing.host_copy_s(len(block_ids) * self.block_size)

    def block_bytes(self) -> int:
        return self.timing.model.kv_bytes_per_token * self.block_size

    def size_kv_cache(self, num_blocks: int | None) -> int:
        return num_blocks or int(self.timing.kv_cache_gib * (1 << 30)) // self.block_bytes()

    def allocate(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def execute(self, batch: list[ScheduledSeq]) -> int:
        """Sleep for the step's modeled time / speed; returns how many sequences sample."""
        chunks, decodes = [], []
        for item in batch:
            seq = item.seq
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                decodes.append(seq.num_computed_tokens + item.num_new_tokens)
            else:
                chunks.append((item.num_new_tokens, seq.num_computed_tokens))
        modeled = self.timing.step_s(chunks, decodes) + self._copies_s
        self.stats.host_copy_s += self._copies_s
        self._copies_s = 0.0
        self.stats.modeled_s += modeled
        wall = modeled / self.speed
        now = time.perf_counter()
        # NOTE: within a busy period, a step starts when the previous one ended on the modeled
        # clock, so host work between steps (scheduling, messages, the window) is absorbed into
        # the modeled time instead of adding to it, and a step that starts late (the host ran
        # over, or the OS ran another rank) is caught up by sleeping less afterwards. Only a lag
        # beyond MAX_LAG_S is given up (slip_s), so the modeled clock never races to catch up.
        start = now if self._idle else self._last_end
        if now - start > wall:
            self.stats.late_steps += 1
            if now - start > MAX_LAG_S:
                self.stats.slip_s += now - start
                start = now
        end = start + wall
        if end > now:
            time.sleep(end - now)
            self.stats.slept_s += end - now
        self._last_end = end
        self._idle = False
        return sum(1 for item in batch if item.samples)

    def idle(self) -> None:
        """The engine ran out of work: the next step starts a new busy period at its own time."""
        self._idle = True

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """A forked sample's block copy: simulated KV has no bytes to copy."""

    def sample(self, num_rows: int) -> list[int]:
        return [SIM_TOKEN] * num_rows

    # The KV handoff: a small payload stands for the KV (its block count), and the transfer takes
    # `transfer_s` of modeled time on both sides.
    def pack_kv(self, block_ids: list[int], heads: tuple[int, int] | None = None) -> torch.Tensor:  # [1] int64 cpu
        return torch.tensor([len(block_ids)], dtype=torch.int64)

    def kv_buffer(self, num_blocks: int, num_heads: int | None = None) -> torch.Tensor:  # [1] int64 cpu
        return torch.empty(1, dtype=torch.int64)

    def unpack_kv(self, buf: torch.Tensor, block_ids: list[int], first_head: int = 0) -> None:
        assert int(buf[0]) == len(block_ids), "the simulated KV payload is the block count"

    def transfer_s(self, num_tokens: int) -> float:
        """Wall seconds that a handoff of `num_tokens` tokens' KV takes."""
        return self.timing.handoff_s(num_tokens) / self.speed
