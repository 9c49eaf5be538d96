"""The submitit Slurm executor of a job config: the `slurm` section's resources as submitit's
parameters, one task per rank under `srun --mpi=<slurm.srun_mpi>`. `kvrelay submit`
(launch/submit.py) hands it the job's callable."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import submitit

from kvrelay.configs.schema import ConfigError, JobConfig
from kvrelay.slurm.resources import placement


def parameters(cfg: JobConfig) -> dict[str, Any]:
    """submitit's `update_parameters` keywords for the config's `slurm` resources; ConfigError for
    a job submitit cannot start. Needs no Slurm: the checks run before anything asks for `srun`."""
    s = cfg.slurm
    place = placement(cfg)
    if len(set(place.ranks_per_node)) != 1:
        raise ConfigError(
            f"submitit starts the same number of tasks on every node, but {place.ntasks} ranks over "
            f"{place.nodes} nodes are {place.ranks_per_node}: make 1 + workers a multiple of slurm.nodes, "
            "or use `kvrelay sbatch`, which places the router beside the first node's workers"
        )
    if s.launcher != "srun":
        raise ConfigError("kvrelay submit runs the ranks with srun (submitit's way): set slurm.launcher=srun or use kvrelay sbatch")
    params: dict[str, Any] = {
        "job_name": s.job_name, "time": s.time_limit_min, "nodes": place.nodes,
        "ntasks_per_node": place.ranks_per_node[0], "cpus_per_task": s.cpus_per_task,
        "signal_delay_s": s.signal_lead_s, "setup": list(s.setup), "srun_args": [f"--mpi={s.srun_mpi}"],
        "additional_parameters": {"requeue": True} if s.requeue else {},
    }
    params.update({k: v for k, v in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                                     ("mem", s.mem), ("constraint", s.constraint)) if v})
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    for option in s.sbatch_options:
        key, _, value = option.removeprefix("--").partition("=")
        params["additional_parameters"][key.replace("-", "_")] = value or True
    return params


def executor(cfg: JobConfig, folder: str | Path) -> submitit.SlurmExecutor:
    """A submitit Slurm executor asking for the config's `slurm` resources (submitit refuses to
    make one where `srun` is not on PATH)."""
    params = parameters(cfg)
    ex = submitit.SlurmExecutor(folder=folder, python=cfg.slurm.python or sys.executable)
    ex.update_parameters(**params)
    return ex
