"""Pulls (ranks/pulls.py, router/pulls.py) in one process: a puller's and a source's Pulls and
Handoffs units over an in-process pair transport that matches sends and receives as NCCL does
(k-th with k-th) and copies the bytes, every control message through the real serializer. First
with fake engines (a prefix cache of hashes whose packed bytes name the hash), then with two real
engines of a tiny llama, where a pulled prefix must give the same tokens as a computed one, also
when the source evicted part of it between the router's decision and the PULL."""

from __future__ import annotations

from collections import Counter

import torch

from kvrelay.configs.schema import load_config
from kvrelay.core.messages import Pull, Pulled, Ready
from kvrelay.core.request import Request, SamplingParams
from kvrelay.core.timing import TimingModel, load_timing
from kvrelay.ranks.engine.engine import Engine
from kvrelay.ranks.handoff import Handoffs
from kvrelay.ranks.pulls import Pulls
from kvrelay.router.pulls import PullPlanner

from .fakes import FakeOutbox, PairTransport

SOURCE, PULLER = 1, 2  # world ranks
BLOCK_BYTES = 16


class Worker:
    """One side: an engine with its Handoffs and Pulls units; requests it admits are collected."""

    def __init__(self, engine, rank: int, end, block_size: int, budget: int, from_host: bool = False) -> None:
        self.engine, self.rank, self.outbox = engine, rank, FakeOutbox()
        self.handoffs = Handoffs(engine, end, self.outbox, rank, budget)
        self.admitted: list[Request] = []
        self.pulls = Pulls(engine, self.handoffs, self.outbox, block_size, self._admit, from_host=from_host)
        self.seen = 0

    def _admit(self, request: Request) -> None:
        self.admitted.append(request)
        if isinstance(self.engine, Engine):
            self.engine.add_request(request)

    def receive(self, other: Worker) -> None:
        for msg, dest in other.outbox.sent[self.seen :]:
            assert dest == self.rank
            if isinstance(msg, Pull):
                self.pulls.on_pull(other.rank, msg)
            elif isinstance(msg, Pulled):
                self.pulls.on_pulled(other.rank, msg)
            elif isinstance(msg, Ready):
                self.handoffs.on_ready(other.rank, msg)
        self.seen = len(other.outbox.sent)

    def turn(self, other: Worker) -> None:
        self.receive(other)
        self.pulls.progress()
        self.handoffs.progress()

    def busy(self) -> bool:
        return self.pulls.busy() or self.handoffs.busy()


def run(source: Worker, puller: Worker, pair: PairTransport, turns: int = 100, check=lambda: None) -> None:
    for _ in range(turns):
        for w, other in ((puller, source), (source, puller)):
            w.turn(other)
            check()
        pair.deliver()
        if not (source.busy() or puller.busy()):
            return
    raise AssertionError("the pull did not finish")


# --- fake engines ----------------------------------------------------------------------------------


def byte_of(block_hash: int) -> int:
    return block_hash % 251


