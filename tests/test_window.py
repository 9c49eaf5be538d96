"""The cache window's bucket table as plain numpy (insert, duplicates, evict, FIFO drop of a full
bucket, hash 0), checked against a list model; and one window on one rank read by itself."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvrelay.core.window import WAYS, BucketTable, n_buckets_for, table_key


def table(n_buckets: int) -> BucketTable:
    return BucketTable(np.full(n_buckets * WAYS, 12345, np.uint64))  # garbage, as window memory may be


def bucket(t: BucketTable, b: int) -> list[int]:
    return t.slots[b * WAYS : (b + 1) * WAYS].tolist()


def test_sizing_gives_about_two_slots_per_block_or_four_for_a_gpu_table():
    assert [n_buckets_for(n) for n in (1, 4, 5, 8, 9, 1000, 1024, 1025)] == [1, 1, 2, 2, 4, 256, 256, 512]
    for n in range(1, 3000, 7):
        assert n_buckets_for(n) * WAYS >= 2 * n
        assert n_buckets_for(n, 4) * WAYS >= 4 * n and n_buckets_for(n, 4) <= max(1, 2 * n_buckets_for(n))
        assert n_buckets_for(n) & (n_buckets_for(n) - 1) == 0


def test_insert_duplicate_and_evict():
    t = table(4)
    assert t.keys() == set()
    assert t.insert(13) is None  # bucket 1
    assert bucket(t, 1) == [13, 0, 0, 0, 0, 0, 0, 0]
    assert t.insert(13) is None
    assert bucket(t, 1).count(13) == 1
    t.insert(17)
    t.insert(6)
    assert t.keys() == {13, 17, 6}
    t.remove(13)
    assert bucket(t, 1) == [0, 17, 0, 0, 0, 0, 0, 0]
    t.remove(13)  # already gone
    t.remove(99)  # never there
    assert t.keys() == {17, 6}
    t.insert(21)  # reuses the freed slot
    assert bucket(t, 1) == [21, 17, 0, 0, 0, 0, 0, 0]
    assert t.drops == 0


def test_full_bucket_drops_its_least_recently_used_entry():
    t = table(1)
    for h in range(10, 10 + WAYS):
        assert t.insert(h) is None
    assert t.insert(100) == 10  # oldest goes, into its slot
    assert bucket(t, 0)[0] == 100
    t.remove(12)  # a hole: the next insert takes it without dropping
    assert t.insert(101) is None
    assert t.insert(102) == 11  # the order survives the hole
    assert t.insert(103) == 13
    assert t.drops == 3
    assert t.keys() == {14, 15, 16, 17, 100, 101, 102, 103}
    t.remove(11)  # dropped earlier: a no-op
    assert len(t.keys()) == WAYS


def test_a_used_entry_outlives_newer_ones_a_hot_prefix_stays_visible():
    # A system prompt's block, cached first and hit by every prompt since, must not be the one a
    # full bucket drops: the router's probe stops at the first block it cannot see.
    t = table(1)
    assert t.insert(10) is None
    for h in range(11, 10 + WAYS):
        t.insert(h)
        t.insert(10)  # a prefix hit uses it again
    assert t.insert(100) == 11  # the least recently used goes, not the first inserted
    assert t.insert(101) == 12
    assert 10 in t.keys() and t.drops == 2
    assert t.insert(10) is None and bucket(t, 0).count(10) == 1  # a use stores nothing


def test_hash_zero_is_stored_as_one():
    assert table_key(0) == 1 and table_key(5) == 5
    t = table(2)
    t.insert(0)  # would read as an empty slot; goes to bucket 1 % 2 as key 1
    assert t.keys() == {1}
    assert bucket(t, 0) == [0] * WAYS and bucket(t, 1) == [1, 0, 0, 0, 0, 0, 0, 0]
    t.insert(1)  # the same key: a duplicate
    assert t.keys() == {1}
    t.remove(0)
    assert t.keys() == set()


def test_random_operations_match_a_list_model():
    rng = random.Random(0)
    t = table(8)
    model: list[list[int]] = [[] for _ in range(8)]  # per bucket, keys least recently used first
    universe = [rng.getrandbits(64) for _ in range(200)] + [0, 1, 2**64 - 1]
    for _ in range(5000):
        h = rng.choice(universe)
        k = table_key(h)
        b = model[k % 8]
        if rng.random() < 0.6:
            expect = None
            if k in b:
                b.remove(k)  # used again: the most recent
            elif len(b) == WAYS:
                expect = b.pop(0)
            b.append(k)
            assert t.insert(h) == expect
        else:
            if k in b:
                b.remove(k)
            t.remove(h)
        for i in range(8):
            assert sorted(x for x in bucket(t, i) if x) == sorted(model[i])
    assert set(t.where) == t.keys()


def test_one_rank_window_reads_itself():
    MPI = pytest.importorskip("mpi4py.MPI", reason="no MPI library here")
    from kvrelay.core.window import CacheWindow, Load, WindowReader, WorkerLoad

    with pytest.raises(ValueError, match="valid roles: aggregated, prefill, decode"):
        CacheWindow.create(MPI.COMM_SELF, 40, "router")
    # NOTE: in a job the router and the owners are different ranks; one rank can read its own window.
    cw = CacheWindow.create(MPI.COMM_SELF, 40, "prefill")
    try:
        assert cw.table.n_buckets == 32  # 4 slots a block (GPU_SLOTS_PER_BLOCK): 160 of 256
        reader = WindowReader(cw.win, {0: cw.table.n_buckets})
        assert reader.loads() == {0: WorkerLoad(0, "prefill", 0, Load(0, 0, 0, 0, 0, 0))}
        chain = [0, 2**64 - 1, 77, 1234567890123]
        for h in chain[:3]:
            cw.on_cache(h)
        cw.on_cache(55)
        cw.publish(Load(free_blocks=30, total_blocks=40, queued_prefill_tokens=512, running_seqs=3,
                        active_decode_blocks=10, step=7))
        assert reader.loads() == {0: WorkerLoad(0, "prefill", 1, Load(30, 40, 512, 3, 10, 7))}
        snap = reader.snapshot()
        row = snap.slots[cw.table.n_buckets][0]
        assert set(row[row != 0].tolist()) == cw.table.keys() == {1, 2**64 - 1, 77, 55}

        def match(hashes: list[int]) -> int:
            return snap.prefix_lengths(np.array(hashes, np.uint64))[0]

        assert match(chain) == 3
        assert match(chain[1:]) == 2
        assert match([88, *chain]) == 0
        assert match([]) == 0
        cw.on_evict(2**64 - 1)
        cw.publish(Load(free_blocks=31, total_blocks=40, queued_prefill_tokens=0, running_seqs=2,
                        active_decode_blocks=9, step=8))
        assert match(chain) == 3, "a snapshot is a copy: it keeps what it read"
        snap = reader.snapshot()
        assert match(chain) == 1
        assert reader.loads()[0].version == 2
    finally:
        cw.close()


def test_snapshot_probe_matches_a_set_per_worker_on_tables_with_gaps():
    # The router's probe (two numpy stages) against the plain definition: the leading hashes that
    # a worker's table holds. Tables of two sizes, chains with holes (an evicted or dropped block
    # mid-prefix), hash 0, and workers that hold nothing.
    from kvrelay.core.window import TableSnapshot

    rng = random.Random(5)
    sizes = {1: 8, 2: 8, 3: 16, 4: 8, 5: 16}
    snap = TableSnapshot(sizes)
    chains = [[rng.getrandbits(64) for _ in range(rng.randrange(0, 40))] for _ in range(30)] + [[0, 7, 9]]
    held: dict[int, set[int]] = {}
    for nb, ranks in snap.groups.items():
        for i, r in enumerate(ranks):
            t = BucketTable(np.zeros(nb * WAYS, np.uint64))
            for chain in rng.sample(chains, 6):
                for h in chain[: rng.randrange(len(chain) + 1)]:
                    if rng.random() > 0.05:
                        t.insert(h)
            snap.slots[nb][i] = t.slots
            held[r] = t.keys()
    for chain in chains:
        want = {r: next((k for k, h in enumerate(chain) if table_key(h) not in keys), len(chain)) for r, keys in held.items()}
        assert snap.prefix_lengths(np.array(chain, np.uint64)) == want
