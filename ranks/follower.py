"""Follower rank: one of a tensor-parallel worker's ranks other than its leader.

It keeps no scheduler, block pool, window or router messages: it runs, on its shard of the model
and of the KV cache, exactly what the leader broadcasts (ranks/engine/step_sync.py), in order,
until the leader stops. Steps meet the leader's inside the forward (the row-parallel all-reduces);
its share of a KV handoff goes straight to or from the other group's ranks over the transport
(ranks/kv_link.py). With the host and disk KV tiers on, it holds its own tiers of its shard and
repeats the leader's copies and disk jobs (ranks/engine/group_tiers.py).

    mpiexec -n 3 python -m kvrelay.launch.cli run -i in.jsonl -o out.jsonl --model DIR --set roles.tp=2
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from kvrelay.configs.schema import JobConfig
from kvrelay.core.window import WindowReader
from kvrelay.ranks.engine.engine import make_runner, tier_sizes
from kvrelay.ranks.engine.group_tiers import TierFollower
from kvrelay.ranks.engine.model_runner import ModelRunner, StepArrays
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.step_sync import CopyBlocks, CopyKV, DiskJobs, PollDisk, RecvKV, SendKV, StepSync, UnpackKV
from kvrelay.ranks.transport import KVTransport, Pending, make_transport

log = logging.getLogger("kvrelay")


def run_follower(cfg: JobConfig, world, workers, device: torch.device, tp: TPGroup, sync: StepSync,
                 done: Callable[[], Callable[[str], None]] | None = None) -> None:
    """This rank's whole part of the job. It makes the same collective calls as its leader
    (ranks/worker.py), in the same order: the runner (the group's), the cache windows (the
    world's: it publishes none, so it joins as the router does), the KV transport (the workers').
    `done()`, called when the leader stops, returns a function that names each step of the
    teardown (launch/teardown.py bounds it)."""
    runner = tiers = None
    if not cfg.sim.enabled:
        runner = make_runner(cfg, device, tp=tp, sync=sync)[0]
        host_slots, disk_blocks = tier_sizes(cfg, runner.tier_block_bytes())
        if host_slots:
            tiers = TierFollower(runner, sync, host_slots, cfg.cache.disk_kv_path if disk_blocks else None)
    windows = WindowReader.create(world, [])
    transport = make_transport(workers, device)
    counts = follow(runner, sync, transport, tiers)
    log.debug("rank %d (tp rank %d): %s", world.rank, tp.rank, counts)
    stage = done() if done is not None else (lambda name: None)
    close_group(stage, windows, transport, runner, tp)


def close_group(stage: Callable[[str], None], windows, transport: KVTransport, runner, tp: TPGroup) -> None:
    """A group rank's teardown, leader and followers alike, in this order: the windows (MPI, with
    every rank), the KV transport (its NCCL pairs, with the other workers), the decode graphs, and
    only then the group's communicators, which NCCL does not let go while a graph holds them
    (ModelRunner.release_graphs)."""
    stage("freeing the cache windows (MPI_Win_free, with every rank of the job)")
    windows.close()
    stage("closing the KV transport (with the other workers)")
    transport.close()
    if isinstance(runner, ModelRunner):
        stage("destroying the decode CUDA graphs")
        runner.release_graphs()
    stage(f"closing the tensor-parallel group's communicators (tp={tp.size})")
    tp.close()


def follow(runner: ModelRunner | None, sync: StepSync, transport: KVTransport, tiers: TierFollower | None = None) -> dict:
    """Run the leader's steps and commands until it stops; a simulated worker's followers
    (`runner` None) only wait for the stop. `tiers`: this rank's host and disk KV tiers, if on.
    Returns counters for the log."""
    me = sync.comm.rank
    sending: list[Pending] = []
    receiving: dict[int, list[tuple[Pending, torch.Tensor, int]]] = {}
    counts = {"steps": 0, "kv_sent": 0, "kv_received": 0}
    while (cmd := sync.receive()) is not None:
        sending = [p for p in sending if not p.done()]
        assert runner is not None, f"a simulated worker's follower got {type(cmd).__name__}"
        if isinstance(cmd, StepArrays):
            if tiers is not None:
                tiers.before_step(cmd)
            runner.run(cmd)
            counts["steps"] += 1
        elif isinstance(cmd, CopyBlocks):
            if tiers is not None:
                tiers.before(cmd.src, cmd.dst)
            runner.copy_blocks(cmd.src, cmd.dst)
        elif isinstance(cmd, CopyKV):
            tiers.copy(cmd)
        elif isinstance(cmd, DiskJobs):
            tiers.disk_jobs(cmd)
        elif isinstance(cmd, PollDisk):
            tiers.poll_disk(cmd)
        elif isinstance(cmd, SendKV):
            if tiers is not None:
                tiers.before(cmd.block_ids, [])
            for p in cmd.pieces:
                if p.rank == me:
                    sending.append(transport.send(runner.pack_kv(cmd.block_ids, (p.first_head, p.num_heads)), p.peer, p.tag))
                    counts["kv_sent"] += 1
        elif isinstance(cmd, RecvKV):
            mine = []
            for p in cmd.pieces:
                if p.rank == me:
                    buf = runner.kv_buffer(cmd.num_blocks, p.num_heads)
                    mine.append((transport.recv(buf, p.peer, p.tag), buf, p.first_head))
            if mine:
                receiving[cmd.key] = mine
        elif isinstance(cmd, UnpackKV):
            if tiers is not None:
                tiers.before([], cmd.block_ids)
            for pending, buf, first_head in receiving.pop(cmd.key, []):
                pending.wait()
                runner.unpack_kv(buf, cmd.block_ids, first_head)
                counts["kv_received"] += 1
        else:
            raise RuntimeError(f"follower got an unknown command {cmd!r}")
    for p in sending:
        p.wait()
    assert not receiving, f"the leader stopped with receives {sorted(receiving)} not unpacked"
    return counts
