"""A kvrelay job in which one worker rank raises after a few engine steps.

    mpiexec -n 4 python tests/mpi/raise_on_rank.py RANK run [kvrelay run arguments]

The job must end at once with the failing rank's number and host on stderr, not hang.
"""

import sys

from mpi4py import MPI

from kvrelay.launch.cli import main
from kvrelay.ranks.engine.engine import Engine

FAILING_RANK = int(sys.argv[1])

if MPI.COMM_WORLD.rank == FAILING_RANK:
    real_step = Engine.step

    def failing_step(self):
        if self.stats.steps >= 3:
            raise RuntimeError("injected failure")
        return real_step(self)

    Engine.step = failing_step

sys.exit(main(sys.argv[2:]))