class CacheEngine:
    """A prefix cache of `num_blocks` blocks of one token each: a prompt's block hashes are its
    tokens but the last. Packed KV is BLOCK_BYTES bytes per block, each the byte of its hash."""

    def __init__(self, num_blocks: int, cached: list[int] = (), host: list[int] = ()) -> None:
        self.host = {h: s for s, h in enumerate(host)}  # a host tier: hash -> slot, whose byte is the hash's
        self.host_refs: Counter[int] = Counter()
        self.free = list(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block
        self.refs: Counter[int] = Counter()
        self.kv: dict[int, int] = {}  # block -> its byte
        for h in cached:
            b = self.free.pop(0)
            self.cached[h], self.kv[b] = b, byte_of(h)

    # The KV surface of a pull and of a handoff's receiving side.
    def prompt_hashes(self, token_ids):
        return list(token_ids[:-1])

    def pin_cached(self, hashes):
        out = []
        for h in hashes:
            if h not in self.cached:
                break
            out.append(self.cached[h])
        self.refs.update(out)
        return out

    def unpin(self, block_ids, cold=False):
        self.refs.subtract(block_ids)
        assert min(self.refs.values(), default=0) >= 0
        self.free += [b for b in block_ids if not self.refs[b] and b not in self.cached.values()]

    def pin_host(self, hashes):
        out = []
        for h in hashes:
            if h not in self.host:
                break
            out.append(self.host[h])
        self.host_refs.update(out)
        return out

    def unpin_host(self, slots):
        self.host_refs.subtract(slots)
        assert min(self.host_refs.values(), default=0) >= 0

    def pack_served(self, block_ids, slots):
        of_slot = {s: h for h, s in self.host.items()}
        return torch.cat([self.pack_blocks(block_ids),
                          torch.tensor([byte_of(of_slot[s]) for s in slots], dtype=torch.uint8).repeat_interleave(BLOCK_BYTES)])

    def reserve(self, num_tokens):
        if num_tokens > len(self.free):
            return None
        out, self.free = self.free[:num_tokens], self.free[num_tokens:]
        self.refs.update(out)
        return out

    def adopt_blocks(self, hashes, block_ids):
        for h, b in zip(hashes, block_ids, strict=True):
            self.cached.setdefault(h, b)
        self.unpin(block_ids)

    def pack_blocks(self, block_ids):
        # A block never written reads as 0 (memory that holds no KV: a pull's padding may read it).
        return torch.tensor([self.kv.get(b, 0) for b in block_ids], dtype=torch.uint8).repeat_interleave(BLOCK_BYTES)

    def staging_buffer(self, n):
        return torch.empty(n * BLOCK_BYTES, dtype=torch.uint8)

    def unpack_kv(self, buf, block_ids, first_head=0):
        assert first_head == 0, "a pull moves whole blocks between single ranks"
        for b, chunk in zip(block_ids, buf.view(len(block_ids), BLOCK_BYTES)):
            self.kv[b] = int(chunk[0])

    def kv_blocks(self, num_tokens):
        return num_tokens

    def kv_bytes(self, num_tokens):
        return num_tokens * BLOCK_BYTES

    def transfer_s(self, num_tokens):
        return 0.0

    def evict(self, hashes) -> None:
        """The cache takes these blocks for other work (only unreferenced ones can go)."""
        for h in hashes:
            b = self.cached[h]
            assert not self.refs[b], "a pinned block was evicted"
            del self.cached[h]
            self.free.append(b)


def fake_pair(source_cached, puller_cached, puller_blocks: int = 100, budget_blocks: int = 3, source_host=(),
              from_host: bool = False):
    pair = PairTransport()
    source = Worker(CacheEngine(100, source_cached, source_host), SOURCE, pair.end(), 1, budget_blocks * BLOCK_BYTES,
                    from_host)
    puller = Worker(CacheEngine(puller_blocks, puller_cached), PULLER, pair.end(), 1, budget_blocks * BLOCK_BYTES)
    return source, puller, pair


def request(hashes: list[int]) -> Request:
    return Request("r", [*hashes, 7], SamplingParams(max_tokens=1))


def holds(engine: CacheEngine, hashes) -> bool:
    """The engine caches every one of `hashes`, each block holding that hash's bytes."""
    return all(h in engine.cached and engine.kv[engine.cached[h]] == byte_of(h) for h in hashes)


def test_a_pull_registers_the_sources_blocks_by_hash_while_they_stay_pinned_there():
    prefix = list(range(10, 20))
    source, puller, pair = fake_pair(prefix, prefix[:2])
    puller.pulls.start(request(prefix), SOURCE, len(prefix))
    pinned = []

    def check():  # between PULL and the last send, the source's 8 blocks are referenced
        pinned.append(sum(1 for h in prefix[2:] if source.engine.refs[source.engine.cached[h]]))

    run(source, puller, pair, check=check)
    [(pull, _)] = [m for m in puller.outbox.sent if isinstance(m[0], Pull)]
    assert pull.hashes == prefix[2:]  # only what the puller lacks
    assert 8 in pinned and pinned[-1] == 0 and not +source.engine.refs
    assert holds(puller.engine, prefix) and puller.admitted == [request(prefix)]
    assert not +puller.engine.refs  # its own hits unpinned, the landed blocks cached and free
    s = puller.pulls.stats
    assert (s.pulls, s.pulled_blocks, s.pulled_bytes, s.pull_missing_blocks) == (1, 8, 8 * BLOCK_BYTES, 0)
    assert (source.pulls.stats.pulls_served, source.pulls.stats.served_blocks) == (1, 8)
    assert len(pair.sends) == 3 and source.handoffs.stats.max_staged_bytes <= 3 * BLOCK_BYTES  # chunks of 3, 3, 2
    assert source.handoffs.stats.handoffs_sent == 0 and puller.handoffs.stats.handoffs_received == 0


def test_blocks_the_source_evicted_before_the_pull_are_left_to_compute():
    prefix = list(range(10, 20))
    source, puller, pair = fake_pair(prefix, [])
    puller.pulls.start(request(prefix), SOURCE, len(prefix))
    puller.turn(source)  # PULL sent, the puller's 10 blocks reserved
    source.engine.evict(prefix[4:])  # evicted after the router's decision, before the PULL
    free_before = len(puller.engine.free)
    run(source, puller, pair)
    assert holds(puller.engine, prefix[:4]) and not any(h in puller.engine.cached for h in prefix[4:])
    assert len(puller.engine.free) == free_before + 6  # the 6 reserved blocks nobody sent went back
    assert puller.pulls.stats.pull_missing_blocks == 6 and puller.pulls.stats.pulled_blocks == 4
    assert puller.admitted == [request(prefix)]


def test_a_source_that_holds_none_of_them_sends_only_the_first_chunk_s_padding():
    prefix = list(range(10, 16))
    source, puller, pair = fake_pair([], [])
    puller.pulls.start(request(prefix), SOURCE, len(prefix))
    run(source, puller, pair)
    # The puller had posted the first chunk's receive (3 blocks): the source fills it, nothing more.
    assert [buf.numel() for buf, _ in pair.sends] == [3 * BLOCK_BYTES] and puller.admitted == [request(prefix)]
    assert len(puller.engine.free) == 100 and not puller.engine.cached and not +puller.engine.refs
    s = puller.pulls.stats
    assert (s.pull_missing_blocks, s.pull_padded_blocks, s.pulled_blocks) == (6, 3, 0)
    assert source.pulls.stats.pulls_served == 0 and not +source.engine.refs


def test_without_staging_room_for_the_first_chunk_the_pull_asks_first_then_sends_ready():
    prefix = list(range(10, 20))
    source, puller, pair = fake_pair(prefix, [])
    puller.handoffs.staged = puller.handoffs.staging_budget  # another transfer fills the room
    puller.pulls.start(request(prefix), SOURCE, len(prefix))
    puller.turn(source)
    [(pull, _)] = puller.outbox.sent
    assert pull.first == 0 and pair.recvs == []
    puller.handoffs.staged = 0
    run(source, puller, pair)
    assert holds(puller.engine, prefix) and puller.pulls.stats.pull_padded_blocks == 0
    assert [type(m).__name__ for m, _ in puller.outbox.sent] == ["Pull", "Ready", "Ready", "Ready", "Ready"]


def test_the_first_chunk_leaves_on_the_pull_with_no_ready():
    prefix = list(range(10, 13))  # 3 blocks: one chunk
    source, puller, pair = fake_pair(prefix, [])
    puller.pulls.start(request(prefix), SOURCE, len(prefix))
    puller.turn(source)  # receive posted, PULL sent
    assert len(pair.recvs) == 1 and puller.outbox.sent[0][0].first == 3
    source.turn(puller)  # PULL in: blocks pinned, their send posted, PULLED out
    assert len(pair.sends) == 1 and [type(m).__name__ for m, _ in source.outbox.sent] == ["Pulled"]
    pair.deliver()
    puller.turn(source)
    assert holds(puller.engine, prefix) and puller.admitted == [request(prefix)]
    assert [type(m).__name__ for m, _ in puller.outbox.sent] == ["Pull"]  # one control round trip
    source.turn(puller)
    assert not +source.engine.refs and not source.busy() and not puller.busy()


def test_padding_blocks_stay_reserved_until_their_chunk_lands_and_are_never_registered():
    prefix = list(range(10, 20))
    source, puller, pair = fake_pair(prefix, [])
    puller.pulls.start(request(prefix), SOURCE, len(prefix))
    puller.turn(source)  # the first chunk (3 blocks) posted, 10 blocks reserved
    first = pair.recvs[0]
    reserved = [b for b in range(100) if puller.engine.refs[b]]
    source.engine.evict(prefix[1:])  # the source keeps 1 block of the 10
    source.turn(puller)
    puller.turn(source)  # PULLED(1): the 7 blocks past the chunk go back, the chunk's 2 padding ones not yet
    assert not first[1].finished and sum(puller.engine.refs[b] for b in reserved) == 3
    run(source, puller, pair)
    assert holds(puller.engine, prefix[:1]) and not any(h in puller.engine.cached for h in prefix[1:])
    assert not +puller.engine.refs and len(puller.engine.free) == 99 and puller.admitted == [request(prefix)]
    s = puller.pulls.stats
    assert (s.pulled_blocks, s.pull_padded_blocks, s.pull_missing_blocks) == (1, 2, 9)


def test_a_source_sends_the_run_its_host_tier_holds_past_its_gpu_cache_s():
    prefix = list(range(10, 20))
    for from_host in (True, False):
        # GPU: 10..13; host tier: 12..17 (12 and 13 on both); 18, 19 nowhere.
        source, puller, pair = fake_pair(prefix[:4], prefix[:1], source_host=prefix[2:8], from_host=from_host)
        puller.pulls.start(request(prefix), SOURCE, len(prefix))
        pinned = []

        def check():
            pinned.append(sum(source.engine.host_refs.values()))

        run(source, puller, pair, check=check)
        got = 8 if from_host else 4
        assert holds(puller.engine, prefix[:got]) and not any(h in puller.engine.cached for h in prefix[got:])
        assert puller.admitted == [request(prefix)] and not +puller.engine.refs
        s, t = puller.pulls.stats, source.pulls.stats
        assert (s.pulled_blocks, s.pull_missing_blocks) == (got - 1, 10 - got)
        assert (t.served_blocks, t.served_host_blocks) == (got - 1, 4 if from_host else 0)
        assert max(pinned) == (4 if from_host else 0) and not +source.engine.host_refs and not +source.engine.refs


def test_a_source_with_the_prefix_on_its_host_tier_alone_sends_it_from_there_padding_from_host():
    prefix = list(range(10, 20))
    source, puller, pair = fake_pair([], [], source_host=prefix[:2], from_host=True)
    puller.pulls.start(request(prefix), SOURCE, len(prefix))
    run(source, puller, pair)
    assert holds(puller.engine, prefix[:2]) and len(puller.engine.cached) == 2
    s = puller.pulls.stats
    assert (s.pulled_blocks, s.pull_padded_blocks, s.pull_missing_blocks) == (2, 1, 8)
    assert source.pulls.stats.served_host_blocks == 2 and not +source.engine.host_refs


def test_a_puller_that_holds_the_prefix_already_asks_nothing():
    prefix = list(range(10, 16))
    source, puller, pair = fake_pair(prefix, prefix)
    puller.pulls.start(request(prefix), SOURCE, len(prefix))
    puller.turn(source)
    assert puller.outbox.sent == [] and puller.admitted == [request(prefix)] and not puller.busy()


def test_a_puller_without_free_blocks_waits_before_asking_and_pins_nothing_meanwhile():
    prefix = list(range(10, 20))
    source, puller, pair = fake_pair(prefix, prefix[:2], puller_blocks=6)  # 4 free, 8 wanted
    puller.pulls.start(request(prefix), SOURCE, len(prefix))
    for _ in range(3):
        puller.turn(source)
    assert puller.outbox.sent == [] and not +puller.engine.refs and puller.busy()
    puller.engine.free += [100 + i for i in range(4)]  # its running sequences finished
    run(source, puller, pair)
    assert holds(puller.engine, prefix) and puller.admitted == [request(prefix)]


# --- real engines --------------------------------------------------------------------------------


def make_engine(model_dir, host_kv_gib: float = 0.0) -> Engine:
    return Engine.from_config(load_config(**{
        "model.path": str(model_dir), "job.device": "cpu", "model.dtype": "float32",
        "cache.block_size": 8, "cache.num_blocks": 20, "model.max_model_len": 128,
        "scheduler.max_batch_tokens": 32, "scheduler.max_seqs": 2, "cache.host_kv_gib": host_kv_gib,
    }))


def drain(engine: Engine, requests: list[Request]) -> dict[str, list[int]]:
    for r in requests:
        engine.add_request(r)
    got = {}
    while engine.has_work():
        got |= {r.request_id: r.output_token_ids for r in engine.step().finished}
    return got


def greedy(rid: str, ids: list[int]) -> Request:
    return Request(rid, ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))


