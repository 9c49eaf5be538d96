"""Launcher variables, read in one place: whether an MPI launcher started this process, its host,
and the CPUs it may use.

Launchers announce themselves through environment variables; kvrelay reads none of them elsewhere.
"""

from __future__ import annotations

import os
import socket

# Variables that a launcher sets in every process it starts, by launcher.
LAUNCHER_VARS = {
    "mpich/hydra": "PMI_RANK",
    "open-mpi": "OMPI_COMM_WORLD_RANK",
    "pmix (srun --mpi=pmix, prterun)": "PMIX_RANK",
    "slurm pmi2": "PMI_FD",
}


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in LAUNCHER_VARS.values())


def hostname() -> str:
    return socket.gethostname()


def cpu_threads(ranks_sharing: int = 1) -> int:
    """Torch threads for one CPU process of the job.

    With SLURM_CPUS_PER_TASK set, that many (Slurm gave each task its own CPUs). Otherwise the CPUs
    this process may run on (its affinity: a cpuset, `taskset` or the launcher's binding, not the
    machine's core count) split over the `ranks_sharing` processes of the job on this node."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        return min(cpus, int(per_task))
    return max(1, cpus // ranks_sharing)


def lock_disabled() -> bool:
    """KVRELAY_NO_LOCK=1: run without the output's lock, on a filesystem without flock (README)."""
    return os.environ.get("KVRELAY_NO_LOCK", "") not in ("", "0")
