"""The handoff unit (ranks/handoff.py) in one process: a fake engine, transport and outbox, no MPI.
Checks the protocol's order (sends start in READY order; a later READY never overtakes an earlier
one waiting for staging room) and the staging budget (never exceeded on either side: a transfer
larger than the budget goes in chunks; only a single block larger than the budget goes alone)."""

from __future__ import annotations

import torch

from kvrelay.core.block_hash import num_blocks
from kvrelay.core.messages import Handoff, Ready, SeqState
from kvrelay.core.request import Request, SamplingParams
from kvrelay.ranks.handoff import Handoffs

from .fakes import FakeOutbox, FakePending, PairTransport

BLOCK_SIZE, BLOCK_BYTES = 4, 100
PREFILL, DECODE = 1, 2  # world ranks


class FakeTransport:
    def __init__(self) -> None:
        self.posted: list[tuple[str, int, int, int, FakePending]] = []  # (kind, nbytes, peer, tag, pending)

    def send(self, buf, peer, tag):
        return self._post("send", buf, peer, tag)

    def recv(self, buf, peer, tag):
        return self._post("recv", buf, peer, tag)

    def _post(self, kind, buf, peer, tag):
        p = FakePending()
        self.posted.append((kind, buf.numel() * buf.element_size(), peer, tag, p))
        return p

    def close(self) -> None:
        pass


class FakeEngine:
    """The engine's KV surface over a counter of free blocks; packed KV is BLOCK_BYTES a block."""

    def __init__(self, free_blocks: int = 1000) -> None:
        self.free_blocks = free_blocks
        self.next_block = 0
        self.kv_tokens: dict[str, int] = {}  # handed-off sequences still holding blocks
        self.freed: list[str] = []
        self.received: list[tuple[SeqState, list[int]]] = []
        self.unpacked: list[list[int]] = []

    def kv_blocks(self, num_tokens: int) -> int:
        return num_blocks(num_tokens, BLOCK_SIZE)

    def kv_bytes(self, num_tokens: int) -> int:
        return num_blocks(num_tokens, BLOCK_SIZE) * BLOCK_BYTES

    def reserve(self, num_tokens: int):
        n = num_blocks(num_tokens, BLOCK_SIZE)
        if n > self.free_blocks:
            return None
        self.free_blocks -= n
        self.next_block += n
        return list(range(self.next_block - n, self.next_block))

    def pack_kv(self, request_id: str, first: int, count: int) -> torch.Tensor:
        assert 0 < count and first + count <= self.kv_blocks(self.kv_tokens[request_id])
        return torch.empty(count * BLOCK_BYTES, dtype=torch.uint8)

    def staging_buffer(self, n: int) -> torch.Tensor:
        return torch.empty(n * BLOCK_BYTES, dtype=torch.uint8)

    def unpack_kv(self, buf, block_ids, first_head=0) -> None:
        assert buf.numel() == len(block_ids) * BLOCK_BYTES
        self.unpacked.append(block_ids)

    def transfer_s(self, num_tokens: int) -> float:
        return 0.0

    def free_kv(self, request_id: str) -> None:
        self.freed.append(request_id)
        del self.kv_tokens[request_id]

    def add_received(self, state: SeqState, block_ids: list[int]) -> None:
        self.received.append((state, block_ids))


def state(rid: str, num_kv_tokens: int) -> SeqState:
    """A sequence with `num_kv_tokens` tokens of KV to send: the prompt and one sampled token."""
    return SeqState(Request(rid, list(range(1, num_kv_tokens + 1)), SamplingParams(max_tokens=4)), [7], 0, 1.5)


def prefill_side(budget: int, sizes: dict[str, int]) -> tuple[Handoffs, FakeEngine, FakeTransport, FakeOutbox]:
    engine, transport, outbox = FakeEngine(), FakeTransport(), FakeOutbox()
    h = Handoffs(engine, transport, outbox, PREFILL, budget)
    for rid, tokens in sizes.items():
        engine.kv_tokens[rid] = tokens
        h.start(state(rid, tokens), DECODE)
    return h, engine, transport, outbox