def test_a_pulled_prefix_gives_the_tokens_of_a_computed_one_even_when_the_source_evicted_part_of_it(tiny_models):
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 200, (48,), generator=g).tolist()  # 6 full blocks
    first, second = greedy("first", shared + [5, 6, 7]), greedy("second", shared + [9, 10, 11, 12])
    filler = greedy("filler", torch.randint(3, 200, (120,), generator=g).tolist())  # 16 blocks of the 20
    expected = drain(make_engine(tiny_models["llama"]), [second])
    # With a host tier on the source (64 blocks), what its cache evicts is sent from there.
    for evict, host in ((False, False), (True, False), (True, True)):
        pair = PairTransport()
        a, b = make_engine(tiny_models["llama"], 64 * 4096 / (1 << 30) if host else 0.0), make_engine(tiny_models["llama"])
        budget = 2 * a.kv_bytes(1)  # chunks of two blocks
        source = Worker(a, SOURCE, pair.end(), 8, budget, from_host=host)
        puller = Worker(b, PULLER, pair.end(), 8, budget)
        drain(a, [first])  # the source caches the shared prefix
        puller.pulls.start(second, SOURCE, 6)  # the router's decision
        puller.turn(source)  # PULL on its way
        if evict:
            drain(a, [filler])  # the source's cache turns over before the PULL arrives
        run(source, puller, pair)
        got = drain(b, [])
        s = puller.pulls.stats
        assert got == expected, f"evict={evict} host={host}"
        if host:
            assert s.pulled_blocks == 6 and source.pulls.stats.served_host_blocks > 0, vars(source.pulls.stats)
            assert not a.host.pinned  # the source's host slots let go
        elif evict:
            assert 0 < s.pulled_blocks < 6 and s.pull_missing_blocks == 6 - s.pulled_blocks, vars(s)
        else:
            assert s.pulled_blocks == 6 and s.pull_missing_blocks == 0
        assert b.stats.cached_prompt_tokens == 8 * s.pulled_blocks  # the prefill hit what landed
        assert b.stats.computed_tokens == len(second.prompt_token_ids) - 8 * s.pulled_blocks + 5


