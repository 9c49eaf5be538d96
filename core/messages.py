"""Control messages between the router and the workers and between workers: one typed record per
tag, one serializer (msgpack), decoded once where it is received (`poll` returns the record).

    outbox.send(Prefilled("r1"), ROUTER)          # the record's class gives the tag
    tag, src, record = poll(comm, status)         # record is a Prefilled again

The KV bytes of a handoff do not travel here: they go through ranks/transport.py (NCCL on GPUs,
MPI on CPUs) on the workers' own communicator. Every send is non-blocking (`Outbox`), so two
ranks that send each other large messages at once never deadlock.

NOTE: `to_wire` builds shallow dicts, never `dataclasses.asdict`: asdict deep-copies every list one
int at a time (81 ms for a 12k-token request against ~2 ms now; tests/test_messages.py checks the
token lists go out uncopied).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import msgpack
from mpi4py import MPI

from kvrelay.core.request import Request, RequestResult, TokenLogprob


class Tag(enum.IntEnum):
    REQUEST = 1  # router -> worker: run this request (and where to decode it)
    RESULT = 2  # worker -> router: a finished request
    PREFILLED = 3  # worker -> router: a request's prompt is done (prefill: its KV is on the way; aggregated: it decodes on)
    HANDOFF = 4  # prefill -> decode: a request whose KV is ready to send
    READY = 5  # decode -> prefill: blocks reserved, a chunk's receive posted: send that chunk now
    SHUTDOWN = 6  # router -> worker: no more requests; finish and report
    STATS = 7  # worker -> router: final counters, the reply to SHUTDOWN
    PULL = 8  # worker -> worker: send me these cached blocks of yours (ranks/pulls.py)
    PULLED = 9  # worker -> worker: how many of them are pinned, and the transfer that brings them


@dataclass
class Assign:
    """Router -> worker. `decode_rank` set: prefill here, decode there. `pull_from` set: worker
    `pull_from` holds the prompt's first `pull_blocks` blocks; pull them before the prefill."""

    TAG: ClassVar[Tag] = Tag.REQUEST
    request: Request
    decode_rank: int | None = None
    pull_from: int | None = None
    pull_blocks: int = 0

    def to_wire(self) -> dict:
        return {"request": self.request.to_wire(), "decode_rank": self.decode_rank, "pull_from": self.pull_from,
                "pull_blocks": self.pull_blocks}

    @classmethod
    def from_wire(cls, d: dict) -> Assign:
        return cls(Request.from_wire(d["request"]), d["decode_rank"], d["pull_from"], d["pull_blocks"])


@dataclass
class Result:
    """Worker -> router: a finished request."""

    TAG: ClassVar[Tag] = Tag.RESULT
    result: RequestResult

    def to_wire(self) -> dict:
        return self.result.to_wire()

    @classmethod
    def from_wire(cls, d: dict) -> Result:
        return cls(RequestResult.from_wire(d))


@dataclass
class Prefilled:
    """Worker -> router: the request's prompt is computed; it leaves the worker's prefill queue."""

    TAG: ClassVar[Tag] = Tag.PREFILLED
    request_id: str

    def to_wire(self) -> dict:
        return {"request_id": self.request_id}

    @classmethod
    def from_wire(cls, d: dict) -> Prefilled:
        return cls(d["request_id"])


@dataclass
class SampleStart:
    """Another sample of a handed-off request (best_of > 1): its first token and sampler state.
    Its prompt KV is the lead sample's; the decode worker forks it from there."""

    index: int
    token_id: int
    logprob: TokenLogprob | None
    generator_state: bytes | None
    cumulative_logprob: float | None

    def to_wire(self) -> dict:
        return {"index": self.index, "token_id": self.token_id,
                "logprob": asdict(self.logprob) if self.logprob is not None else None,
                "generator_state": self.generator_state, "cumulative_logprob": self.cumulative_logprob}

    @classmethod
    def from_wire(cls, d: dict) -> SampleStart:
        lp = d["logprob"]
        lp = TokenLogprob(lp["token_id"], lp["logprob"], [tuple(t) for t in lp["top"]]) if lp is not None else None
        return cls(d["index"], d["token_id"], lp, d["generator_state"], d["cumulative_logprob"])


@dataclass
class SeqState:
    """A sequence that stopped after its first token on a prefill worker: everything a decode
    worker needs, besides the KV, to go on where the prefill engine stopped. The prompt travels
    once, in `request`; `output_token_ids` holds the tokens sampled so far."""

    request: Request
    output_token_ids: list[int]
    num_cached_tokens: int
    first_token_time: float | None
    logprobs: list[TokenLogprob] | None = None
    generator_state: bytes | None = None  # the torch generator of a seeded or random sampler
    index: int = 0  # which sample this is (best_of > 1: the lead of those still running)
    cumulative_logprob: float | None = None
    forks: list[SampleStart] = field(default_factory=list)  # the request's other running samples

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose KV is sent: all but the last sampled one, which has no KV yet."""
        return len(self.request.prompt_token_ids) + len(self.output_token_ids) - 1

    def to_wire(self) -> dict:
        return {"request": self.request.to_wire(), "output_token_ids": self.output_token_ids,
                "num_cached_tokens": self.num_cached_tokens, "first_token_time": self.first_token_time,
                "logprobs": [asdict(lp) for lp in self.logprobs] if self.logprobs is not None else None,
                "generator_state": self.generator_state, "index": self.index,
                "cumulative_logprob": self.cumulative_logprob, "forks": [f.to_wire() for f in self.forks]}

    @classmethod
    def from_wire(cls, d: dict) -> SeqState:
        logprobs = d["logprobs"]
        if logprobs is not None:
            logprobs = [TokenLogprob(lp["token_id"], lp["logprob"], [tuple(t) for t in lp["top"]]) for lp in logprobs]
        return cls(Request.from_wire(d["request"]), list(d["output_token_ids"]), d["num_cached_tokens"],
                   d["first_token_time"], logprobs, d["generator_state"], d["index"], d["cumulative_logprob"],
                   [SampleStart.from_wire(f) for f in d["forks"]])


@dataclass
class Handoff:
    """Prefill -> decode: everything but the KV. `xfer` numbers the pair's transfers."""

    TAG: ClassVar[Tag] = Tag.HANDOFF
    xfer: int
    state: SeqState

    def to_wire(self) -> dict:
        return {"xfer": self.xfer, "state": self.state.to_wire()}

    @classmethod
    def from_wire(cls, d: dict) -> Handoff:
        return cls(d["xfer"], SeqState.from_wire(d["state"]))


