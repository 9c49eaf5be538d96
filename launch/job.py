"""The MPI job: every rank runs this after the config is loaded and checked.

    mpiexec -n 6 kvrelay run configs/disagg.yaml -i prompts.jsonl -o out.jsonl
    kvrelay run --local 6 configs/disagg.yaml -i prompts.jsonl -o out.jsonl   # starts mpiexec itself

Rank 0 routes (reads the JSONL, places, writes the output); the others are workers. An exception
on any rank is printed with its rank and host and aborts the whole job at once, so a dead rank
never leaves the others hanging.

SIGTERM and SIGUSR2 (Slurm's notice before the time limit or a preemption, see slurm/) make the
router close the output (every answered line is already written), leave a stop marker beside it
naming the signal (`stop_marker`: after SIGUSR2 the job script requeues), and end the job; a
rerun resumes. On SIGUSR2 a worker only lets go of its node's shared memory, so that the router,
not the signal, decides when the job ends.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from kvrelay.configs.schema import JobConfig
from kvrelay.core.layout import LaunchError, Layout
from kvrelay.launch.environment import cpu_threads, hostname
from kvrelay.router.frontend import Summary

log = logging.getLogger("kvrelay")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Stopped(BaseException):
    """A stop signal: unwinds the router's loop so the output file is closed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_stop(signum, frame):
    # One stop is enough: a second signal (Slurm may send one to the job script and one to each
    # task) must not break into the router while it closes the output.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def _on_stop_worker(signum, frame):
    """Workers leave ending the job to the router (it Aborts every rank once the output is
    closed); SIGTERM still ends a worker at once, as before."""
    release_node_segments()
    if signum == signal.SIGTERM:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def release_node_segments() -> None:
    """Unlink the MPICH shared-memory segments this process maps; the mapping lives on until exit.

    NOTE: MPICH names the segment that bootstraps a node after the PMI job name, which Slurm's pmi2
    makes from JOBID.STEP: a requeued job's first step gets the same name again, and a segment
    left by the stopped run (its ranks are killed and never finalize) makes the rerun's MPI_Init
    wait forever. Every rank does this on a stop signal, so every node is clean for the rerun."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/dev/shm/mpich_shm_") and not fields[5].endswith("(deleted)"):
            Path(fields[5]).unlink(missing_ok=True)


def stop_marker(output_path: str | os.PathLike) -> Path:
    """The file the router leaves beside OUT.jsonl when a signal stopped it: OUT.stopped."""
    path = Path(output_path)
    return path.with_name(path.name.removesuffix(".jsonl") + ".stopped")


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
    workers = world.Split(0 if rank == 0 else 1, rank)
    try:
        if role == "router":
            return _router(cfg, world, layout)
        _worker(cfg, world, workers, role)
        return 0, None
    except Stopped as stop:
        release_node_segments()
        name = signal.Signals(stop.signum).name
        if cfg.output.path is not None:
            stop_marker(cfg.output.path).write_text(f"{name}\n")
        log.warning("rank %d: %s: the output file holds every answer so far; rerun to resume", rank, name)
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
        signal.signal(signum, _on_stop)
    if cfg.output.path is not None:
        stop_marker(cfg.output.path).unlink(missing_ok=True)
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

    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_worker)
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
        torch.set_num_threads(cpu_threads(world.Split_type(MPI.COMM_TYPE_SHARED).size))
        log.info("rank %d: %d CPU threads", world.rank, torch.get_num_threads())
    worker = Worker(cfg, world, workers, role, device)
    worker.run()
    worker.window.close()
    worker.transport.close()
