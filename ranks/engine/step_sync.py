"""The leader of a tensor-parallel group tells its other ranks what to run: one broadcast per step.

    sync = StepSync(group_comm)      # the group's MPI communicator; its rank 0 is the leader
    sync.publish(arrays)             # leader: before running the step itself (or a GroupCommand)
    arrays = sync.receive()          # the others: the same StepArrays (or command), None once the leader stops

Only the leader schedules: the others keep no scheduler, block pool or sequences. What they need
to run a step is exactly what the model runner uploads to the device, the step's `StepArrays`
(token ids, positions, cache slots, offsets, lengths, block tables, sampled rows): block ids
mean the same on every rank, since each rank's KV cache holds the same blocks (its own heads).
Besides steps, the leader sends the other operations on the KV cache that each rank must do on
its own shard, in the order the leader does them (`GroupCommand`s: fork copies, its share of a KV
handoff, the host and disk KV tiers' copies and file jobs: ranks/engine/group_tiers.py). Everything travels as one int64 buffer after a fixed 8-int header
(what follows and how long), two `Bcast`s on the group's communicator, which lives on one node
(shared memory): a decode step of 128 sequences with 4k-token block tables is about 300 KiB, a
batch-1 step under 1 KiB.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from kvrelay.ranks.engine.model_runner import StepArrays

_STEP, _STOP = 1, 2
_HEADER = 8  # kind, sequences, tokens, table width, sampled rows, payload ints, 2 spare


class KVPiece(NamedTuple):
    """One rank's part of a chunk of a KV handoff: a range of its KV heads to or from one peer rank."""

    rank: int  # the rank of the group that moves it
    peer: int  # the other side's rank in the KV transport's communicator
    tag: int
    first_head: int  # among the moving rank's KV heads
    num_heads: int


@dataclass
class CopyBlocks:
    """Forked samples: copy cache block src[i] into dst[i] (ModelRunner.copy_blocks)."""

    src: list[int]
    dst: list[int]


@dataclass
class SendKV:
    """Pack `block_ids` (the chunk's blocks) and send each piece whose rank is yours."""

    block_ids: list[int]
    pieces: list[KVPiece]


@dataclass
class RecvKV:
    """Post the receives of `num_blocks` blocks for each piece whose rank is yours; `key` names them
    for the UnpackKV that follows once the leader's own part has arrived."""

    key: int
    num_blocks: int
    pieces: list[KVPiece]


@dataclass
class UnpackKV:
    """Wait for the receives of `key` and write them into `block_ids`."""

    key: int
    block_ids: list[int]


@dataclass
class CopyKV:
    """One batch of the host KV tier's copies (HostTier.take_batch): blocks out to host slots, then
    host slots into blocks."""

    number: int
    out_blocks: list[int]
    out_slots: list[int]
    in_slots: list[int]
    in_blocks: list[int]


@dataclass
class DiskJobs:
    """Disk tier jobs for each rank's own files, in order (group_tiers.py encodes them): after the
    rank's copy stream has finished batch `settled`, the last one the leader saw finished."""

    settled: int
    ops: list[int]
    hashes: list[int]  # block hashes as signed int64
    slots: list[int]


@dataclass
class PollDisk:
    """Collective: every rank reports its finished disk jobs (group_tiers.agree), waiting up to
    `wait_us` for its first."""

    wait_us: int


GroupCommand = CopyBlocks | SendKV | RecvKV | UnpackKV | CopyKV | DiskJobs | PollDisk
_KINDS = {cls: 3 + i for i, cls in enumerate((CopyBlocks, SendKV, RecvKV, UnpackKV, CopyKV, DiskJobs, PollDisk))}
_CLASSES = {kind: cls for cls, kind in _KINDS.items()}


def _encode(cmd: GroupCommand) -> np.ndarray:
    """Fields in order: an int as itself, a list as its length and its items (a KVPiece as 5 ints)."""
    out: list[int] = []
    for f in fields(cmd):
        value = getattr(cmd, f.name)
        if isinstance(value, int):
            out.append(value)
        else:
            out.append(len(value))
            for item in value:
                out.extend(item if isinstance(item, tuple) else (item,))
    return np.array(out, np.int64)


def _decode(kind: int, payload: np.ndarray) -> GroupCommand:
    cls = _CLASSES[kind]
    values, at, ints = [], 0, payload.tolist()
    for f in fields(cls):
        if f.type == "int":
            values.append(ints[at])
            at += 1
            continue
        n, at = ints[at], at + 1
        if "KVPiece" in f.type:
            values.append([KVPiece(*ints[at + 5 * i : at + 5 * i + 5]) for i in range(n)])
            at += 5 * n
        else:
            values.append(ints[at : at + n])
            at += n
    assert at == len(ints), (cls.__name__, at, len(ints))
    return cls(*values)


class StepSync:
    def __init__(self, comm):
        self.comm = comm
        self._header = np.zeros(_HEADER, np.int64)

    @property
    def is_leader(self) -> bool:
        return self.comm.rank == 0

    @property
    def size(self) -> int:
        return self.comm.size

    def publish(self, a: StepArrays | GroupCommand) -> None:
        """Leader: send this step's arrays, or a command, to the other ranks of the group."""
        assert self.is_leader
        if isinstance(a, StepArrays):
            n, T, S = len(a.seq_lens), len(a.ids), len(a.last_rows)
            payload = np.concatenate(
                [a.ids, a.positions, a.slots, a.query_start_loc, a.seq_lens, a.last_rows, a.tables.ravel()]
            ).astype(np.int64, copy=False)
            self._header[:6] = (_STEP, n, T, a.tables.shape[1], S, payload.size)
        else:
            payload = _encode(a)
            self._header[:6] = (_KINDS[type(a)], 0, 0, 0, 0, payload.size)
        self.comm.Bcast(self._header, root=0)
        self.comm.Bcast(payload, root=0)

    def stop(self) -> None:
        """Leader: tell the other ranks that no step follows."""
        assert self.is_leader
        self._header[:] = 0
        self._header[0] = _STOP
        self.comm.Bcast(self._header, root=0)

    def receive(self) -> StepArrays | GroupCommand | None:
        """Other ranks: the leader's next step or command, or None after its `stop`."""
        assert not self.is_leader
        self.comm.Bcast(self._header, root=0)
        kind, n, T, width, S, size = (int(x) for x in self._header[:6])
        if kind == _STOP:
            return None
        payload = np.empty(size, np.int64)
        self.comm.Bcast(payload, root=0)
        if kind != _STEP:
            return _decode(kind, payload)
        cuts = np.cumsum([T, T, T, n + 1, n, S])
        ids, positions, slots, qsl, seq_lens, last_rows, tables = np.split(payload, cuts)
        return StepArrays(ids, positions, slots, qsl, seq_lens, tables.reshape(n, width), last_rows)

    def agree_min(self, value: int) -> int:
        """Collective: the smallest `value` of the group's ranks (the KV cache's blocks, so that every shard holds the same)."""
        return min(self.comm.allgather(value))
