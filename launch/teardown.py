"""A rank's teardown at the end of the job, bounded in time.

    teardown.begin("rank 2 (decode)", cfg.job.teardown_timeout_s)   # the job's work is done
    teardown.stage("closing the KV transport")
    ...
    teardown.end_process(rc, cfg.job.teardown_timeout_s)   # `kvrelay run` under MPI: MPI_Finalize, then exit without the interpreter's teardown

Once the router has written the output and the summary (or a worker has sent its last stats), each
rank lets go of what it holds: the cache windows, the KV transport, the decode CUDA graphs, the
tensor-parallel communicators, then MPI. Each of those waits on other ranks or on the GPU, and a
wait there once kept a finished tp=2 job from ending (BENCHMARKS.md, issue 16). So each rank names
the stage it is in, and a watchdog thread ends the process if the whole teardown takes longer than
`job.teardown_timeout_s`: it prints the stage and every thread's stack to stderr and exits with the
job's exit code (the output is complete by then, so nothing is lost; the launcher may still report
that a rank left without MPI_Finalize).

In a process that used CUDA, `end_process` finalizes MPI itself and then leaves with os._exit
(elsewhere it exits the usual way, see its NOTE): the interpreter's own teardown
(module and object destructors: torch's process groups, CUDA graphs and caches, whose order
Python does not fix) never runs, so nothing there can hang a finished job. A caller that must
return (submitit's task, launch/submit.py) skips it: the watchdog, a daemon thread, then bounds
what follows for as long as the interpreter runs Python threads, but not MPI_Finalize at its exit.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

log = logging.getLogger("kvrelay")


class Teardown:
    """The watchdog of one rank's teardown (`begin` makes the process's one)."""

    def __init__(self, who: str, limit_s: float, exit_code: int = 0) -> None:
        self.who, self.limit_s, self.exit_code = who, limit_s, exit_code
        self.current = "start"
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="kvrelay-teardown", daemon=True)
        self._thread.start()

    def stage(self, name: str) -> None:
        log.debug("%s: teardown: %s", self.who, name)
        self.current = name

    def cancel(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.limit_s):
            return
        try:
            sys.stderr.write(
                f"kvrelay: {self.who}: the job's work is done but its teardown did not finish in {self.limit_s:g} s "
                f"(job.teardown_timeout_s); waiting in: {self.current}. Every thread's stack:\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.write(f"kvrelay: {self.who}: exiting with code {self.exit_code} without finishing the teardown\n")
            sys.stderr.flush()
            sys.stdout.flush()
        finally:
            os._exit(self.exit_code)


_current: Teardown | None = None


def begin(who: str, limit_s: float, exit_code: int = 0) -> Teardown:
    """Arm this process's teardown watchdog (once; a second call updates who and the exit code)."""
    global _current
    if _current is None:
        _current = Teardown(who, limit_s, exit_code)
    else:
        _current.who, _current.exit_code = who, exit_code
    return _current


def stage(name: str) -> None:
    """Name the step the teardown is in (what the watchdog reports if it expires); no-op before `begin`."""
    if _current is not None:
        _current.stage(name)


def end_process(exit_code: int, limit_s: float) -> None:
    """Finalize MPI (bounded by the watchdog, armed here with `limit_s` if it is not yet) and leave
    the process with `exit_code`, skipping the interpreter's teardown where the process used CUDA.
    Never returns.

    NOTE: a process that never touched CUDA leaves the usual way (SystemExit; mpi4py finalizes MPI
    at exit), as every CPU job did before: with MPI_Finalize and os._exit back to back on every
    rank, 2 of a CI run's ~40 CPU MPI jobs (MPICH) ended with exit status 9 right after writing
    their summary (2026-11-28), a rank gone while another still finalized; not reproduced alone."""
    from mpi4py import MPI

    t = begin(_current.who if _current else f"rank {MPI.COMM_WORLD.rank}", limit_s, exit_code)
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        t.stage("exit (MPI_Finalize at the interpreter's exit)")
        raise SystemExit(exit_code)
    t.stage("MPI_Finalize (waits for every rank of the job to reach it)")
    if not MPI.Is_finalized():
        MPI.Finalize()
    t.stage("exit")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
