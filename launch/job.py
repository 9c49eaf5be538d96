"""The MPI job: every rank runs this after the config is loaded and checked.

    mpiexec -n 6 kvrelay run configs/disagg.yaml -i prompts.jsonl -o out.jsonl
    kvrelay run --local 6 configs/disagg.yaml -i prompts.jsonl -o out.jsonl   # starts mpiexec itself

Rank 0 routes (reads the JSONL, places, writes the output); the others are workers. An exception
on any rank is printed with its rank and host and aborts the whole job at once, so a dead rank
never leaves the others hanging. SIGTERM makes the router close the output (every answered
line is already written) and end the job; a rerun resumes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

import torch

from kvrelay.configs.schema import JobConfig
from kvrelay.launch.environment import LaunchError, Layout, hostname
from kvrelay.router.frontend import Summary

log = logging.getLogger("kvrelay")

EXIT_SIGTERM = 143


class Terminated(BaseException):
    """SIGTERM: unwinds the router's loop so the output file is closed on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_mpi(cfg: JobConfig) -> tuple[int, Summary | None]:
    """This rank's part of the job; returns (exit code, the summary on the router)."""
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
    role = layout.role(rank)
    workers = world.Split(0 if rank == 0 else 1, rank)
    try:
        if role == "router":
            return _router(cfg, world, layout)
        _worker(cfg, world, workers, role)
        return 0, None
    except Terminated:
        log.warning("rank %d: SIGTERM: the output file holds every answer so far; rerun to resume", rank)
        world.Abort(EXIT_SIGTERM)
    except BaseException:
        sys.stderr.write(f"kvrelay: rank {rank} ({role}) on {hostname()} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        world.Abort(1)
    return 1, None


def _router(cfg: JobConfig, world, layout: Layout) -> tuple[int, Summary]:
    from kvrelay.launch.run import exit_code, frontend_for
    from kvrelay.router.frontend import write_summary
    from kvrelay.router.mpi_backend import MPIBackend

    signal.signal(signal.SIGTERM, _on_sigterm)
    frontend, hash_seed = frontend_for(cfg)
    backend = MPIBackend(cfg, world, layout, hash_seed)
    log.info("%s; placement %s", layout.describe(), cfg.router.policy)
    summary = frontend.run(backend)
    assert cfg.output.path is not None
    log.info("summary written to %s", write_summary(summary, cfg.output.path, frontend.timings if cfg.input.format == "trace" else None))
    backend.close()
    return exit_code(cfg, summary), summary


def _worker(cfg: JobConfig, world, workers, role: str) -> None:
    from mpi4py import MPI

    from kvrelay.ranks.engine.engine import pick_device
    from kvrelay.ranks.worker import Worker

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (local.size + 1)))
    worker = Worker(cfg, world, workers, role, device)
    worker.run()
    worker.window.close()
    worker.transport.close()
