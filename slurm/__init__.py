"""Running kvrelay under Slurm: sbatch scripts (sbatch.py, templates/), the submitit
executor (submitit_job.py), resources checked before submission (resources.py), input shards over a job
array (shard.py), and a one-node cluster for CI (ci_cluster.sh)."""
