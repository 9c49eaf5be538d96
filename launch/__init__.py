"""Starting jobs: `kvrelay` command (cli.py), the MPI job (job.py), launcher variables (environment.py),
local runs (run.py); `submit` sends the job to Slurm through submitit (slurm/submitit_job.py)."""


def submit(config=None, **kwargs):
    """Submit the job to Slurm as one multi-task submitit job; see kvrelay.slurm.submitit_job.submit."""
    from kvrelay.slurm.submitit_job import submit as _submit

    return _submit(config, **kwargs)
