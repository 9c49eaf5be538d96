"""The leader of a tensor-parallel group tells its other ranks what to run: one broadcast per step.

    sync = StepSync(group_comm)      # the group's MPI communicator; its rank 0 is the leader
    sync.publish(arrays)             # leader: before running the step itself
    arrays = sync.receive()          # the others: the same StepArrays, or None once the leader stops

Only the leader schedules: the others keep no scheduler, block pool or sequences. What they need
to run a step is exactly what the model runner uploads to the device, the step's `StepArrays`
(token ids, positions, cache slots, offsets, lengths, block tables, sampled rows): block ids
mean the same on every rank, since each rank's KV cache holds the same blocks (its own heads).
The arrays travel as one int64 buffer after a fixed 8-int header (what follows and how long),
two `Bcast`s on the group's communicator, which lives on one node (shared memory): a decode step
of 128 sequences with 4k-token block tables is about 300 KiB, a batch-1 step under 1 KiB.
"""

from __future__ import annotations

import numpy as np

from kvrelay.ranks.engine.model_runner import StepArrays

_STEP, _STOP = 1, 2
_HEADER = 8  # kind, sequences, tokens, table width, sampled rows, payload ints, 2 spare


class StepSync:
    def __init__(self, comm):
        self.comm = comm
        self._header = np.zeros(_HEADER, np.int64)

    @property
    def is_leader(self) -> bool:
        return self.comm.rank == 0

    def publish(self, a: StepArrays) -> None:
        """Leader: send this step's arrays to the other ranks of the group."""
        assert self.is_leader
        n, T, S = len(a.seq_lens), len(a.ids), len(a.last_rows)
        payload = np.concatenate(
            [a.ids, a.positions, a.slots, a.query_start_loc, a.seq_lens, a.last_rows, a.tables.ravel()]
        ).astype(np.int64, copy=False)
        self._header[:6] = (_STEP, n, T, a.tables.shape[1], S, payload.size)
        self.comm.Bcast(self._header, root=0)
        self.comm.Bcast(payload, root=0)

    def stop(self) -> None:
        """Leader: tell the other ranks that no step follows."""
        assert self.is_leader
        self._header[:] = 0
        self._header[0] = _STOP
        self.comm.Bcast(self._header, root=0)

    def receive(self) -> StepArrays | None:
        """Other ranks: the leader's next step, or None after its `stop`."""
        assert not self.is_leader
        self.comm.Bcast(self._header, root=0)
        kind, n, T, width, S, size = (int(x) for x in self._header[:6])
        if kind == _STOP:
            return None
        assert kind == _STEP, kind
        payload = np.empty(size, np.int64)
        self.comm.Bcast(payload, root=0)
        cuts = np.cumsum([T, T, T, n + 1, n, S])
        ids, positions, slots, qsl, seq_lens, last_rows, tables = np.split(payload, cuts)
        return StepArrays(ids, positions, slots, qsl, seq_lens, tables.reshape(n, width), last_rows)
