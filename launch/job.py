"""The MPI job: every rank runs this after the config is loaded and checked.

    mpiexec -n 6 kvrelay run configs/disagg.yaml -i prompts.jsonl -o out.jsonl
    kvrelay run --local 6 configs/disagg.yaml -i prompts.jsonl -o out.jsonl   # starts mpiexec itself

Rank 0 routes (reads the JSONL, places, writes the output); the others are workers. An exception
on any rank is printed with its rank and host, beside the ranks of its host that died (the rank
table, launch/ranks.py), and aborts the whole job at once, so a dead rank never leaves the others
hanging.

Stop signals (SIGTERM, SIGUSR2, SIGINT): launch/stop.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable

import torch

from kvrelay.configs.schema import JobConfig
from kvrelay.core.layout import LaunchError, Layout
from kvrelay.launch import ranks, teardown
from kvrelay.launch.environment import cpu_threads, hostname
from kvrelay.launch.stop import STOP_SIGNALS, Stopped, on_stop, on_stop_worker, record_stop, release_node_segments, stop_marker
from kvrelay.router.frontend import Summary

log = logging.getLogger("kvrelay")

def run_mpi(cfg: JobConfig, after_stop: Callable[[int], None] | None = None) -> tuple[int, Summary | None]:
    """This rank's part of the job; returns (exit code, the summary on the router).

    `after_stop(signum)` runs on the router once a stop signal has closed the output and before
    the job ends (submitit's checkpoint-and-requeue, launch/submit.py)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.rank
    layout = Layout.from_roles(cfg.roles)
    try:
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            # MPICH serves one-sided reads of a busy worker only from its progress thread, which
            # needs MPI_THREAD_MULTIPLE.
            raise LaunchError(
                "the MPI library gave thread level "
                f"{MPI.Query_thread()} but kvrelay needs MPI_THREAD_MULTIPLE ({MPI.THREAD_MULTIPLE}); "
                "use an MPI built with thread support (the MPICH or Open MPI wheels, or your site's)"
            )
        layout.check_world(world.size)
    except LaunchError as e:
        print(f"kvrelay: error on rank {rank} ({hostname()}): {e}", file=sys.stderr)
        return 2, None
    if not _preflight(cfg, world):
        return 2, None
    role = layout.role(rank)
    table = ranks.gather(world, role, hostname())
    if rank == 0:
        ranks.record(table, cfg.output.path)
    workers = world.Split(0 if rank == 0 else 1, rank)
    group = world.Split(layout.leader(rank), rank)  # this rank's worker group; rank 0 of it leads
    try:
        if role == "router":
            return _router(cfg, world, layout)
        _worker(cfg, world, workers, group, layout)
        return 0, None
    except Stopped as stop:
        release_node_segments()
        if after_stop is not None:
            try:
                after_stop(stop.signum)
            except SystemExit:  # submitit's handler exits after requeueing; the Abort below ends every rank
                pass
        world.Abort(128 + stop.signum)
        # Abort returns when Slurm is already tearing the step down (a requeue): leave at once, so
        # that nothing (submitit's result file) records this run as finished.
        os._exit(128 + stop.signum)
    except BaseException:
        sys.stderr.write(f"kvrelay: rank {rank} ({role}) on {hostname()} failed:\n{traceback.format_exc()}")
        # A failed transfer or message is often another rank's death seen from this side: say so.
        for dead in ranks.dead_on_this_host(table, hostname()):
            sys.stderr.write(f"kvrelay: {dead.describe()} died\n")
        sys.stderr.flush()
        world.Abort(1)
    return 1, None


_output_lock: int | None = None  # the router's lock on the output, held until the process exits


def _preflight(cfg: JobConfig, world) -> bool:
    """The router checks the job's files and takes the output's lock before any rank loads
    anything; on a problem every rank returns, and only the router prints it."""
    from kvrelay.launch.preflight import USER_ERRORS, check_and_lock

    global _output_lock
    error = None
    if world.rank == 0:
        try:
            _output_lock = check_and_lock(cfg)
        except USER_ERRORS as e:
            error = str(e)
            print(f"kvrelay: error: {error}", file=sys.stderr)
    return world.bcast(error, root=0) is None


def _router(cfg: JobConfig, world, layout: Layout) -> tuple[int, Summary]:
    from kvrelay.launch.run import exit_code, frontend_for
    from kvrelay.router.frontend import write_summary
    from kvrelay.router.mpi_backend import MPIBackend

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop)
    if cfg.output.path is not None:
        stop_marker(cfg.output.path).unlink(missing_ok=True)
    frontend = None
    try:
        frontend, hash_seed = frontend_for(cfg)
        backend = MPIBackend(cfg, world, layout, hash_seed)
        log.info("%s; placement %s", layout.describe(), cfg.router.policy)
        summary = frontend.run(backend)
    except Stopped as stop:
        record_stop(cfg, stop.signum, frontend, who=f"rank {world.rank}: ")
        raise
    assert cfg.output.path is not None
    log.info("summary written to %s", write_summary(summary, cfg.output.path, frontend.timings if cfg.input.format == "trace" else None))
    rc = exit_code(cfg, summary)
    teardown.begin(f"rank {world.rank} (router)", cfg.job.teardown_timeout_s, rc)
    teardown.stage("freeing the cache windows (MPI_Win_free, with every rank of the job)")
    backend.close()
    return rc, summary


