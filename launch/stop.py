"""Stop signals: how the router, the workers and the single process end a job that is told to stop.

SIGTERM and SIGUSR2 (Slurm's notice before the time limit or a preemption, see slurm/) and SIGINT
(Ctrl-C) make the router, or the single process, close the output (every answered line is already
written), write the summary, leave a stop marker beside the output naming the signal
(`stop_marker`: after SIGUSR2 the job script requeues), and end the job with exit code 128 +
the signal's number, without a traceback; a rerun resumes. On SIGUSR2 a worker only lets go of its
node's shared memory, so that the router, not the signal, decides when the job ends.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from kvrelay.configs.schema import JobConfig

log = logging.getLogger("kvrelay")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal: unwinds the router's loop so the output file is closed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def on_stop(signum, frame):
    # One stop is enough: a second signal (Slurm may send one to the job script and one to each
    # task) must not break into the router while it closes the output.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def on_stop_worker(signum, frame):
    """Workers leave ending the job to the router (it Aborts every rank once the output is
    closed); SIGTERM and SIGINT (Ctrl-C) still end a worker at once, without a traceback."""
    release_node_segments()
    if signum != signal.SIGUSR2:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def release_node_segments() -> None:
    """Unlink the MPICH shared-memory segments this process maps; the mapping lives on until exit.

    NOTE: MPICH names the segment that bootstraps a node after the PMI job name, which Slurm's pmi2
    makes from JOBID.STEP: a requeued job's first step gets the same name again, and a segment
    left by the stopped run (its ranks are killed and never finalize) makes the rerun's MPI_Init
    wait forever. Every rank does this on a stop signal, so every node is clean for the rerun."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/dev/shm/mpich_shm_") and not fields[5].endswith("(deleted)"):
            Path(fields[5]).unlink(missing_ok=True)


def stop_marker(output_path: str | os.PathLike) -> Path:
    """The file the router leaves beside OUT.jsonl when a signal stopped it: OUT.stopped."""
    path = Path(output_path)
    return path.with_name(path.name.removesuffix(".jsonl") + ".stopped")


def record_stop(cfg: JobConfig, signum: int, frontend=None, who: str = "") -> None:
    """What the router (or the single process) leaves when a stop signal ends the job: the
    summary of the whole output file so far, and OUT.stopped naming the signal. `who` prefixes the
    log line ("rank 0: " in an MPI job, whose log interleaves every rank's)."""
    from kvrelay.router.frontend import write_summary

    if cfg.output.path is None:
        return
    summary = frontend.summary if frontend is not None else None
    if summary is not None:
        summary.wall_s = time.time() - frontend.start
        write_summary(summary, cfg.output.path)
    name = signal.Signals(signum).name
    stop_marker(cfg.output.path).write_text(f"{name}\n")
    log.warning("%s%s: the output file holds every answer so far; rerun to resume", who, name)