# --- the router's side -----------------------------------------------------------------------------


def test_pull_credit_is_the_recompute_saved_net_of_the_transfer():
    timing = load_timing(load_config())
    credit = timing.pull_credit(64, 0, 100)
    assert 90 < credit < 100  # 240 GB/s against ~2.2 ms a block: nearly all of it
    slow = TimingModel.model_validate(timing.model_dump() | {"handoff": {"bandwidth_gb_s": 0.001, "latency_s": 0.0}})
    assert slow.pull_credit(64, 0, 100) == 0.0 and timing.pull_credit(64, 5, 0) == 0.0


def test_planner_picks_the_longest_gpu_prefix_and_never_both_directions_of_a_pair():
    planner = PullPlanner(lambda own, n, host_blocks=0: 0.9 * n, ranks=[1, 2, 3], min_blocks=4)
    gpu = {1: 10, 2: 0, 3: 12, 4: 30}  # rank 4 is a decode worker: never a source
    assert planner.source(2, 0, gpu) == (3, 12)
    assert planner.source(2, 9, gpu) is None  # 3 blocks ahead: under min_blocks
    assert planner.source(4, 0, gpu) is None  # not a puller either
    assert planner.worth(2, 2, gpu) == 0.9 * 10
    planner.place("r", 3, 2, 12)
    assert planner.source(3, 0, {2: 20, 1: 5}) == (1, 5)  # 2 -> 3 would cross 3 -> 2 in flight
    planner.done("r")
    assert planner.source(3, 0, {2: 20, 1: 5}) == (2, 20) and planner.planned_blocks == 12
    assert PullPlanner(lambda own, n, host_blocks=0: 0.0, [1, 2], 1).source(1, 0, {2: 8}) is None  # no saving: no pull


