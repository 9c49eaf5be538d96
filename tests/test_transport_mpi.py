"""The MPI KV transport on 3 real ranks: tests/mpi/transport_check.py under mpiexec (about 10 s on 2 cores)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .mpi_launch import mpi_launcher

SCRIPT = Path(__file__).resolve().parent / "mpi" / "transport_check.py"


def test_many_kv_transfers_in_flight_between_three_ranks_arrive_bit_exact():
    launcher, env = mpi_launcher()
    proc = subprocess.run([*launcher, "-n", "3", sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "transport_check OK" in proc.stdout, proc.stdout + proc.stderr
