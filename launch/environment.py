"""Launcher variables, read in one place: whether an MPI launcher started this process, and its host.

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
