"""Control messages between ranks: small typed records, one serializer (msgpack), one tag each.

The KV bytes of a handoff do not travel here: they go through ranks/transport.py (NCCL on GPUs,
MPI on CPUs) on the workers' own communicator. Every send is non-blocking (`Outbox`), so two
ranks that send each other large messages at once never deadlock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

import msgpack
from mpi4py import MPI


class Tag(enum.IntEnum):
    REQUEST = 1  # router -> worker: run this request (and where to decode it)
    RESULT = 2  # worker -> router: a finished request
    PREFILLED = 3  # worker -> router: a request's prompt is done (prefill: its KV is on the way; aggregated: it decodes on)
    HANDOFF = 4  # prefill -> decode: a request whose KV is ready to send
    READY = 5  # decode -> prefill: blocks reserved, receive posted: send the KV now
    SHUTDOWN = 6  # router -> worker: no more requests; finish and report
    STATS = 7  # worker -> router: final counters, the reply to SHUTDOWN


@dataclass
class Assign:
    """Router -> worker. `decode_rank` set: prefill here, decode there."""

    request: dict  # Request.to_wire()
    decode_rank: int | None = None


@dataclass
class Handoff:
    """Prefill -> decode: everything but the KV. `xfer` numbers the pair's transfers."""

    xfer: int
    request: dict  # Request.to_wire()
    seq_state: dict  # Engine.handoff_state(): token ids so far, cached tokens, logprobs
    generator_state: bytes | None
    num_tokens: int  # tokens whose KV will arrive


@dataclass
class Ready:
    xfer: int


def encode(record) -> bytes:
    # NOTE: a shallow dict of the record's fields, not asdict: asdict deep-copies every list (a
    # prompt's token ids, ~20 ms at 12k tokens). The records hold plain values, dicts and lists.
    if hasattr(record, "__dataclass_fields__"):
        record = {f.name: getattr(record, f.name) for f in fields(record)}
    return msgpack.packb(record, use_bin_type=True)


def decode(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Outbox:
    """Non-blocking sends whose buffers stay alive until MPI is done with them."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.pending: list[tuple[MPI.Request, bytes]] = []

    def send(self, record, dest: int, tag: Tag) -> None:
        buf = encode(record)
        self.pending.append((self.comm.Isend([buf, MPI.BYTE], dest=dest, tag=int(tag)), buf))

    def progress(self) -> None:
        if self.pending:
            self.pending = [(r, b) for r, b in self.pending if not r.Test()]

    def flush(self) -> None:
        for r, _ in self.pending:
            r.Wait()
        self.pending = []


def poll(comm: MPI.Comm, status: MPI.Status) -> tuple[Tag, int, object] | None:
    """Receive one waiting control message, if any: (tag, source, decoded payload)."""
    if not comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
        return None
    n, src, tag = status.Get_count(MPI.BYTE), status.Get_source(), status.Get_tag()
    buf = bytearray(n)
    comm.Recv([buf, MPI.BYTE], source=src, tag=tag)
    return Tag(tag), src, decode(bytes(buf))
