"""Placement policies on plain ints: the failures that users of other routers hit (README,
Placement) replayed with realistic numbers, with the router's booking simulated as
router/mpi_backend.py does it."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest

from kvrelay.configs.schema import RouterSection
from kvrelay.router.placement import (
    DecodeLeastLoaded,
    KvAware,
    LeastLoaded,
    RandomChoice,
    RoundRobin,
    WorkerState,
    make_decode_policy,
    make_policy,
)

BS = 16


def workers(ranks, role: str = "aggregated", **fields) -> list[WorkerState]:
    base = dict(total_blocks=4096, free_blocks=4096, queued_prefill_tokens=0, running_seqs=0, active_decode_blocks=0)
    return [WorkerState(rank=r, role=role, **{**base, **fields}) for r in ranks]


def kv_aware(seed: int = 0, cache_affinity: float = 0.0, **kw) -> KvAware:
    policy = make_policy(RouterSection(policy="kv_aware", seed=seed, cache_affinity=cache_affinity, **kw), BS)
    assert isinstance(policy, KvAware)
    return policy


class Books:
    """The router's books, as router/mpi_backend.py keeps them: add on placement, take back on
    the result; the window header is a copy of the books refreshed every `lag` placements."""

    def __init__(self, ws: list[WorkerState], booking: str = "uncached", lag: int = 8) -> None:
        self.by_rank = {w.rank: w for w in ws}
        self.booking = booking
        self.lag = lag
        self.placed = 0
        self.open: deque[tuple[int, int, int]] = deque()  # (rank, prefill tokens, decode blocks)

    def place(self, rank: int, nblocks: int, cached: int) -> None:
        w = self.by_rank[rank]
        tokens = 0 if w.role == "decode" else (nblocks - cached if self.booking == "uncached" else nblocks) * BS
        w.inflight_requests += 1
        w.inflight_prefill_tokens += tokens
        if w.role != "prefill":  # a prefill worker hands the blocks on to a decode worker
            w.inflight_decode_blocks += nblocks
        self.open.append((rank, tokens, nblocks if w.role != "prefill" else 0))
        self.placed += 1
        if self.placed % self.lag == 0:
            for w in self.by_rank.values():
                w.queued_prefill_tokens, w.running_seqs = w.inflight_prefill_tokens, w.inflight_requests
                w.active_decode_blocks = w.inflight_decode_blocks

    def finish_oldest(self) -> None:
        rank, tokens, nblocks = self.open.popleft()
        w = self.by_rank[rank]
        w.inflight_requests -= 1
        w.inflight_prefill_tokens -= tokens
        w.inflight_decode_blocks -= nblocks


@pytest.mark.parametrize("booking", ["uncached", "full_prompt"])
@pytest.mark.parametrize("overlap_credit", [1.0, 4.0])
def test_shared_system_prompt_spreads_over_eight_workers(booking, overlap_credit):
    # 200 requests: a 20-block system prompt shared by all, then a unique 10-block tail. A worker
    # holds the system prompt once it has served one request. 64 requests in flight at most.
    ws = workers(range(1, 9))
    books = Books(ws, booking)
    policy = kv_aware(overlap_credit=overlap_credit)
    served: set[int] = set()
    counts: Counter[int] = Counter()
    hits = 0
    for _ in range(200):
        rank = policy.choose(ws, 30, lambda r: 20 if r in served else 0)
        cached = 20 if rank in served else 0
        hits += cached > 0
        served.add(rank)
        counts[rank] += 1
        books.place(rank, 30, cached)
        if len(books.open) > 64:
            books.finish_oldest()
    assert len(counts) == 8
    assert max(counts.values()) <= 2 * 200 / 8, counts
    assert hits >= 200 - 8  # each worker computes the system prompt once


@pytest.mark.parametrize("overlap_credit, wins_in_a_row", [(1.0, 3), (3.0, 4)])
def test_a_cached_worker_wins_until_its_queue_outweighs_the_hit(overlap_credit, wins_in_a_row):
    # 40-block requests, 30 of them cached on rank 1 and nowhere else (the cache never spreads
    # here); rank 1's queue grows by the 10 new blocks of each request it takes, the others' by 40.
    ws = workers(range(1, 9), role="prefill")
    books = Books(ws, "uncached")
    policy = kv_aware(overlap_credit=overlap_credit)
    cached = {1: 30}
    chosen = []
    for _ in range(200):
        rank = policy.choose(ws, 40, lambda r: cached.get(r, 0))
        chosen.append(rank)
        books.place(rank, 40, cached.get(rank, 0))
        queues = [w.queued_prefill_blocks(BS) for w in ws]
        assert max(queues) - min(queues) <= 40  # never more than one request's work apart
    assert chosen[:wins_in_a_row] == [1] * wins_in_a_row and chosen[wins_in_a_row] != 1
    # The hit is still used: rank 1 takes more requests than its fair share, for equal work.
    assert Counter(chosen)[1] > 200 / 8


def test_the_cache_credit_never_hides_a_queue():
    # Both workers hold all 30 blocks of a 40-block prompt; with credit 3, Dynamo's
    # max(0, queued + new - credit * cached) would score both 0 and ignore rank 5's queue.
    ws = workers([5, 6], role="prefill")
    ws[0].inflight_prefill_tokens = 20 * BS
    assert all(kv_aware(seed, overlap_credit=3.0).choose(ws, 40, lambda r: 30) == 6 for seed in range(16))


def test_a_long_prefix_cached_only_on_one_worker_goes_there():
    # A second chat turn: its first 45 of 50 blocks are turn one, cached on rank 6; rank 2 holds
    # the 3-block system prompt. Every worker is equally busy.
    for seed in range(5):
        ws = workers(range(1, 9), queued_prefill_tokens=64 * BS, running_seqs=3, active_decode_blocks=300)
        assert kv_aware(seed).choose(ws, 50, lambda r: {6: 45, 2: 3}.get(r, 0)) == 6


def test_equal_costs_go_to_the_less_loaded_worker():
    ws = workers(range(1, 9), queued_prefill_tokens=32 * BS, active_decode_blocks=200)
    for w in ws:
        w.inflight_requests = 5
    ws[5].inflight_requests = 2  # rank 6: same blocks, fewer requests
    assert kv_aware().choose(ws, 10, lambda r: 0) == 6
    assert LeastLoaded(0).choose(ws, 10, lambda r: 0) == 6
    assert DecodeLeastLoaded(0).choose(ws, 10, lambda r: 0) == 6


@pytest.mark.parametrize("make", [lambda s: kv_aware(s), LeastLoaded, DecodeLeastLoaded, RandomChoice])
def test_full_ties_break_by_seeded_random(make):
    ws = workers(range(1, 9), queued_prefill_tokens=160, running_seqs=2, active_decode_blocks=50)

    def sequence(seed: int) -> list[int]:
        policy = make(seed)
        return [policy.choose(ws, 12, lambda r: 0) for _ in range(64)]

    a = sequence(0)
    assert a == sequence(0)
    assert a != sequence(1)
    assert len(set(a)) == 8  # every worker gets picked, not the lowest rank


def test_decode_choice_by_decode_load_keeps_all_five_busy():
    # 1 prefill / 5 decode: the decode candidates hold no prefix and report no prefill queue, so
    # only decode load separates them. A burst of 10 equal requests: two each.
    ws = workers(range(2, 7), role="decode")
    books = Books(ws, lag=10**9)  # the windows never catch up during the burst
    policy = make_decode_policy(RouterSection(policy="kv_aware"))
    assert isinstance(policy, DecodeLeastLoaded)
    burst = []
    for _ in range(10):
        burst.append(policy.choose(ws, 20, lambda r: 0))
        books.place(burst[-1], 20, 0)
    assert Counter(burst) == {r: 2 for r in range(2, 7)}

    # A steady stream of mixed lengths, 40 in flight, windows refreshed every 4 placements:
    # no decoder ever runs dry, and each gets its share of the blocks.
    rng = random.Random(0)
    ws = workers(range(2, 7), role="decode")
    books = Books(ws, lag=4)
    assigned: Counter[int] = Counter()
    for i in range(300):
        nblocks = rng.randint(4, 64)
        rank = policy.choose(ws, nblocks, lambda r: 0)
        assigned[rank] += nblocks
        books.place(rank, nblocks, 0)
        if len(books.open) > 40:
            books.finish_oldest()
        if i >= 5:
            assert min(w.inflight_requests for w in ws) > 0
    mean = sum(assigned.values()) / 5
    assert all(abs(b - mean) <= 0.1 * mean for b in assigned.values()), assigned


def test_loads_take_the_fresher_of_window_and_books():
    w = workers([1])[0]
    w.queued_prefill_tokens, w.inflight_prefill_tokens = 0, 33  # the window has not seen the burst yet
    assert w.queued_prefill_blocks(BS) == 3
    w.queued_prefill_tokens, w.inflight_prefill_tokens = 40, 40  # the same work in both views counts once
    assert w.queued_prefill_blocks(BS) == 3
    w.active_decode_blocks, w.inflight_decode_blocks = 90, 60
    w.running_seqs, w.inflight_requests = 2, 5
    assert (w.decode_blocks, w.load) == (90, 5)


def test_cache_table_is_read_only_where_it_can_change_the_choice():
    ws = workers(range(1, 9), role="prefill")
    for w in ws[2:]:
        w.inflight_prefill_tokens = 500 * BS  # busier than any hit could make up for
    asked: list[int] = []

    def cached(rank: int) -> int:
        asked.append(rank)
        return 30

    kv_aware().choose(ws, 40, cached)
    assert sorted(asked) == [1, 2]
    asked.clear()
    kv_aware(overlap_credit=0.0).choose(ws, 40, cached)
    assert asked == []


def test_round_robin_cycles_over_the_given_workers():
    policy = RoundRobin()
    ws = workers([3, 1, 2])
    assert [policy.choose(ws, 1, lambda r: 0) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    assert policy.choose(workers([1, 3, 4]), 1, lambda r: 0) == 3  # the list changed: next rank after 1


def test_random_is_seeded_and_covers_every_worker():
    ws = workers(range(1, 6))
    p, q = RandomChoice(7), RandomChoice(7)
    a = [p.choose(ws, 1, lambda r: 0) for _ in range(100)]
    assert a == [q.choose(ws, 1, lambda r: 0) for _ in range(100)]
    assert set(a) == {1, 2, 3, 4, 5}


def test_least_loaded_picks_the_fewest_requests():
    ws = workers([1, 2, 3])
    ws[0].inflight_requests = 4
    ws[1].running_seqs, ws[1].inflight_requests = 3, 1  # the window shows more than the books
    ws[2].inflight_requests = 2
    assert make_policy(RouterSection(policy="least_loaded"), BS).choose(ws, 1, lambda r: 0) == 3


def test_policy_names():
    kinds = {name: (type(make_policy(RouterSection(policy=name), BS)), type(make_decode_policy(RouterSection(policy=name))))
             for name in ("kv_aware", "least_loaded", "round_robin", "random")}
    assert kinds == {
        "kv_aware": (KvAware, DecodeLeastLoaded),
        "least_loaded": (LeastLoaded, DecodeLeastLoaded),
        "round_robin": (RoundRobin, RoundRobin),
        "random": (RandomChoice, RandomChoice),
    }
    with pytest.raises(ValueError, match="allowed: kv_aware, least_loaded, round_robin, random"):
        make_policy(RouterSection.model_construct(policy="fastest"), BS)


def test_prefixes_in_flight_keep_a_document_together_and_a_hot_prefix_replicates_by_queue():
    # The router's own books (router/books.py) credit a worker with a prompt's blocks when it places
    # it; no window shows anything yet (a burst). 32-block documents, 1-block questions.
    from kvrelay.router.books import Books

    def place_all(policy, prompts):
        ws = workers(range(1, 5))
        books = Books({w.rank: w for w in ws})
        chosen = []
        for i, hashes in enumerate(prompts):
            inflight = books.prefixes.prefix_lengths(hashes)
            r = policy.choose(ws, len(hashes), lambda r: inflight.get(r, 0))
            books.place(str(i), r, None, (len(hashes) - inflight.get(r, 0)) * BS, len(hashes), hashes)
            chosen.append(r)
        return chosen

    doc = [[1000 * d + b for b in range(32)] for d in range(8)]
    questions = [doc[d] + [10**6 + 10 * d + q] for d in range(8) for q in range(8)]
    # Without affinity a document's second question already finds its holder too busy.
    assert len(set(place_all(kv_aware(), questions)[:8])) > 1
    chosen = place_all(kv_aware(cache_affinity=4.0), questions)
    assert all(len(set(chosen[8 * d: 8 * d + 8])) == 1 for d in range(8)), chosen
    assert sorted(Counter(chosen).values()) == [16, 16, 16, 16]
    # One 24-block prefix over 400 queries: the holder runs up to (1 + 4) x 24 blocks of cost ahead
    # (prefill blocks x 16 + decode blocks: 38 queries here), then a second worker computes the
    # prefix, and so on until all four hold it; then they share the queries.
    hot = [list(range(24)) + [10**6 + q] for q in range(400)]
    chosen = place_all(kv_aware(cache_affinity=4.0), hot)
    first = {r: chosen.index(r) for r in set(chosen)}
    assert len(first) == 4 and 30 < sorted(first.values())[1] < 60, first
    assert min(Counter(chosen).values()) > 60, Counter(chosen)


def test_no_worker_stays_idle_beside_holders_of_a_long_hot_prefix():
    # 16 workers, 64 requests in flight (the oldest finishes first), one 96-block prefix: the
    # holders' lead stays below (1 + 4) x 96 blocks, yet an idle worker must still get lines.
    from kvrelay.router.books import Books

    ws = workers(range(1, 17))
    books = Books({w.rank: w for w in ws})
    policy = kv_aware(cache_affinity=4.0, max_inflight=64)
    order: deque[str] = deque()
    counts: Counter[int] = Counter()
    for i in range(1000):
        hashes = list(range(96)) + [10**6 + i]
        if len(order) == 64:
            books.finished(order.popleft(), 0)
        inflight = books.prefixes.prefix_lengths(hashes)
        r = policy.choose(ws, len(hashes), lambda r: inflight.get(r, 0))
        books.place(str(i), r, None, (len(hashes) - inflight.get(r, 0)) * BS, len(hashes), hashes)
        order.append(str(i))
        counts[r] += 1
    assert len(counts) == 16 and min(counts.values()) > 1000 / 16 / 3, counts


def test_a_conversations_next_turn_stays_with_its_holder_by_default():
    # Issue 15 (B2): a turn whose history (p blocks) one worker holds goes elsewhere as soon as that
    # worker's prefill queue is more than p blocks ahead without affinity (the hit only saves this
    # request's compute), and the history is computed again. With the default affinity (4, batch
    # files and traces alike) it stays until the holder is (1 + 4) x p blocks ahead.
    p, n = 100, 150

    def chosen(policy, ahead_blocks: int) -> int:
        ws = workers([1, 2, 3, 4])
        ws[0].queued_prefill_tokens = ahead_blocks * BS
        return policy.choose(ws, n, lambda r: p if r == 1 else 0)

    default = make_policy(RouterSection(), BS)
    assert RouterSection().cache_affinity == 4.0
    assert chosen(default, 4 * p) == 1 and chosen(default, int(4.9 * p)) == 1
    assert chosen(default, int(5.1 * p)) != 1
    assert chosen(kv_aware(cache_affinity=0.0), int(1.1 * p)) != 1


def test_the_in_flight_walk_and_the_affinity_bound_change_no_decision():
    # The router's fast paths against their plain definitions, on random books and loads: the
    # in-flight probe against a walk block by block, and kv_aware's choice with the bound on the
    # cached blocks (`most_cached`, which lets it skip workers under cache affinity) against the
    # same choice without it: the same rank and the same random draws.
    from kvrelay.router.books import InflightPrefixes

    rng = random.Random(11)
    ranks = list(range(1, 17))
    books = InflightPrefixes(ranks)
    skipped = 0  # choices under affinity that read fewer than every worker's cache
    chains = [[rng.getrandbits(64) for _ in range(rng.randrange(1, 60))] for _ in range(40)]
    for step in range(600):
        chain = rng.choice(chains)
        owned = books.add(rng.choice(ranks), chain[: rng.randrange(1, len(chain) + 1)])
        if rng.random() < 0.3:
            books.drop_retired([(rng.choice(ranks), owned)])  # a prefix with holes: the owner left
        probe = rng.choice(chains)[: rng.randrange(0, 60)]
        want = {}
        for r in ranks:
            k = 0
            while k < len(probe) and books.masks.get(probe[k], 0) & books.bit[r]:
                k += 1
            if k:
                want[r] = k
        assert books.prefix_lengths(probe) == want

        ws = workers(ranks)
        for w in ws:
            w.queued_prefill_tokens = rng.choice([0, rng.randrange(20 * BS), rng.randrange(400 * BS)])
            w.active_decode_blocks = rng.choice([0, 10, rng.randrange(2000)])
            w.inflight_requests = rng.choice([0, 1, rng.randrange(40)])
        cached = {r: rng.choice([0, 0, 0, rng.randrange(60), want.get(r, 0)]) for r in ranks}
        n = rng.randrange(0, 60)
        affinity = rng.choice([0.0, 1.0, 4.0])
        plain, bounded = kv_aware(seed=step, cache_affinity=affinity), kv_aware(seed=step, cache_affinity=affinity)
        asked = []
        assert bounded.choose(ws, n, lambda r: asked.append(r) or cached[r], max(cached.values())) == \
            plain.choose(ws, n, cached.__getitem__), step
        assert bounded.rng.getstate() == plain.rng.getstate()
        skipped += affinity > 0 and len(asked) < len(ranks)
    assert skipped > 50
