"""The host and disk KV tiers of a tensor-parallel group: each rank holds its shard of every block,
so each rank has its own host memory (the same slots, numbered alike) and its own disk files. The
leader's HostTier and DiskTier decide for the group; its other ranks repeat each decision on their
shard, in the leader's order (commands of ranks/engine/step_sync.py):

    leader                                     other ranks (ranks/follower.py, TierFollower)
    GroupHostMemory.issue(batch)  -> CopyKV    the same copies, on their own copy stream
    GroupDiskStore.submit(jobs)   -> DiskJobs  the same jobs, on their own files
    GroupDiskStore.poll()         -> PollDisk  `agree`: which jobs every rank finished, and how

NOTE (agreement): each rank's disk thread runs its jobs in the order they were submitted, the same
on every rank, so the k-th result of every rank is the same job. `agree` allgathers each rank's
finished jobs and takes the first that all of them finished, ok only if ok everywhere: a file that
fails its checksum on any rank fails the group's read, which the leader's DiskTier turns into a
recompute for the whole group (and a removal of the block's files on every rank). A write that
failed on any rank is removed from the ranks where it succeeded.

NOTE (ordering): the leader orders its compute stream and its disk thread by its own copy stream
(host_tier.py). Another rank's copies may finish later, so it orders its own: a step or command
that reads a block being copied in, or writes one being copied out, first waits (on the GPU) for
that batch on the rank's stream (`HostKVMemory.order_before_use`), and disk jobs wait (on the host)
for the copy batch that the leader had seen finish when it chose them (their slots' last copies).
"""

from __future__ import annotations

import numpy as np

from kvrelay.ranks.engine.disk_tier import DiskStore
from kvrelay.ranks.engine.host_memory import HostKVMemory
from kvrelay.ranks.engine.host_tier import CopyBatch
from kvrelay.ranks.engine.model_runner import ModelRunner, StepArrays
from kvrelay.ranks.engine.step_sync import CopyKV, DiskJobs, PollDisk, StepSync

_OPS = ("w", "r", "d")
_U64 = 1 << 64

DiskResult = tuple[str, int, int, bool]  # (op, block hash, host slot, ok), as DiskStore.poll


def _signed(h: int) -> int:
    return h - _U64 if h >= 1 << 63 else h


def agree(sync: StepSync, store: DiskStore, mine: list[DiskResult]) -> list[DiskResult]:
    """Collective over the group: the leading jobs of `mine` (this rank's finished jobs not agreed
    yet, in order; taken off it) that every rank has finished, each ok only if ok on every rank."""
    flags = sync.comm.allgather(bytes(ok for *_, ok in mine))
    n = min(len(f) for f in flags)
    out = []
    for i, (op, h, slot, ok) in enumerate(mine[:n]):
        group_ok = all(f[i] for f in flags)
        if op == "w" and ok and not group_ok:
            store.submit([("d", h, -1)])
        out.append((op, h, slot, group_ok))
    del mine[:n]
    return out


class GroupHostMemory(HostKVMemory):
    """The leader's host memory: each copy batch goes to the group's other ranks first."""

    def __init__(self, kv_caches, num_slots: int, sync: StepSync) -> None:
        super().__init__(kv_caches, num_slots)
        self.sync = sync

    def issue(self, batch: CopyBatch) -> None:
        out_blocks, out_slots = zip(*batch.out) if batch.out else ((), ())
        in_slots, in_blocks = zip(*batch.inn) if batch.inn else ((), ())
        self.sync.publish(CopyKV(batch.number, list(out_blocks), list(out_slots), list(in_slots), list(in_blocks)))
        super().issue(batch)


class GroupDiskStore:
    """The leader's disk store (DiskStore's surface): its jobs go to the group's other ranks first,
    and a job is finished once every rank has finished it (`agree`). `stats` are the leader's files'."""

    def __init__(self, store: DiskStore, sync: StepSync, host: HostKVMemory) -> None:
        self.store, self.sync, self.host = store, sync, host
        self.mine: list[DiskResult] = []
        self.in_flight = 0  # jobs with a result the group has not agreed on

    @property
    def stats(self):
        return self.store.stats

    def submit(self, jobs: list[tuple[str, int, int]]) -> None:
        ops, hashes, slots = zip(*jobs)
        self.sync.publish(DiskJobs(self.host.settled, [_OPS.index(op) for op in ops], [_signed(h) for h in hashes],
                                   list(slots)))
        self.store.submit(jobs)
        self.in_flight += sum(op != "d" for op in ops)

    def poll(self, wait_s: float = 0.0) -> list[DiskResult]:
        if not self.in_flight:
            return []
        self.mine += self.store.poll(wait_s)
        if not self.mine:  # no rank can have agreed on more than the leader finished
            return []
        self.sync.publish(PollDisk(int(wait_s * 1e6)))
        done = agree(self.sync, self.store, self.mine)
        self.in_flight -= len(done)
        return done


class TierFollower:
    """A follower rank's side of its group's tiers: its host memory, its disk files, and the
    ordering of its compute stream after its own copies."""

    def __init__(self, runner: ModelRunner, sync: StepSync, host_slots: int, disk_root: str | None) -> None:
        self.runner, self.sync = runner, sync
        runner.allocate_host(host_slots)
        self.store = runner.disk_store(disk_root) if disk_root is not None else None
        self.mine: list[DiskResult] = []

    def copy(self, cmd: CopyKV) -> None:
        self.runner.host.issue(CopyBatch(cmd.number, list(zip(cmd.out_blocks, cmd.out_slots)),
                                         list(zip(cmd.in_slots, cmd.in_blocks))))

    def before_step(self, a: StepArrays) -> None:
        """Order the step after the copies in flight of the blocks it reads (its sequences' blocks
        so far) and writes (its tokens' slots)."""
        if not self.runner.host.in_flight:
            return
        B = self.runner.block_size
        used = np.arange(a.tables.shape[1]) < -(-a.seq_lens[:, None] // B)
        self.before(a.tables[used], a.slots // B)

    def before(self, read: list[int] | np.ndarray, written: list[int] | np.ndarray) -> None:
        """Order the next command, which reads blocks `read` and writes `written`, after their copies."""
        self.runner.host.order_before_use(np.asarray(read, np.int64), np.asarray(written, np.int64))

    def disk_jobs(self, cmd: DiskJobs) -> None:
        if any(op != 2 for op in cmd.ops):
            self.runner.host.wait(cmd.settled)  # the slots' last copies, as the leader saw them finished
        self.store.submit([(_OPS[op], h % _U64, slot) for op, h, slot in zip(cmd.ops, cmd.hashes, cmd.slots)])

    def poll_disk(self, cmd: PollDisk) -> None:
        self.mine += self.store.poll(0.0 if self.mine else cmd.wait_us / 1e6)
        agree(self.sync, self.store, self.mine)
