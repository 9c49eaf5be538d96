"""`kvrelay sbatch`: an sbatch script rendered from the job config, printed or submitted.

    kvrelay sbatch configs/demo.yaml -i prompts.jsonl -o out.jsonl --model DIR --dry-run
    kvrelay sbatch job.yaml -i big.jsonl -o out.jsonl --array 8     # 8 array tasks, out.shard-K.jsonl

The script (templates/one_node.sbatch, templates/multi_node.sbatch) starts 1 router + the workers
of `roles` with `srun --mpi=<slurm.srun_mpi>` or the site's `slurm.mpirun`, runs `kvrelay run` on
every rank, and on USR2/TERM stops the ranks and requeues itself (templates/stop_and_requeue.sh);
the requeued run resumes from the output file.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import jinja2

from kvrelay.configs.schema import ConfigError, JobConfig
from kvrelay.core.layout import Layout
from kvrelay.slurm.resources import SlurmError, check_cluster, cluster_partitions, placement
from kvrelay.slurm.shard import shard_path

TEMPLATES = Path(__file__).resolve().parent / "templates"
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES), trim_blocks=True, lstrip_blocks=True,
    keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
)
_UNSAFE = set('"$`\\\n')


def job_paths(cfg: JobConfig) -> tuple[Path, Path, Path]:
    """(input, output, model) as absolute paths; ConfigError when one is missing."""
    missing = [flag for flag, value in (("-i IN.jsonl", cfg.input.path), ("-o OUT.jsonl", cfg.output.path),
                                        ("--model DIR", cfg.model.path)) if value is None]
    if missing:
        raise ConfigError(f"a batch job needs its files: pass {', '.join(missing)} (or set input.path, output.path, model.path)")
    paths = tuple(Path(p).expanduser().absolute() for p in (cfg.input.path, cfg.output.path, cfg.model.path))
    for p in paths:
        if _UNSAFE & set(str(p)):
            raise ConfigError(f"path {str(p)!r} holds one of {sorted(_UNSAFE)}: the job script cannot quote it; rename it")
    if not str(paths[1]).endswith(".jsonl"):
        raise ConfigError(f"output.path must end in .jsonl, got {str(paths[1])!r}")
    return paths  # type: ignore[return-value]


def render(cfg: JobConfig, config_path: str | None, overrides: list[str], array: int | None = None) -> str:
    """The sbatch script for this job; `array=N` makes N array tasks, task K running input.shard=K/N."""
    s = cfg.slurm
    place = placement(cfg)
    inp, out, model = job_paths(cfg)
    if array is not None and array < 1:
        raise ConfigError(f"--array must be >= 1, got {array}")
    layout = Layout.from_roles(cfg.roles).describe() + (f" on {place.nodes} nodes" if place.nodes > 1 else "")
    stem = str(out).removesuffix(".jsonl")
    log = f"{stem}.slurm-%A_%a.log" if array else f"{stem}.slurm-%j.log"

    sbatch = [f"--job-name={s.job_name}"]
    sbatch += [f"--{k}={v}" for k, v in (("partition", s.partition), ("account", s.account), ("qos", s.qos)) if v]
    sbatch += [f"--time={s.time}", f"--nodes={place.nodes}"]
    if place.nodes == 1:
        sbatch.append(f"--ntasks={place.ntasks}")
    else:
        # Enough task slots on every node for the busiest (the first); the host file places the ranks.
        sbatch.append(f"--ntasks-per-node={max(place.ranks_per_node)}")
    sbatch.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.gpus_per_node:
        sbatch.append(f"--gpus-per-node={s.gpus_per_node}")
    sbatch += [f"--{k}={v}" for k, v in (("mem", s.mem), ("constraint", s.constraint)) if v]
    sbatch += [f"--output={log}", "--open-mode=append", "--requeue" if s.requeue else "--no-requeue",
               f"--signal=B:USR2@{s.signal_lead_s}"]
    if array:
        sbatch.append(f"--array=0-{array - 1}")
    sbatch += s.sbatch_options

    # One group of words per line of the script, joined with backslash-newlines.
    run = [[s.python or sys.executable, "-m", "kvrelay.launch.cli", "run"]]
    if config_path is not None:
        run[0].append(str(Path(config_path).absolute()))
    run += [["-i", str(inp)], ["--model", str(model)]]
    # The ranks need no slurm.* key: those shaped the allocation they run in.
    run += [["--set", item] for item in overrides if not item.startswith("slurm.")]
    if cfg.output.fail_on_error:
        run.append(["--fail-on-error"])
    if s.launcher == "srun":
        launcher = ["srun", f"--mpi={s.srun_mpi}", f"--ntasks={place.ntasks}", "--kill-on-bad-exit=1"]
        if place.nodes > 1:
            launcher.append("--distribution=arbitrary")
    else:
        launcher = [*shlex.split(s.mpirun), "-np", str(place.ntasks)]
    lines = [shlex.join(launcher)] + [shlex.join(words) for words in run] + ['-o "$OUT"']
    if place.nodes > 1 and s.launcher == "mpirun":
        lines[0] += ' --hostfile "$hostfile"'
    if array:
        lines.append(f'--set "input.shard=${{SLURM_ARRAY_TASK_ID}}/{array}"')
        out_shell = '"' + shard_path(out, "${SLURM_ARRAY_TASK_ID}") + '"'
    else:
        out_shell = shlex.quote(str(out))
    launch = " \\\n  ".join(lines)

    template = _ENV.get_template("one_node.sbatch" if place.nodes == 1 else "multi_node.sbatch")
    return template.render(
        layout=layout, sbatch=sbatch, setup=s.setup, out=out_shell, launch=launch, requeue=s.requeue,
        signal_lead_s=s.signal_lead_s, ranks_per_node=place.ranks_per_node, srun=s.launcher == "srun",
    )


def submit(cfg: JobConfig, config_path: str | None, overrides: list[str], array: int | None = None) -> tuple[str, Path]:
    """Check the job against the cluster, write OUT.sbatch beside the output and sbatch it;
    returns (job id, script path)."""
    text = render(cfg, config_path, overrides, array)
    inp, out, _ = job_paths(cfg)
    if not inp.is_file():
        raise ConfigError(f"input file {str(inp)!r} does not exist")
    check_cluster(cfg, cluster_partitions())
    out.parent.mkdir(parents=True, exist_ok=True)
    script = out.with_name(out.name.removesuffix(".jsonl") + ".sbatch")
    script.write_text(text)
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch refused {script}: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0], script
