"""Starting jobs: `kvrelay` command (cli.py), the MPI job (job.py), launcher variables (environment.py),
local runs (run.py); `submit` sends the job to Slurm through submitit (submit.py)."""


def submit(config=None, **kwargs):
    """Submit the job to Slurm as one multi-task submitit job; see kvrelay.launch.submit.submit."""
    from kvrelay.launch.submit import submit as _submit

    return _submit(config, **kwargs)
