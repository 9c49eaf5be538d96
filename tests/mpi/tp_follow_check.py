"""The leader/follower step protocol on real ranks: only rank 0 schedules; the others run what it broadcasts.

    mpiexec -n 2 python tests/mpi/tp_follow_check.py ARCH=DIR

Every rank builds a ModelRunner over its shard of the checkpoint (one TPGroup over COMM_WORLD).
Rank 0 alone makes the steps (prompts of 3 sequences in chunks, then greedy decode steps, as an
engine would), publishes each step's StepArrays with StepSync and runs it; the other ranks only
loop on `receive()` and run what arrives, until the leader's `stop()`. The leader's logits must
match a whole (tp=1) runner on the same steps to 1e-5 in float32. Then rank 0 prints the mean
time of publishing a decode step of 1 and of 128 sequences (table width 256), and "tp_follow_check OK".
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from abort_on_failure import run_or_abort
from kvrelay.ranks.engine.loader import iter_weights, read_model_dir
from kvrelay.ranks.engine.model_runner import ModelRunner, StepArrays
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.sharding import TPShard
from kvrelay.ranks.engine.step_sync import StepSync

CPU = torch.device("cpu")
BLOCK, MAX_LEN, NUM_BLOCKS = 4, 64, 48


def runner(spec, files, group: TPGroup) -> ModelRunner:
    shard = TPShard.of(spec, group.rank, group.size)
    r = ModelRunner(spec, iter_weights(files, torch.float32, CPU, shard), torch.float32, CPU, BLOCK, MAX_LEN,
                    max_seqs=4, max_batch_tokens=64, cuda_graphs=False, tp=group)
    r.allocate(NUM_BLOCKS)
    return r


def lead(sharded: ModelRunner, whole: ModelRunner, sync: StepSync) -> None:
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (21, 9, 30)]
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(3)]
    done = [0, 0, 0]
    for step in range(14):
        # Prompts in chunks of at most 12 tokens, then one token at a time: mixed steps, then decode steps.
        items = []
        for i, s in enumerate(seqs):
            new = min(12, len(s) - done[i])
            items.append((s, done[i], new, tables[i], done[i] + new == len(s)))
        a = sharded._arrays(items)
        sync.publish(a)
        got = sharded._run(a, graphs=False)
        want = whole._run(whole._arrays(items), graphs=False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
        rows = iter(want.argmax(dim=-1).tolist())
        for i, (s, start, new, _, samples) in enumerate(items):
            done[i] = start + new
            if samples:
                s.append(next(rows))
    sync.stop()


def publish_time(sync: StepSync, world: MPI.Comm, n: int, width: int, reps: int = 200) -> float:
    z = np.zeros(n, np.int64)
    a = StepArrays(z, z, z, np.arange(n + 1), z + 1, np.zeros((n, width), np.int64), np.arange(n))
    world.Barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        sync.publish(a)
    sync.stop()
    world.Barrier()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    world = MPI.COMM_WORLD
    torch.set_num_threads(1)
    group = TPGroup.from_mpi(world, CPU)
    sync = StepSync(world)
    arch, path = sys.argv[1].split("=", 1)
    spec, files = read_model_dir(path)
    sharded = runner(spec, files, group)
    if sync.is_leader:
        lead(sharded, runner(spec, files, TPGroup()), sync)
        times = {n: publish_time(sync, world, n, 256) for n in (1, 128)}
        print(f"{arch}: publish a decode step: 1 seq {times[1] * 1e6:.0f} us, 128 seqs {times[128] * 1e6:.0f} us", flush=True)
    else:
        while (a := sync.receive()) is not None:
            sharded._run(a, graphs=False)
        for _ in (1, 128):
            world.Barrier()
            while sync.receive() is not None:
                pass
            world.Barrier()
    world.Barrier()
    if world.rank == 0:
        print(f"tp_follow_check OK tp={world.size}", flush=True)


if __name__ == "__main__":
    run_or_abort(main)
