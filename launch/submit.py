"""`kvrelay submit` and `kvrelay.launch.submit`: the job as one multi-task submitit Slurm job.

    kvrelay submit configs/demo.yaml -i prompts.jsonl -o out.jsonl --model DIR [--wait]

    from kvrelay.launch import submit
    job = submit("configs/demo.yaml", input="prompts.jsonl", output="out.jsonl", model="DIR")
    summary = job.results()[0]      # task 0, the router: OUT.summary.json's content

submitit starts one task per rank (slurm/submitit_job.py); each runs `run_mpi`. Before the time
limit or on preemption submitit sends USR2 to every task: the router closes the output, then
submitit's handler (on global rank 0, the router) checkpoints this callable as it is and requeues
the job; the rerun resumes from the output file.
"""

from __future__ import annotations

import signal
from pathlib import Path

import submitit

from kvrelay.configs.schema import ConfigError, JobConfig, load_config
from kvrelay.launch.job import run_mpi
from kvrelay.slurm.resources import check_cluster, cluster_partitions
from kvrelay.slurm.sbatch import job_paths
from kvrelay.slurm.submitit_job import executor


class BatchJob(submitit.helpers.Checkpointable):
    """The callable every task runs. Checkpointing needs no state: the output file is the state."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg

    def __call__(self) -> dict | None:
        # submitit installed its USR2 handler (checkpoint and requeue, from global rank 0) before
        # calling us; the router runs it once USR2 has closed the output. TERM just ends the job.
        requeue = signal.getsignal(signal.SIGUSR2)

        def after_stop(signum: int) -> None:
            if signum == signal.SIGUSR2 and callable(requeue):
                requeue(signum, None)

        rc, summary = run_mpi(self.cfg, after_stop)
        if rc != 0:
            raise RuntimeError(f"kvrelay job failed with exit code {rc}; see the task logs")
        return summary.to_json() if summary is not None else None


def submit(
    config: str | Path | JobConfig | None = None,
    *,
    input: str | None = None,
    output: str | None = None,
    model: str | None = None,
    overrides: list[str] | None = None,
    folder: str | Path | None = None,
) -> submitit.Job:
    """Check the job against the cluster and submit it; returns the submitit job. `folder` holds
    submitit's pickles and task logs (default: OUT.submitit/ beside the output)."""
    paths = {"input.path": input, "output.path": output, "model.path": model}
    if isinstance(config, JobConfig):
        if overrides:
            raise TypeError("overrides apply to a config file; with a JobConfig, change the object instead")
        cfg = config.model_copy(update={
            section: getattr(config, section).model_copy(update={"path": value})
            for section, value in (("input", input), ("output", output), ("model", model)) if value is not None
        })
    else:
        cfg = load_config(config, overrides, **paths)
    inp, out, model_dir = job_paths(cfg)
    if not inp.is_file():
        raise ConfigError(f"input file {str(inp)!r} does not exist")
    # The ranks may start in another directory: give them absolute paths.
    cfg = cfg.model_copy(update={
        "input": cfg.input.model_copy(update={"path": str(inp)}),
        "output": cfg.output.model_copy(update={"path": str(out)}),
        "model": cfg.model.model_copy(update={"path": str(model_dir)}),
    })
    check_cluster(cfg, cluster_partitions())
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(folder) if folder is not None else out.with_name(out.name.removesuffix(".jsonl") + ".submitit")
    return executor(cfg, folder).submit(BatchJob(cfg))