def test_a_pull_from_a_host_tier_is_credited_less_by_its_host_to_device_copy():
    timing = load_timing(load_config())
    gpu, host = timing.pull_credit(64, 0, 100), timing.pull_credit(64, 0, 100, host_blocks=60)
    copy = timing.host_copy_s(60 * 64) / timing.prefill_s(100 * 64, 0) * 100
    assert abs((gpu - host) - copy) < 1e-9 and 0 < host < gpu


def test_planner_counts_a_source_s_host_run_past_its_gpu_cache_and_credits_those_blocks_as_host_ones():
    calls = []

    def credit(own, n, host_blocks=0):
        calls.append((own, n, host_blocks))
        return n - 0.5 * host_blocks

    planner = PullPlanner(credit, ranks=[1, 2, 3], min_blocks=4)
    gpu, host = {1: 10, 2: 6, 3: 0}, {1: 0, 2: 8, 3: 0}
    assert planner.source(3, 0, gpu) == (1, 10)  # GPU caches alone
    assert planner.source(3, 0, gpu, host) == (2, 14)  # 6 on rank 2's GPU + 8 on its host tier
    assert calls[-1] == (0, 14, 8)
    assert planner.worth(3, 9, gpu, host) == 5 - 0.5 * 5  # holds 9: pulls 5, all past rank 2's GPU run
    assert planner.worth(3, 2, gpu, host) == 12 - 0.5 * 8