@dataclass
class Ready:
    """Decode -> prefill: transfer `xfer`'s blocks are reserved and the receive of its blocks
    [first, first + count) (one chunk, indices into the transfer's blocks) is posted."""

    TAG: ClassVar[Tag] = Tag.READY
    xfer: int
    first: int
    count: int

    def to_wire(self) -> dict:
        return {"xfer": self.xfer, "first": self.first, "count": self.count}

    @classmethod
    def from_wire(cls, d: dict) -> Ready:
        return cls(d["xfer"], d["first"], d["count"])


@dataclass
class Pull:
    """Puller -> source: pin and send the leading run of `hashes` (block hashes, in prompt order)
    that your prefix cache holds. `pull` numbers the puller's requests. `first` > 0: the receive of
    the transfer's first `first` blocks (its first chunk) is posted already, as a READY would say:
    send them now, padded past the blocks you hold (ranks/pulls.py)."""

    TAG: ClassVar[Tag] = Tag.PULL
    pull: int
    hashes: list[int]
    first: int = 0

    def to_wire(self) -> dict:
        return {"pull": self.pull, "hashes": self.hashes, "first": self.first}

    @classmethod
    def from_wire(cls, d: dict) -> Pull:
        return cls(d["pull"], list(d["hashes"]), d["first"])


@dataclass
class Pulled:
    """Source -> puller: the first `count` blocks of pull `pull` are pinned here and leave as
    transfer `xfer` (READY per chunk, as a handoff, past the PULL's `first` blocks, which left on
    the PULL: max(count, first) blocks in all, those past `count` padding); nothing follows when
    both are 0."""

    TAG: ClassVar[Tag] = Tag.PULLED
    pull: int
    count: int
    xfer: int = -1

    def to_wire(self) -> dict:
        return {"pull": self.pull, "count": self.count, "xfer": self.xfer}

    @classmethod
    def from_wire(cls, d: dict) -> Pulled:
        return cls(d["pull"], d["count"], d["xfer"])


@dataclass
class Shutdown:
    """Router -> worker: no more requests; finish what is in flight and report Stats."""

    TAG: ClassVar[Tag] = Tag.SHUTDOWN

    def to_wire(self) -> dict:
        return {}

    @classmethod
    def from_wire(cls, d: dict) -> Shutdown:
        return cls()


@dataclass
class Stats:
    """Worker -> router: the worker's final counters (engine, handoffs, and the runner's memory
    or simulated clock), as the job summary shows them."""

    TAG: ClassVar[Tag] = Tag.STATS
    counters: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        return self.counters

    @classmethod
    def from_wire(cls, d: dict) -> Stats:
        return cls(d)


Message = Assign | Result | Prefilled | Handoff | Ready | Shutdown | Stats | Pull | Pulled
RECORDS: dict[Tag, type] = {cls.TAG: cls for cls in (Assign, Result, Prefilled, Handoff, Ready, Shutdown, Stats, Pull, Pulled)}


def encode(record: Message) -> bytes:
    return msgpack.packb(record.to_wire(), use_bin_type=True)


def decode(tag: Tag, data: bytes) -> Message:
    return RECORDS[tag].from_wire(msgpack.unpackb(data, raw=False, strict_map_key=False))


class Outbox:
    """Non-blocking sends whose buffers stay alive until MPI is done with them."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.pending: list[tuple[MPI.Request, bytes]] = []

    def send(self, record: Message, dest: int) -> None:
        buf = encode(record)
        self.pending.append((self.comm.Isend([buf, MPI.BYTE], dest=dest, tag=int(record.TAG)), buf))

    def progress(self) -> None:
        if self.pending:
            self.pending = [(r, b) for r, b in self.pending if not r.Test()]

    def flush(self) -> None:
        for r, _ in self.pending:
            r.Wait()
        self.pending = []


def poll(comm: MPI.Comm, status: MPI.Status) -> tuple[Tag, int, Message] | None:
    """Receive one waiting control message, if any: (tag, source, its record)."""
    if not comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
        return None
    n, src, tag = status.Get_count(MPI.BYTE), status.Get_source(), status.Get_tag()
    buf = bytearray(n)
    comm.Recv([buf, MPI.BYTE], source=src, tag=tag)
    return Tag(tag), src, decode(Tag(tag), bytes(buf))