def whole(xfer: int, num_kv_tokens: int) -> Ready:
    """The READY of a transfer that goes in one chunk."""
    return Ready(xfer, 0, num_blocks(num_kv_tokens, BLOCK_SIZE))


def sends(transport: FakeTransport) -> list[int]:
    return [nbytes for kind, nbytes, *_ in transport.posted if kind == "send"]


def complete(transport: FakeTransport, i: int) -> None:
    transport.posted[i][4].finished = True


def test_handoff_messages_number_the_pairs_transfers_and_carry_the_prompt_once():
    h, _, _, outbox = prefill_side(10_000, {"a": 8, "b": 12})
    [(a, dest_a), (b, _)] = outbox.sent
    assert isinstance(a, Handoff) and dest_a == DECODE and (a.xfer, b.xfer) == (0, 1)
    assert a.state.request.prompt_token_ids == list(range(1, 9)) and a.state.output_token_ids == [7]
    assert a.state.num_kv_tokens == 8 and a.state.first_token_time == 1.5


def test_sends_start_in_ready_order_and_a_later_ready_never_overtakes_one_waiting_for_room():
    # Budget 1000 bytes: a (800) is staged; b (400) must wait; c (100) would fit but is behind b.
    h, engine, transport, _ = prefill_side(1000, {"a": 32, "b": 16, "c": 4})
    for xfer, tokens in enumerate((32, 16, 4)):
        h.on_ready(DECODE, whole(xfer, tokens))
    h.progress()
    assert sends(transport) == [800]
    h.progress()
    assert sends(transport) == [800], "c overtook b"
    complete(transport, 0)
    h.progress()
    assert sends(transport) == [800, 400, 100] and engine.freed == ["a"]
    assert h.staged == 500
    for i in (1, 2):
        complete(transport, i)
    assert h.progress() and engine.freed == ["a", "b", "c"] and h.staged == 0 and not h.busy()
    assert h.stats.handoffs_sent == 3 and h.stats.handoff_bytes == 1300
    # The KV goes to the decode worker's rank in the workers' communicator, on its tag.
    assert {(peer, tag) for _, _, peer, tag, _ in transport.posted} == {(DECODE - 1, DECODE)}


def test_ready_order_not_announce_order_decides_the_sends():
    h, _, transport, _ = prefill_side(10_000, {"a": 4, "b": 8})
    h.on_ready(DECODE, whole(1, 8))
    h.on_ready(DECODE, whole(0, 4))
    h.progress()
    assert sends(transport) == [200, 100]


def test_a_transfer_larger_than_the_budget_goes_in_chunks_within_it_on_both_sides():
    # Budget 300 bytes = 3 blocks; "big" is 10 blocks (1000 bytes), "small" 1 block behind it.
    budget = 300
    p, p_engine, p_transport, _ = prefill_side(budget, {"big": 40, "small": 4})
    engine, transport, outbox = FakeEngine(), FakeTransport(), FakeOutbox()
    d = Handoffs(engine, transport, outbox, DECODE, budget)
    d.on_handoff(PREFILL, Handoff(0, state("big", 40)))
    d.on_handoff(PREFILL, Handoff(1, state("small", 4)))
    d.progress()
    # D posts the first chunk's receive and answers READY for it; the next chunk waits for room.
    assert [(m.xfer, m.first, m.count) for m, _ in outbox.sent] == [(0, 0, 3)] and d.staged == 300
    assert engine.free_blocks == 1000 - 10  # the whole transfer's blocks are reserved at once
    readies = 0
    while d.busy() or p.busy():
        for m, _ in outbox.sent[readies:]:
            p.on_ready(DECODE, m)
        readies = len(outbox.sent)
        p.progress()
        assert p.staged <= budget and d.staged <= budget
        for t in (p_transport, transport):
            for *_, pending in t.posted:
                pending.finished = True
        d.progress()
        assert p.staged <= budget and d.staged <= budget
    assert [(m.xfer, m.first, m.count) for m, _ in outbox.sent] == [(0, 0, 3), (0, 3, 3), (0, 6, 3), (0, 9, 1), (1, 0, 1)]
    assert sends(p_transport) == [300, 300, 300, 100, 100]
    assert engine.unpacked == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [10]]
    assert [(s.request_id, b) for s, b in engine.received] == [("big", list(range(10))), ("small", [10])]
    assert p_engine.freed == ["big", "small"]
    assert (p.stats.handoffs_sent, p.stats.chunks_sent, p.stats.handoff_bytes) == (2, 5, 1100)
    assert (d.stats.handoffs_received, d.stats.chunks_received) == (2, 5)
    assert p.stats.max_staged_bytes <= budget and d.stats.max_staged_bytes <= budget