def test_a_served_prefix_becomes_the_next_to_evict_on_its_source_tail_first_unless_in_use():
    from kvrelay.ranks.engine.kv_cache import KVCacheManager

    kv = KVCacheManager(6, 4, hash_seed=0)
    prefix = kv.allocate(3)
    for i, b in enumerate(prefix):
        kv.register(b, 100 + i)
    kv.unpin(prefix)
    other = kv.allocate(1)
    kv.register(other[0], 200)
    kv.unpin(other)  # warmer than the prefix now
    served = kv.pin_cached([100, 101, 102, 103])
    assert served == prefix and kv.num_free == 3
    kv.pin_cached([100])  # a running sequence shares the first block
    kv.unpin(served, cold=True)
    evicted = []
    kv.on_evict = lambda block_id, block_hash: evicted.append(block_hash)
    kv.allocate(2)
    assert evicted == [102, 101]  # the served tail first, not the never-used blocks or hash 200
    assert kv.pin_cached([100]) == prefix[:1]  # the shared block stayed


def test_a_request_that_would_compute_blocks_on_their_way_waits_for_the_pull():
    prefix = list(range(10, 20))
    source, puller, pair = fake_pair(prefix, prefix[:2])
    puller.pulls.start(request(prefix), SOURCE, len(prefix))
    puller.turn(source)  # asked for 12..19
    later = Request("later", [*prefix[:6], 55, 56, 7], SamplingParams(max_tokens=1))  # shares 12..15
    other = Request("other", [10, 11, 77, 78, 7], SamplingParams(max_tokens=1))  # shares only what it holds
    assert puller.pulls.hold(later) and not puller.pulls.hold(other)
    run(source, puller, pair)
    assert puller.admitted == [request(prefix), later]  # after the blocks landed, with the pull's request
    assert not puller.pulls.hold(later)  # no pull in progress: nothing to wait for
