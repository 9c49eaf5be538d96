"""The rank table's liveness check, on real processes: a rank whose process is gone is named dead."""

from __future__ import annotations

import os
import subprocess
import sys

from kvrelay.launch.ranks import RankInfo, dead_on_this_host


def test_a_rank_whose_process_ended_is_dead_and_one_on_another_host_is_not_judged():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid is free
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        pass  # exited, not reaped yet: as a rank whose launcher has not waited for it
    table = [RankInfo(0, "router", "here", os.getpid()), RankInfo(1, "decode", "here", gone.pid),
             RankInfo(2, "decode", "here", zombie.pid), RankInfo(3, "prefill", "there", gone.pid)]
    assert dead_on_this_host(table, "here") == table[1:3]
    zombie.wait()