def test_prefill_frees_the_blocks_only_after_the_last_chunk_is_sent():
    h, engine, transport, _ = prefill_side(10_000, {"a": 20})  # 5 blocks
    h.on_ready(DECODE, Ready(0, 0, 2))
    h.on_ready(DECODE, Ready(0, 2, 3))
    h.progress()
    assert sends(transport) == [200, 300]
    complete(transport, 1)  # the later chunk completes first
    h.progress()
    assert engine.freed == [] and h.busy() and h.staged == 200
    complete(transport, 0)
    h.progress()
    assert engine.freed == ["a"] and not h.busy() and h.staged == 0


def test_a_single_block_larger_than_the_whole_budget_goes_alone():
    h, _, transport, _ = prefill_side(50, {"a": 8, "b": 4})
    h.on_ready(DECODE, Ready(0, 0, 1))
    h.on_ready(DECODE, Ready(0, 1, 1))
    h.on_ready(DECODE, Ready(1, 0, 1))
    h.progress()
    assert sends(transport) == [100] and h.staged == 100
    complete(transport, 0)
    h.progress()
    assert sends(transport) == [100, 100]


def test_receives_reserve_blocks_post_in_handoff_order_and_answer_ready():
    engine, transport, outbox = FakeEngine(free_blocks=5), FakeTransport(), FakeOutbox()
    h = Handoffs(engine, transport, outbox, DECODE, staging_budget=10_000)
    h.on_handoff(PREFILL, Handoff(0, state("a", 8)))  # 2 blocks
    h.on_handoff(PREFILL, Handoff(1, state("b", 16)))  # 4 blocks: not free until a's are... never here
    h.on_handoff(PREFILL, Handoff(2, state("c", 4)))  # 1 block: fits, but waits behind b
    h.progress()
    assert [(type(m), m.xfer, d) for m, d in outbox.sent] == [(Ready, 0, PREFILL)]
    assert [(k, n, peer, tag) for k, n, peer, tag, _ in transport.posted] == [("recv", 200, PREFILL - 1, DECODE)]
    complete(transport, 0)
    h.progress()
    [(got, blocks)] = engine.received
    assert got.request_id == "a" and blocks == [0, 1] and engine.unpacked == [[0, 1]] and h.staged == 0
    assert [m.xfer for m, _ in outbox.sent] == [0] and h.busy()  # b still waits for blocks, c behind it
    engine.free_blocks += 2
    h.progress()
    assert [m.xfer for m, _ in outbox.sent] == [0, 1, 2]


def test_receives_in_flight_are_bounded():
    engine, transport, outbox = FakeEngine(), FakeTransport(), FakeOutbox()
    h = Handoffs(engine, transport, outbox, DECODE, staging_budget=10_000, max_receiving=2)
    for xfer in range(3):
        h.on_handoff(PREFILL, Handoff(xfer, state(f"r{xfer}", 4)))
    h.progress()
    assert len(transport.posted) == 2
    complete(transport, 0)
    h.progress()  # the finished receive leaves at the end of this call...
    assert len(transport.posted) == 2
    h.progress()  # ...and the next call fills its place
    assert len(transport.posted) == 3