def _worker(cfg: JobConfig, world, workers, group, layout: Layout) -> None:
    from mpi4py import MPI

    from kvrelay.ranks.engine.engine import pick_device
    from kvrelay.ranks.engine.parallel import TPGroup
    from kvrelay.ranks.engine.step_sync import StepSync
    from kvrelay.ranks.follower import close_group, run_follower
    from kvrelay.ranks.worker import Worker

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop_worker)
    role, leader, size = layout.group_of(world.rank)
    if group.Split_type(MPI.COMM_TYPE_SHARED).size != group.size:
        raise LaunchError(
            f"the {role} worker of ranks {leader}..{leader + size - 1} (tp={size}) spans nodes; "
            "a tensor-parallel group must sit on one node: place consecutive ranks together (srun/mpirun block "
            f"distribution) with a multiple of {size} worker ranks per node"
        )
    local = workers.Split_type(MPI.COMM_TYPE_SHARED)
    # A simulated worker needs no device: its KV handoffs are small MPI messages.
    device = torch.device("cpu") if cfg.sim.enabled else pick_device(cfg.job.device)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local.rank >= n:
            raise LaunchError(
                f"{local.size} workers on {hostname()} but it has {n} GPUs; give each worker its own GPU "
                "(fewer ranks per node, or more GPUs per node)"
            )
        device = torch.device("cuda", local.rank)
        torch.cuda.set_device(device)
    else:
        # Ranks sharing a CPU node split its cores instead of each spawning a thread per core.
        torch.set_num_threads(cpu_threads(local.size + 1))  # + the router, on the first node
        log.info("rank %d: %d CPU threads", world.rank, torch.get_num_threads())
    # A simulated worker's group runs no model: its ranks need no collectives of their own.
    tp = TPGroup.from_mpi(group, device) if not cfg.sim.enabled else TPGroup()
    sync = StepSync(group) if group.size > 1 else None

    def done() -> Callable[[str], None]:  # the work is done: bound the teardown
        who = f"rank {world.rank} ({role}{f', tp rank {group.rank} of {group.size}' if group.size > 1 else ''})"
        teardown.begin(who, cfg.job.teardown_timeout_s)
        return teardown.stage

    if group.rank != 0:
        run_follower(cfg, world, workers, device, tp, sync, done)
        return
    worker = Worker(cfg, world, workers, role, device, layout, tp, sync)
    worker.run()
    close_group(done(), worker.window, worker.transport, worker.engine.runner, tp)
