"""The KV-cache manager (ranks/engine/kv_cache.py) on plain ints: no model, no torch."""

import sys

from kvrelay.core.block_hash import block_hashes, hash_seed, num_blocks
from kvrelay.core.request import Request, SamplingParams
from kvrelay.ranks.engine.kv_cache import KVCacheManager
from kvrelay.ranks.engine.sequence import Sequence

SEED = hash_seed("test-model", 4)


def make_seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence.from_request(Request(rid, tokens, SamplingParams(max_tokens=4, temperature=0)), 1024)


def computed(kv: KVCacheManager, seq: Sequence, upto: int) -> None:
    """Stand-in for a forward pass: the sequence's first `upto` tokens are in its blocks."""
    before, seq.num_computed_tokens = seq.num_computed_tokens, upto
    kv.cache_computed(seq, before)


def test_num_blocks_rounds_up():
    assert [num_blocks(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_hashes_extend_the_chain_and_match_leaves_the_last_token():
    kv = KVCacheManager(16, 4, SEED)
    seq = make_seq("a", list(range(12)))
    assert kv.extend_hashes(seq) == block_hashes(list(range(12)), 4, SEED)
    seq.token_ids += [50, 51, 52, 53]
    assert kv.extend_hashes(seq) == block_hashes(seq.token_ids, 4, SEED)
    assert kv.admit(seq, kv.match_prefix(seq), seq.num_tokens)
    computed(kv, seq, seq.num_tokens)
    same = make_seq("b", list(range(12)))
    # 3 full cached blocks, but the last token must run: 2 blocks match.
    assert kv.match_prefix(same) == seq.block_ids[:2]


def test_cache_and_evict_go_through_the_listeners_with_the_block_still_named():
    kv = KVCacheManager(3, 4, SEED)
    cached, evicted = [], []
    kv.on_cache, kv.on_evict = cached.append, lambda b, h: evicted.append((b, h))
    a = make_seq("a", list(range(9)))
    assert kv.admit(a, [], 9)
    computed(kv, a, 9)
    assert cached == a.block_hashes == block_hashes(list(range(9)), 4, SEED)
    blocks = list(a.block_ids)
    kv.free(a)
    assert a.block_ids == [] and kv.num_free == 3
    # Freed tail first: the third (unhashed) block is coldest, then block 1 (hash 1), then block 0.
    b = make_seq("b", list(range(100, 108)))
    assert kv.admit(b, [], 8)
    assert evicted == [(blocks[1], a.block_hashes[1])]
    assert kv.match_prefix(make_seq("c", list(range(9)))) == [blocks[0]]


def test_reset_prefix_cache_evicts_free_cached_blocks_through_the_listener():
    kv = KVCacheManager(6, 4, SEED)
    evicted = []
    kv.on_evict = lambda b, h: evicted.append(h)
    a, held = make_seq("a", list(range(9))), make_seq("held", list(range(50, 59)))
    for seq in (a, held):
        assert kv.admit(seq, [], 9)
        computed(kv, seq, 9)
    kv.free(a)
    kv.reset_prefix_cache()
    assert sorted(evicted) == sorted(a.block_hashes) and kv.num_free == 3
    assert kv.match_prefix(make_seq("again", list(range(9)))) == []
    assert kv.match_prefix(make_seq("held too", list(range(50, 59)))) == held.block_ids[:2], "held blocks stay cached"


def test_admit_takes_nothing_when_blocks_are_short_and_hits_count_as_free():
    kv = KVCacheManager(4, 4, SEED)
    a = make_seq("a", list(range(9)))
    assert kv.admit(a, [], 9)
    computed(kv, a, 9)
    kv.free(a)
    big = make_seq("big", list(range(100, 121)))  # 6 blocks: more than the pool
    assert not kv.admit(big, [], 21) and big.block_ids == [] and kv.num_free == 4
    again = make_seq("again", list(range(9)) + [7, 7, 7, 7, 7, 7, 7])  # 2 hits + 2 new blocks
    hits = kv.match_prefix(again)
    assert len(hits) == 2 and kv.admit(again, hits, again.num_tokens)
    assert again.block_ids[:2] == hits and kv.num_free == 0


def test_reserve_takes_from_the_manager_and_adopt_registers_the_arrived_blocks():
    kv = KVCacheManager(4, 4, SEED)
    cached = []
    kv.on_cache = cached.append
    assert kv.reserve(17) is None  # 5 blocks
    blocks = kv.reserve(9)
    assert len(blocks) == 3 and kv.num_free == 1
    seq = make_seq("h", list(range(9)) + [5])  # the prompt and one sampled token
    seq.block_ids, seq.num_computed_tokens = blocks, 9
    kv.adopt(seq)
    assert cached == block_hashes(list(range(9)), 4, SEED)[:2]
    assert kv.match_prefix(make_seq("x", list(range(9)))) == blocks[:2]


def test_grow_adds_blocks_only_when_needed():
    kv = KVCacheManager(2, 4, SEED)
    seq = make_seq("a", [1, 2, 3])
    assert kv.admit(seq, [], 3) and len(seq.block_ids) == 1
    assert kv.grow(seq, 4) and len(seq.block_ids) == 1
    assert kv.grow(seq, 5) and len(seq.block_ids) == 2
    assert not kv.grow(seq, 9) and len(seq.block_ids) == 2


def test_fork_shares_full_prompt_blocks_and_copies_a_partly_filled_one():
    for prompt_len, copies in ((10, 1), (8, 0)):
        kv = KVCacheManager(8, 4, SEED)
        parent = make_seq("r", list(range(1, prompt_len + 1)))
        assert kv.admit(parent, [], prompt_len)
        computed(kv, parent, prompt_len)
        children = [parent.fork(i) for i in (1, 2)]
        made = [kv.fork(parent, c) for c in children]
        full = prompt_len // 4
        for c, copy in zip(children, made):
            assert c.block_ids[:full] == parent.block_ids[:full] and c.num_computed_tokens == prompt_len
            if copies:
                assert copy == (parent.block_ids[full], c.block_ids[full]) and c.block_ids[full] != parent.block_ids[full]
            else:
                assert copy is None and len(c.block_ids) == full
        assert all(kv.pool.ref_counts[b] == 3 for b in parent.block_ids[:full])
        assert kv.num_free == 8 - len(parent.block_ids) - 2 * copies
        for s in (parent, *children):
            kv.free(s)
        assert kv.num_free == 8


def test_the_manager_and_the_scheduler_import_no_torch():
    import subprocess

    code = ("import sys; import kvrelay.ranks.engine.kv_cache, kvrelay.ranks.engine.scheduler; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_blocks_in_the_making_are_known_by_hash_until_registered_or_freed():
    kv = KVCacheManager(32, 4, SEED)
    prefix = list(range(12))
    a, b, c = make_seq("a", prefix + [50, 51]), make_seq("b", prefix + [60]), make_seq("c", list(range(90, 99)))
    hits = kv.match_prefix(a)
    assert kv.admit(a, hits, 8)  # first chunk: 2 blocks taken, all 3 full blocks in the making
    assert kv.computing == dict.fromkeys(a.block_hashes, a)
    assert kv.computed_elsewhere(b, kv.match_prefix(b)) and not kv.computed_elsewhere(c, kv.match_prefix(c))
    assert not kv.computed_elsewhere(a, [])  # its own blocks do not hold it back
    computed(kv, a, 8)
    hits = kv.match_prefix(b)
    assert len(hits) == 2 and kv.computed_elsewhere(b, hits)  # block 2 is still a's to compute
    assert list(kv.computing) == a.block_hashes[2:]
    kv.free(a)  # preempted: nobody computes block 2 now
    assert kv.computing == {} and not kv.computed_elsewhere(b, kv.match_prefix(b))


def test_without_prefix_caching_nothing_is_held_back():
    kv = KVCacheManager(32, 4, SEED, enable_caching=False)
    a, b = make_seq("a", list(range(12))), make_seq("b", list(range(12)))
    assert kv.admit(a, kv.match_prefix(a), 12)
    assert kv.computing == {} and not kv.computed_elsewhere(b, kv.match_prefix(b))
