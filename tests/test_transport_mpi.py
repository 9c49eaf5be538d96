"""The MPI KV transport on 3 real ranks: tests/mpi/transport_check.py under mpiexec (about 10 s on 2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay.core.layout import LaunchError
from kvrelay.launch.run import find_mpiexec

SCRIPT = Path(__file__).resolve().parent / "mpi" / "transport_check.py"

try:
    # mpiexec beside this Python (the MPI wheel in the venv), else on PATH.
    MPIEXEC, OPEN_MPI = find_mpiexec()
except LaunchError as e:
    pytest.skip(f"no MPI launcher here: {e}", allow_module_level=True)


def test_many_kv_transfers_in_flight_between_three_ranks_arrive_bit_exact():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [MPIEXEC, "-n", "3", *(["--oversubscribe"] if OPEN_MPI else []), sys.executable, str(SCRIPT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "transport_check OK" in proc.stdout, proc.stdout + proc.stderr
