"""The launcher the tests start MPI jobs with: kvrelay's own (launch/run.py `local_launcher`), with
one thread a rank (2 cores run up to 5 ranks); a test that asks for it is skipped where there is no mpiexec."""

from __future__ import annotations

import pytest

from kvrelay.core.layout import LaunchError
from kvrelay.launch.run import local_launcher


def mpi_launcher(**env: str) -> tuple[list[str], dict[str, str]]:
    """The mpiexec command before `-n N`, and the environment for it with `env` added."""
    try:
        launcher, base = local_launcher()
    except LaunchError as e:
        pytest.skip(f"no MPI launcher here: {e}")
    return launcher, {**base, "OMP_NUM_THREADS": "1", **env}
