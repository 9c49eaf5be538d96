"""launch/teardown.py in real processes: a teardown stuck past its limit prints the stage it waits
in and every thread's stack, and ends the process with the job's exit code; one that finishes
finalizes MPI and exits with that code at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

STUCK = """
import threading, time
from kvrelay.launch import teardown
teardown.begin("rank 2 (decode)", 1.0, exit_code=3)
teardown.stage("closing the tensor-parallel group's communicators (tp=2)")
threading.Event().wait()  # a collective that never returns
"""

DONE = """
from mpi4py import MPI
from kvrelay.launch import teardown
teardown.begin("rank 0 (router)", 30.0, exit_code=4)
teardown.stage("freeing the cache windows")
teardown.end_process(4, 30.0)
raise SystemExit("end_process returned")
"""


def _python(code: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc, time.monotonic() - t0


def test_a_stuck_teardown_says_where_and_exits_with_the_job_code():
    proc, wall = _python(STUCK)
    assert proc.returncode == 3, proc.stderr
    assert "rank 2 (decode): the job's work is done but its teardown did not finish in 1 s" in proc.stderr
    assert "waiting in: closing the tensor-parallel group's communicators (tp=2)" in proc.stderr
    assert "Thread 0x" in proc.stderr and "wait" in proc.stderr  # faulthandler's stacks, the waiting frame among them
    assert "exiting with code 3" in proc.stderr
    assert wall < 60


def test_a_finished_teardown_finalizes_mpi_and_exits_with_the_job_code():
    proc, _ = _python(DONE)
    assert proc.returncode == 4, proc.stderr
    assert "did not finish" not in proc.stderr and "end_process returned" not in proc.stderr
