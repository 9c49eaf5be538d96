"""Block pool and scheduler on plain ints: no model, no torch."""

from kvrelay.ranks.engine.block_pool import BlockPool
from kvrelay.ranks.engine.kv_cache import KVCacheManager
from kvrelay.ranks.engine.scheduler import Scheduler
from kvrelay.ranks.engine.sequence import Sequence, SeqStatus
from kvrelay.core.block_hash import block_hashes, hash_block, hash_seed
from kvrelay.core.request import Request, SamplingParams

SEED = hash_seed("test-model", 4)


def make_seq(rid: str, tokens: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence.from_request(Request(rid, tokens, SamplingParams(max_tokens=max_tokens, temperature=0)), 1024)


def run_step(s: Scheduler, next_token: int = 7) -> list[tuple[str, int]]:
    """One step with a stand-in forward: every sampling sequence gets `next_token`."""
    batch = s.schedule()
    for item in batch:
        samples = item.samples
        s.on_computed(item)
        if samples:
            item.seq.token_ids.append(next_token)
            if item.seq.num_tokens >= item.seq.max_total_tokens:
                s.finish(item.seq)
    return [(item.seq.request_id, item.num_new_tokens) for item in batch]


def test_chained_hashes_depend_on_the_whole_prefix_and_the_seed():
    a = block_hashes(list(range(12)), 4, SEED)
    b = block_hashes([99] + list(range(1, 12)), 4, SEED)
    assert len(a) == 3 and len(set(a)) == 3
    assert all(x != y for x, y in zip(a, b))  # a change in block 0 changes every later hash
    assert block_hashes(list(range(12)), 4, hash_seed("other", 4)) != a
    assert block_hashes(list(range(13)), 4, SEED) == a  # partial blocks are not hashed
    assert block_hashes(list(range(12)), 4, SEED, start=2, parent=a[1]) == [a[2]]
    assert hash_block(a[0], list(range(4, 8)), SEED) == a[1]


def test_pool_lru_eviction():
    pool = BlockPool(4, 4)
    blocks, evicted = pool.take(2)
    assert evicted == [] and pool.register(blocks[0], 111) and pool.register(blocks[1], 222)
    assert not pool.register(blocks[1], 111)  # the first block to compute a hash keeps it
    assert pool.match_prefix([111, 222, 333]) == blocks
    pool.unref(blocks[::-1])  # tail first: block of 222 is colder than block of 111
    assert pool.num_free == 4 and pool.match_prefix([111, 222]) == blocks  # free yet still cached
    _, evicted = pool.take(3)  # the two never-used blocks, then the coldest cached one
    assert evicted == [(blocks[1], 222)] and pool.match_prefix([111, 222]) == [blocks[0]]


def test_pool_hit_on_a_free_block_takes_it_out_of_the_free_queue():
    pool = BlockPool(2, 4)
    [b], _ = pool.take(1)
    pool.register(b, 5)
    pool.unref([b])
    assert pool.num_free_after_touch([b]) == 1
    pool.touch([b])
    assert pool.num_free == 1 and pool.ref_counts[b] == 1
    assert pool.take(1)[0] != [b]


def test_chunked_prefill_respects_the_token_budget():
    s = Scheduler(KVCacheManager(64, 4, SEED), max_batch_tokens=8, max_seqs=8)
    s.add(make_seq("a", list(range(20))))
    s.add(make_seq("b", list(range(100, 105))))
    assert run_step(s) == [("a", 8)]
    assert run_step(s) == [("a", 8)]
    assert run_step(s) == [("a", 4), ("b", 4)]  # a finishes its prompt and samples, b starts
    assert run_step(s) == [("a", 1), ("b", 1)]


def test_without_chunking_a_prompt_runs_whole_or_waits():
    s = Scheduler(KVCacheManager(64, 4, SEED), max_batch_tokens=8, max_seqs=8, chunked_prefill=False)
    s.add(make_seq("a", list(range(20))))
    s.add(make_seq("b", list(range(100, 105))))
    assert run_step(s) == [("a", 20)]  # alone in the batch, it runs over the budget
    assert run_step(s) == [("a", 1), ("b", 5)]


def test_prefix_hits_skip_cached_blocks_but_never_the_last_token():
    s = Scheduler(KVCacheManager(64, 4, SEED), max_batch_tokens=64, max_seqs=8)
    s.add(make_seq("a", list(range(12)), max_tokens=1))
    run_step(s)
    assert not s.has_work()
    b, c = make_seq("b", list(range(12)) + [50, 51]), make_seq("c", list(range(12)), max_tokens=1)
    s.add(b)
    s.add(c)
    assert run_step(s) == [("b", 2), ("c", 4)]
    assert b.num_cached_tokens == 12 and c.num_cached_tokens == 8


def test_preemption_recomputes_and_keeps_outputs():
    # 6 blocks of 4 tokens: two sequences of 10 prompt tokens (3 blocks each) fill the pool; the
    # first to need a 4th block forces the later-admitted one out.
    s = Scheduler(KVCacheManager(6, 4, SEED), max_batch_tokens=64, max_seqs=8)
    a, b = make_seq("a", list(range(10)), 8), make_seq("b", list(range(50, 60)), 8)
    s.add(a)
    s.add(b)
    for _ in range(3):
        run_step(s)
    assert s.num_preemptions == 0 and a.num_tokens == 13
    run_step(s)  # a's 13th token needs a 4th block: b, admitted last, is preempted
    assert s.num_preemptions == 1 and b.status is SeqStatus.WAITING and b.num_computed_tokens == 0
    assert b.num_output_tokens == 3 and s.waiting[0] is b
    while a.status is not SeqStatus.FINISHED:
        run_step(s)
    # a's two extra blocks evicted b's tail blocks (released tail first); b's first block is
    # still cached, so b recomputes its other 9 tokens.
    assert run_step(s) == [("b", 9)]
    while s.has_work():
        run_step(s)
    assert b.num_output_tokens == 8 and b.output_token_ids == [7] * 8


def test_a_sequence_waits_for_a_shared_prefix_in_the_making_and_later_ones_go_first():
    # a computes a 16-token prefix (4 blocks) in chunks; b and c share it, d does not.
    prefix = list(range(16))
    s = Scheduler(KVCacheManager(64, 4, SEED), max_batch_tokens=10, max_seqs=8)
    a, b, c = (make_seq(r, prefix + [100 + i, 200 + i]) for i, r in enumerate("abc"))
    d = make_seq("d", list(range(300, 305)))
    s.add(a)
    assert run_step(s) == [("a", 10)]
    for seq in (b, c, d):
        s.add(seq)
    # b's next uncached block (tokens 8-11) is a's to compute: b and c are held back, d goes first.
    assert run_step(s) == [("a", 8), ("d", 2)]
    assert list(s.waiting) == [b, c] and s.num_held_back == 2
    # a registered the whole prefix: b and c start after it, each computing only its own tail.
    assert run_step(s) == [("a", 1), ("d", 3), ("b", 2), ("c", 2)]
    assert b.num_cached_tokens == c.num_cached_tokens == 16 and not s.waiting


def test_a_held_sequence_is_never_stuck_when_the_one_computing_its_prefix_is_preempted():
    # 8 blocks of 4 tokens. x decodes; a computes a 20-token prefix that b shares, so b is held
    # back; x's growth preempts a (admitted after it), which goes back to the head of the queue
    # with its claims dropped. Everything finishes, and b still computes only its own token.
    s = Scheduler(KVCacheManager(8, 4, SEED), max_batch_tokens=8, max_seqs=8)
    x = make_seq("x", list(range(50, 58)), max_tokens=12)
    a, b = make_seq("a", list(range(20)), max_tokens=2), make_seq("b", list(range(20)) + [99], max_tokens=1)
    for seq in (x, a, b):
        s.add(seq)
    for _ in range(30):
        run_step(s)
    assert not s.has_work() and s.num_preemptions == 1 and s.num_held_back > 0
    assert b.num_output_tokens == 1 and b.num_cached_tokens == 20 and s.kv.computing == {}
