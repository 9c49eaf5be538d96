"""The job's rank table: rank, role, host and pid of every rank, so that a dead rank is named.

Every rank contributes its line at start (`gather`, collective); the router logs the table and
writes it beside the output as OUT.ranks.json. When something fails, the table answers "who":

- a rank whose own code raised checks which ranks of its host are gone (`dead_on_this_host`) and
  names them beside its traceback, instead of leaving a failed transfer to be read as a bug;
- but a SIGKILLed rank (the OOM killer, a segfault) leaves its survivors no time: mpiexec (MPICH's
  Hydra, Open MPI) and `srun --kill-on-bad-exit` kill them at once. So the `--local` launcher
  watches the ranks of the table from outside (`Watch`) and names the first to die; under Slurm
  the log has srun's task number ("task 3: Killed") and the table's line.

NOTE: not Hydra's "BAD TERMINATION ... PID N" report: it names the lowest rank that ended badly,
and the survivors it killed itself end badly too (seen here: rank 3 killed, rank 0's pid reported).
"""

from __future__ import annotations

import json
import logging
import os
import select
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("kvrelay")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    role: str
    host: str
    pid: int

    def describe(self) -> str:
        return f"rank {self.rank} ({self.role}, host {self.host}, pid {self.pid})"


def gather(world, role: str, host: str) -> list[RankInfo]:
    """Every rank's line, on every rank (collective over `world`)."""
    lines = world.allgather((role, host, os.getpid()))
    return [RankInfo(rank, role, host, pid) for rank, (role, host, pid) in enumerate(lines)]


def table_path(output_path: str | os.PathLike) -> Path:
    """OUT.ranks.json beside OUT.jsonl."""
    path = Path(output_path)
    return path.with_name(path.name.removesuffix(".jsonl") + ".ranks.json")


def record(table: list[RankInfo], output_path: str | os.PathLike | None) -> None:
    """The router's record of the table: one log line, and OUT.ranks.json for the launcher."""
    log.info("ranks: %s", "; ".join(r.describe() for r in table))
    if output_path is not None:
        path = table_path(output_path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in table]) + "\n")
        tmp.replace(path)  # whole or absent: the launcher may read it at any moment


def read(output_path: str | os.PathLike, since: float) -> list[RankInfo] | None:
    """The table a job wrote at or after time `since` (the launcher's start), or None: an older
    file is a previous run's, whose pids mean nothing now."""
    path = table_path(output_path)
    try:
        if path.stat().st_mtime < since:
            return None
        return [RankInfo(**r) for r in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return None


def alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, exited but not reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def dead_on_this_host(table: list[RankInfo], host: str) -> list[RankInfo]:
    return [r for r in table if r.host == host and not alive(r.pid)]


class Watch(threading.Thread):
    """Watches the ranks of a job on this host from outside, in the order they end.

    Started beside mpiexec; waits for the table the router writes, then for each rank's end through
    a pidfd (readable once the process has exited). `first` is the rank, or the ranks that ended
    in the same instant, that ended before any other: when mpiexec kills the survivors of a dead
    rank, the dead one."""

    def __init__(self, output_path: str | os.PathLike, running) -> None:
        super().__init__(daemon=True)
        self.output_path, self.running = output_path, running
        self.started = time.time()
        self.table: list[RankInfo] | None = None
        self.ended: list[list[RankInfo]] = []  # ranks by the instant they ended, first first

    def run(self) -> None:
        while self.table is None:
            if not self.running():
                return
            self.table = read(self.output_path, since=self.started - 1)
            time.sleep(0.05)
        watched, gone = {}, []
        for r in self.table:
            try:
                watched[os.pidfd_open(r.pid)] = r
            except ProcessLookupError:
                gone.append(r)
            except (AttributeError, OSError):  # no pidfds (Linux < 5.3): the launcher names no rank
                for fd in watched:
                    os.close(fd)
                return
        if gone:
            self.ended.append(gone)
        poller = select.poll()
        for fd in watched:
            poller.register(fd, select.POLLIN)
        while watched:
            ended = []
            for fd, _ in poller.poll():
                poller.unregister(fd)
                os.close(fd)
                ended.append(watched.pop(fd))
            self.ended.append(sorted(ended, key=lambda r: r.rank))

    def first(self) -> str | None:
        """"rank 3 (decode, host n1, pid 1234)", or several ranks that ended at once; None if none ended."""
        return " and ".join(r.describe() for r in self.ended[0]) if self.ended else None
