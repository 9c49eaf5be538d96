"""Where this process stands in a job: launcher variables read in one place, rank roles, its GPU.

Launchers announce themselves through environment variables; kvrelay reads none of them
elsewhere. Roles come from the config: rank 0 is the router, then the prefill, decode and
aggregated workers in that order.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from kvrelay.configs.schema import RolesSection

# Variables that a launcher sets in every process it starts, by launcher.
LAUNCHER_VARS = {
    "mpich/hydra": "PMI_RANK",
    "open-mpi": "OMPI_COMM_WORLD_RANK",
    "pmix (srun --mpi=pmix, prterun)": "PMIX_RANK",
    "slurm pmi2": "PMI_FD",
}
SLURM_VARS = {
    "rank": "SLURM_PROCID",
    "local_rank": "SLURM_LOCALID",
    "ntasks": "SLURM_NTASKS",
    "node": "SLURM_NODEID",
    "nodelist": "SLURM_JOB_NODELIST",
    "job_id": "SLURM_JOB_ID",
    "restart_count": "SLURM_RESTART_COUNT",
}


class LaunchError(RuntimeError):
    """The job cannot start as launched; the message says what to change."""


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in LAUNCHER_VARS.values())


def slurm_env() -> dict[str, str]:
    return {k: os.environ[v] for k, v in SLURM_VARS.items() if v in os.environ}


def hostname() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class Layout:
    """Role of every rank: rank 0 routes, then prefill, decode and aggregated workers."""

    prefill: int
    decode: int
    aggregated: int

    @classmethod
    def from_roles(cls, roles: RolesSection) -> Layout:
        return cls(roles.prefill, roles.decode, roles.aggregated)

    @property
    def world_size(self) -> int:
        return 1 + self.prefill + self.decode + self.aggregated

    def role(self, rank: int) -> str:
        if rank == 0:
            return "router"
        if rank <= self.prefill:
            return "prefill"
        if rank <= self.prefill + self.decode:
            return "decode"
        return "aggregated"

    def ranks(self, role: str) -> list[int]:
        return [r for r in range(1, self.world_size) if self.role(r) == role]

    @property
    def workers(self) -> list[int]:
        return list(range(1, self.world_size))

    def describe(self) -> str:
        return (
            f"1 router + {self.prefill} prefill + {self.decode} decode + {self.aggregated} aggregated "
            f"= {self.world_size} ranks"
        )

    def check_world(self, size: int) -> None:
        if size != self.world_size:
            raise LaunchError(
                f"the job was started with {size} ranks but the config asks for {self.describe()}; "
                f"start it with -n {self.world_size} or change roles.prefill/decode/aggregated"
            )