def test_random_traffic_never_stages_more_than_the_budget():
    import random

    rng = random.Random(0)
    budget = 1000
    sizes = {f"r{i}": rng.choice([4, 16, 32, 48]) for i in range(40)}  # 100 to 1200 bytes
    h, engine, transport, _ = prefill_side(budget, sizes)
    decode_engine, decode_transport, decode_outbox = FakeEngine(), FakeTransport(), FakeOutbox()
    d = Handoffs(decode_engine, decode_transport, decode_outbox, DECODE, budget)
    for xfer, rid in enumerate(sizes):
        d.on_handoff(PREFILL, Handoff(xfer, state(rid, sizes[rid])))
    readies = most = 0
    while h.busy() or d.busy():
        for t in (transport, decode_transport):
            for *_, p in t.posted:
                if rng.random() < 0.3:
                    p.finished = True
        d.progress()
        for msg, _ in decode_outbox.sent[readies:]:
            h.on_ready(DECODE, msg)
        readies = len(decode_outbox.sent)
        h.progress()
        for side in (h, d):
            assert side.staged <= budget, side.staged
            most = max(most, side.staged)
    assert most > budget // 2
    assert h.stats.chunks_sent > h.stats.handoffs_sent  # the 1200-byte transfers went in chunks
    assert sorted(engine.freed) == sorted(sizes) == sorted(s.request_id for s, _ in decode_engine.received)


def block_byte(request_id: str, i: int) -> int:
    """The byte that fills block i of a request's packed KV."""
    return (int(request_id[1:]) * 13 + i) % 256


class TaggedEngine(FakeEngine):
    """Packed KV whose bytes name the request and the block, so a receiver can tell whose block
    landed where: `cache` is the decode side's KV cache, one byte per block."""

    def __init__(self, free_blocks: int = 1000) -> None:
        super().__init__(free_blocks)
        self.cache: dict[int, int] = {}
        self.landed: dict[str, bool] = {}

    def pack_kv(self, request_id: str, first: int, count: int) -> torch.Tensor:
        super().pack_kv(request_id, first, count)
        return torch.tensor([block_byte(request_id, i) for i in range(first, first + count)],
                            dtype=torch.uint8).repeat_interleave(BLOCK_BYTES)

    def unpack_kv(self, buf, block_ids, first_head=0) -> None:
        super().unpack_kv(buf, block_ids)
        for b, chunk in zip(block_ids, buf.view(len(block_ids), BLOCK_BYTES)):
            self.cache[b] = int(chunk[0])

    def add_received(self, state: SeqState, block_ids: list[int]) -> None:
        super().add_received(state, block_ids)
        rid = state.request_id
        self.landed[rid] = [self.cache[b] for b in block_ids] == [block_byte(rid, i) for i in range(len(block_ids))]
        self.free_blocks += len(block_ids)  # it decodes at once and gives its blocks back


def test_two_units_move_every_requests_kv_to_it_through_the_real_messages():
    import random

    rng = random.Random(1)
    pair = PairTransport()
    p_engine, d_engine = TaggedEngine(), TaggedEngine(free_blocks=40)
    p_out, d_out = FakeOutbox(), FakeOutbox()
    budget = 700  # 7 blocks: a transfer of up to 23 blocks goes in up to 4 chunks, interleaved with others
    p = Handoffs(p_engine, pair.end(), p_out, PREFILL, staging_budget=budget)
    d = Handoffs(d_engine, pair.end(), d_out, DECODE, staging_budget=budget, max_receiving=3)
    sizes = {f"r{i}": rng.choice([4, 8, 24, 40, 90]) for i in range(30)}  # 100 to 2300 bytes
    for rid, tokens in sizes.items():
        p_engine.kv_tokens[rid] = tokens
        p.start(state(rid, tokens), DECODE)
    seen_p = seen_d = 0
    for _ in range(10_000):
        for msg, _ in p_out.sent[seen_p:]:
            d.on_handoff(PREFILL, msg)
        seen_p = len(p_out.sent)
        for msg, _ in d_out.sent[seen_d:]:
            p.on_ready(DECODE, msg)
        seen_d = len(d_out.sent)
        p.progress()
        d.progress()
        assert p.staged <= budget and d.staged <= budget
        pair.deliver(rng)
        if not (p.busy() or d.busy()):
            break
    assert not (p.busy() or d.busy())
    assert d_engine.landed == {rid: True for rid in sizes}  # every block of every request in its place
    assert sorted(p_engine.freed) == sorted(sizes)
    assert p.stats.chunks_sent > len(sizes) and p.stats.max_staged_bytes <= budget >= d.stats.max_staged_bytes
