"""The `__main__` guard of the checks in tests/mpi: a failure on one rank ends every rank of the job.

    if __name__ == "__main__":
        run_or_abort(main)

Without it, a rank that raises exits alone and the others wait in their next collective until the
test's timeout, and the error reads as a hang.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from mpi4py import MPI


def run_or_abort(main: Callable[[], object]) -> None:
    """Run `main`; on any failure write the script, the rank and the traceback to stderr and abort the job."""
    try:
        main()
    except BaseException:  # noqa: BLE001 - any failure must end every rank, not leave them hanging in a collective
        sys.stdout.flush()
        script = Path(sys.argv[0]).stem
        sys.stderr.write(f"{script}: rank {MPI.COMM_WORLD.rank} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
