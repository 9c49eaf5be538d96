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
    host copies(tokens)  = tokens * kv_bytes_per_token / host bandwidth + latency   (on a copy stream)

NOTE: one step may mix prefill chunks and decodes (chunked prefill); its fixed part is the larger
of the two base costs (both mostly read the weights once), not their sum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvrelay.core.timing import TimingModel
from kvrelay.ranks.engine.disk_tier import DiskIOStats
from kvrelay.ranks.engine.scheduler import ScheduledSeq

SIM_TOKEN = 1  # every simulated sampled token; 0 < id < any vocab
MAX_LAG_S = 0.25  # wall seconds a busy worker may run behind its modeled clock and still catch up


@dataclass
class SimStats:
    modeled_s: float = 0.0  # sum of modeled step times
    slept_s: float = 0.0  # wall time spent sleeping for them
    late_steps: int = 0  # steps that began more than a step late on the modeled clock (caught up later)
    slip_s: float = 0.0  # wall time the modeled clock lost for good (behind by more than MAX_LAG_S)
    host_copy_s: float = 0.0  # modeled time of host tier copies, on their own stream
    copy_stall_s: float = 0.0  # modeled time steps waited for a copy-out to free a block (part of modeled_s)


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
        self._stall_s = 0.0  # modeled wait for copies before the next step's forward
        self.host: SimHostCopies | None = None

    def allocate_host(self, num_slots: int) -> None:
        """The host tier holds no bytes here: its copies only take modeled time."""
        self.host = SimHostCopies(self)

    def block_bytes(self) -> int:
        return self.timing.model.kv_bytes_per_token * self.block_size

    def tier_block_bytes(self) -> int:
        return self.block_bytes()  # the whole model's: the timing model is the group's

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
        modeled = self.timing.step_s(chunks, decodes) + self._stall_s
        self.stats.copy_stall_s += self._stall_s
        self._stall_s = 0.0
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

    def pack_mixed(self, block_ids: list[int], slots: list[int]) -> torch.Tensor:  # [1] int64 cpu
        return torch.tensor([len(block_ids) + len(slots)], dtype=torch.int64)

    def kv_buffer(self, num_blocks: int, num_heads: int | None = None) -> torch.Tensor:  # [1] int64 cpu
        return torch.empty(1, dtype=torch.int64)

    def unpack_kv(self, buf: torch.Tensor, block_ids: list[int], first_head: int = 0) -> None:
        assert int(buf[0]) == len(block_ids), "the simulated KV payload is the block count"

    def transfer_s(self, num_tokens: int) -> float:
        """Wall seconds that a handoff of `num_tokens` tokens' KV takes."""
        return self.timing.handoff_s(num_tokens) / self.speed


class SimHostCopies:
    """The copy stream of a simulated host tier (HostKVMemory's surface): batches run one after
    another on a wall clock of their modeled time / speed, overlapping the steps; a step pays
    only when it must write a block whose copy-out has not finished (`order_before_write`)."""

    def __init__(self, runner: SimRunner) -> None:
        self.runner = runner
        self.free_at = 0.0  # wall time the stream finishes its last batch
        self.in_flight: list[tuple[int, float]] = []  # (batch, wall time it ends), oldest first
        self.issued = -1

    def issue(self, batch) -> None:
        r = self.runner
        modeled = r.timing.host_copy_s((len(batch.out) + len(batch.inn)) * r.block_size)
        r.stats.host_copy_s += modeled
        self.free_at = max(time.perf_counter(), self.free_at) + modeled / r.speed
        self.in_flight.append((batch.number, self.free_at))
        self.issued = batch.number

    def completed(self) -> int:
        now = time.perf_counter()
        while self.in_flight and self.in_flight[0][1] <= now:
            self.in_flight.pop(0)
        return self.in_flight[0][0] - 1 if self.in_flight else self.issued

    def _end(self, batch: int) -> float:
        return next((end for number, end in self.in_flight if number >= batch), 0.0)

    def order_before_write(self, batch: int) -> None:
        self.runner._stall_s += max(0.0, self._end(batch) - time.perf_counter()) * self.runner.speed

    def wait(self, batch: int) -> None:
        left = self._end(batch) - time.perf_counter()
        if left > 0:
            time.sleep(left)


class SimDiskStore:
    """The disk thread of a simulated disk tier (DiskStore's surface): no files, each job takes its
    modeled time / speed of wall time, one after another, and every read succeeds."""

    def __init__(self, runner: SimRunner) -> None:
        self.runner = runner
        self.free_at = 0.0
        self.queue: list[tuple[float, tuple[str, int, int, bool]]] = []  # (wall time it ends, result), in order
        self.stats = DiskIOStats()

    @property
    def in_flight(self) -> int:
        return len(self.queue)

    def _add(self, op: str, block_hash: int, slot: int) -> None:
        r = self.runner
        modeled = r.timing.disk_io_s(r.block_size, write=op == "w")
        self.free_at = max(time.perf_counter(), self.free_at) + modeled / r.speed
        self.queue.append((self.free_at, (op, block_hash, slot, True)))
        nbytes = r.block_bytes()
        if op == "w":
            self.stats.write_bytes += nbytes
            self.stats.write_s += modeled
        else:
            self.stats.read_bytes += nbytes
            self.stats.read_s += modeled

    def submit(self, jobs: list[tuple[str, int, int]]) -> None:
        for op, h, slot in jobs:
            if op != "d":  # simulated blocks have no files to remove
                self._add(op, h, slot)

    def poll(self, wait_s: float = 0.0) -> list[tuple[str, int, int, bool]]:
        if wait_s and self.queue:
            time.sleep(max(0.0, min(wait_s, self.queue[0][0] - time.perf_counter())))
        now = time.perf_counter()
        n = next((i for i, (end, _) in enumerate(self.queue) if end > now), len(self.queue))
        out = [res for _, res in self.queue[:n]]
        del self.queue[:n]
        return out
