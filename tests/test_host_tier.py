"""The host KV tier: its bookkeeping on plain ints, its copies on real tensors (no kernel: the torch
pack path on CPU), and greedy outputs with the tier on equal to transformers' on a cache small
enough that prefixes come back from the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvrelay.configs.schema import load_config
from kvrelay.core.block_hash import hash_seed
from kvrelay.core.request import Request, SamplingParams
from kvrelay.ranks.engine.engine import Engine
from kvrelay.ranks.engine.host_memory import HostKVMemory, last_conflict
from kvrelay.ranks.engine.host_tier import CopyBatch, HostTier
from kvrelay.ranks.engine.kv_cache import KVCacheManager
from kvrelay.ranks.engine.sequence import Sequence

SEED = hash_seed("test-model", 4)


def make_seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence.from_request(Request(rid, tokens, SamplingParams(max_tokens=4, temperature=0)), 1024)


def run_prompt(kv: KVCacheManager, seq: Sequence) -> tuple[list[int], list[int]]:
    """Admit with GPU and host hits (loading the host blocks: one copy batch, completed at once, as
    on the CPU), compute the whole prompt, free it; the (GPU hits, host slots). The sequence's
    blocks are left in `seq.taken`, the copy batches in `kv.batches`."""
    hits = kv.match_prefix(seq)
    host = kv.match_host(seq, len(hits))
    computed = (len(hits) + len(host)) * 4
    assert kv.admit(seq, hits, computed if host else seq.num_tokens, host)
    batch = kv.host.take_batch()
    kv.batches.append(batch)
    if host:
        assert kv.landed() == []  # registered only once the copy-ins land
        other = make_seq("other", seq.token_ids)  # shares the prefix: waits for the load, no recompute
        assert kv.computed_elsewhere(other, kv.match_prefix(other))
    if batch is not None:
        kv.host.done(batch.number)
    if host:
        assert kv.landed() == [seq] and kv.grow(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_computed(seq, computed)
    seq.taken = list(seq.block_ids)
    kv.free(seq)
    return hits, host


def make_kv(num_blocks: int, host: HostTier) -> KVCacheManager:
    kv = KVCacheManager(num_blocks, 4, SEED, host=host)
    kv.batches = []
    return kv


def test_evicted_blocks_go_to_the_host_and_come_back_into_fresh_blocks():
    host = HostTier(8)
    kv = make_kv(4, host)
    a = make_seq("a", list(range(13)))  # 3 full blocks + 1 token
    run_prompt(kv, a)
    a_hashes = list(a.block_hashes)
    run_prompt(kv, make_seq("b", list(range(100, 113))))  # takes all 4 blocks: a's 3 are evicted
    batch = kv.batches[-1]
    assert sorted(s for _, s in batch.out) == [0, 1, 2] and not batch.inn
    assert all(h in host for h in a_hashes)
    again = make_seq("c", list(range(13)))
    hits, slots = run_prompt(kv, again)
    assert hits == [] and len(slots) == 3  # the last token runs; 3 blocks precede it
    batch = kv.batches[-1]
    # Two of b's blocks left first (copy-outs before copy-ins; c takes 3 blocks to load into, and
    # b's partly filled last block, coldest, holds no hash), then a's bytes came into c's first blocks.
    assert len(batch.out) == 2 and [s for s, _ in batch.inn] == slots
    assert [b for _, b in batch.inn] == again.taken[:3]
    assert not host.pinned
    # Registered on arrival: a fourth sequence finds them on the GPU.
    hits, slots = run_prompt(kv, make_seq("d", list(range(13))))
    assert len(hits) == 3 and slots == []


def test_blocks_written_ahead_are_not_copied_again_and_a_taken_block_waits_for_its_copy():
    host = HostTier(8)
    kv = make_kv(4, host)
    run_prompt(kv, make_seq("a", list(range(13))))  # 3 cached blocks, all free
    # The three coldest free blocks, freed tail first: a's partly filled block (no hash: no copy),
    # then its blocks 2 and 1.
    kv.write_ahead(3)
    batch = host.take_batch()
    assert len(batch.out) == 2 and host.stats.written_ahead_blocks == 2
    kv.write_ahead(3)
    assert host.take_batch() is None  # held by the host already: no second copy
    run_prompt(kv, make_seq("b", list(range(100, 113))))  # evicts a's 3 blocks: one copy, two deduped
    assert host.stats.deduped_blocks == 2 and host.stats.offloaded_blocks == 3
    # b took the written-ahead blocks before their batch completed: the compute stream must wait.
    assert kv.barrier == batch.number and not host.writing  # (run_prompt completed every batch since)


def test_full_tier_drops_its_coldest_unpinned_block():
    host = HostTier(2)
    dropped = []
    host.on_drop = dropped.append
    host.offload(0, 10)
    host.offload(1, 11)
    assert host.match([10]) == [0]  # pinned and most recent
    host.offload(2, 12)  # 11 is the coldest unpinned
    assert dropped == [11] and 10 in host and 12 in host
    host.offload(3, 13)  # 10 is pinned, so 12 goes
    assert dropped == [11, 12]
    host.unpin([0])
    assert not host.pinned


def test_failed_admission_unpins():
    host = HostTier(8)
    kv = make_kv(4, host)
    run_prompt(kv, make_seq("a", list(range(13))))
    run_prompt(kv, make_seq("b", list(range(100, 113))))
    hog = make_seq("hog", list(range(200, 208)))
    assert kv.admit(hog, [], 8)  # 2 of 4 blocks held
    big = make_seq("big", list(range(13)) + list(range(300, 320)))
    slots = kv.match_host(big, 0)
    assert len(slots) == 3 and host.pinned
    assert not kv.admit(big, [], big.num_tokens, slots)
    assert not host.pinned


def test_block_offloaded_evicted_and_brought_back_holds_the_same_bytes():
    g = torch.Generator().manual_seed(0)
    shape = (6, 4, 2, 8)  # [num_blocks, block_size, kv_heads, head_dim] f32 cpu
    caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(3)]
    mem = HostKVMemory(caches, num_slots=5)
    mem.chunk_slots = 2  # several chunks, allocated as they are written
    mem.chunks = [None] * 3
    before = [(k[[1, 4]].clone(), v[[1, 4]].clone()) for k, v in caches]
    mem.issue(CopyBatch(0, out=[(1, 4), (4, 1)]))
    assert mem.chunks[1] is None  # slot 2-3's chunk was never written
    for k, v in caches:  # the GPU blocks are reused
        k[[1, 4]] = 0.0
        v[[1, 4]] = 0.0
    mem.issue(CopyBatch(1, inn=[(4, 0), (1, 5)]))
    assert mem.completed() == 1  # the CPU copies at once
    for (k, v), (bk, bv) in zip(caches, before):
        assert torch.equal(k[[0, 5]], bk) and torch.equal(v[[0, 5]], bv)


def test_runs_of_consecutive_slots_go_in_one_copy_each():
    g = torch.Generator().manual_seed(1)
    shape = (8, 4, 2, 8)  # [num_blocks, block_size, kv_heads, head_dim] f32 cpu
    caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(2)]
    mem = HostKVMemory(caches, num_slots=8)
    mem.chunk_slots = 3
    mem.chunks = [None] * 3
    # A run stops at a gap and at a chunk's end (slots 0-2 | 3-5 | 6-7).
    assert [(i, j) for i, j, _ in mem._spans((1, 2, 3, 4, 6, 5))] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    blocks, slots = [2, 0, 7, 3, 1, 5], [1, 2, 3, 4, 6, 5]
    before = [(k[blocks].clone(), v[blocks].clone()) for k, v in caches]
    mem.issue(CopyBatch(0, out=list(zip(blocks, slots))))
    for k, v in caches:
        k.zero_()
        v.zero_()
    back = [6, 4, 0, 1, 2, 3]  # into other blocks, slots in another order
    mem.issue(CopyBatch(1, inn=list(zip(slots[::-1], back))))
    for (k, v), (bk, bv) in zip(caches, before):
        assert torch.equal(k[back], bk.flip(0)) and torch.equal(v[back], bv.flip(0))


def run_waves(engine: Engine, waves: list[list[list[int]]], first: int = 0) -> dict[str, list[int]]:
    got, i = {}, first
    for wave in waves:
        for ids in wave:
            engine.add_request(Request(f"r{i}", ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
            i += 1
        while engine.has_work():
            got |= {r.request_id: r.output_token_ids for r in engine.step().finished}
        if engine.disk is not None:
            while engine.disk_store.in_flight:  # the spills of this wave are on disk before the next
                engine._poll_tiers(wait_s=1.0)
    return got


def transformers_outputs(hf, waves: list[list[list[int]]]) -> dict[str, list[int]]:
    expected = {}
    for i, ids in enumerate(p for wave in waves for p in wave):
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected[f"r{i}"] = gen[0, len(ids):].tolist()
    return expected


def make_engine(model_dir, host_kv_gib: float, **settings) -> Engine:
    return Engine.from_config(load_config(**{
        "model.path": str(model_dir), "job.device": "cpu", "model.dtype": "float32",
        "cache.block_size": 8, "cache.num_blocks": 20, "model.max_model_len": 128,
        "scheduler.max_batch_tokens": 32, "scheduler.max_seqs": 2, "cache.host_kv_gib": host_kv_gib, **settings,
    }))


def test_greedy_outputs_with_the_host_tier_equal_transformers(tiny_models):
    transformers = pytest.importorskip("transformers")
    model_dir = tiny_models["llama"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    vocab = hf.config.vocab_size
    shared = torch.randint(3, vocab, (41,), generator=g).tolist()  # 5 full blocks + 1
    # A conversation's first turn, unrelated prompts that push it out of the 20-block cache, its second turn.
    waves = [[shared + torch.randint(3, vocab, (9,), generator=g).tolist()],
             [torch.randint(3, vocab, (60,), generator=g).tolist() for _ in range(3)],
             [shared + torch.randint(3, vocab, (12,), generator=g).tolist()]]
    expected = transformers_outputs(hf, waves)
    for gib in (0.0, 0.001):
        engine = make_engine(model_dir, gib)
        assert run_waves(engine, waves) == expected, f"host_kv_gib={gib}"
        report = engine.report()
        if gib:
            assert report["host_hit_tokens"] >= 40 and report["host_onload_bytes"] > 0
        else:
            assert report["host_hit_tokens"] == 0


def test_router_probes_gpu_then_host_then_disk_and_credits_blocks_by_what_they_save():
    from kvrelay.core.timing import TimingModel, DEFAULT_TIMING
    from kvrelay.core.window import BucketTable, TableSnapshot, WAYS
    from kvrelay.router.books import InflightPrefixes, leading_blocks
    import numpy as np

    chain = [101, 102, 103, 104, 105, 106]
    snap = TableSnapshot({1: 4, 2: 4}, {2: 8}, {2: 4})
    gpu1, gpu2 = BucketTable(snap.slots[4][0]), BucketTable(snap.slots[4][1])
    host2 = BucketTable(snap.host_slots[8][0])
    disk2 = BucketTable(snap.lower["disk"][1][4][0])
    for h in chain[:2]:
        gpu1.insert(h)
    gpu2.insert(chain[0])
    for h in chain[1:4] + [999]:
        host2.insert(h)
    for h in chain[2:6]:  # the disk holds some of the host's blocks too: the run continues after the host's
        disk2.insert(h)
    hashes = np.array(chain, np.uint64)
    assert snap.tier_lengths(hashes) == {1: (2, 0, 0), 2: (1, 3, 2)}
    assert snap.host_slots[8].shape == (1, 8 * WAYS)
    timing = TimingModel.load(DEFAULT_TIMING)
    host_only = timing.tier_credit(64, 1, 4)
    # A 64-token block of the 8B shape: ~0.15 ms to bring in against ms to recompute.
    assert 0.8 * 4 < host_only < 4
    # From disk a block costs its read (3 GB/s) as well: worth less than from the host, more than nothing.
    credit = timing.tier_credit(64, 1, 3, 2)
    assert 0 < credit < host_only
    window, cached, worth = leading_blocks(snap, InflightPrefixes([1, 2]), hashes, chain,
                                           lambda g, h, d: timing.tier_credit(64, g, h, d))
    assert window == cached == {1: 2, 2: 6}
    assert worth == {1: 2, 2: 1 + credit}
    slow = timing.model_copy(update={"host": timing.host.model_copy(update={"bandwidth_gb_s": 1e-3})})
    assert slow.tier_credit(64, 1, 4) == 0.0  # a copy slower than the recompute is worth nothing


def test_simulated_worker_runs_the_host_tier_and_models_its_copies():
    engine = Engine.from_config(load_config(**{
        "sim.enabled": True, "sim.speed": 1000.0, "cache.block_size": 16, "cache.num_blocks": 24,
        "cache.host_kv_gib": 1.0, "scheduler.max_batch_tokens": 256, "scheduler.max_seqs": 4,
    }))
    shared = list(range(1000, 1100))  # 6 full blocks + 4 tokens
    waves = [[shared + [1]], [list(range(i * 200 + 2000, i * 200 + 2150)) for i in range(3)], [shared + [2, 3]]]
    for i, wave in enumerate(waves):
        for j, ids in enumerate(wave):
            engine.add_request(Request(f"r{i}-{j}", ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)))
        while engine.has_work():
            engine.step()
    report = engine.report()
    assert report["host_hit_tokens"] == 6 * 16 and report["host_onload_bytes"] == 6 * engine.runner.block_bytes()
    assert report["host_offload_bytes"] > 0
    copies = engine.runner.timing.host_copy_s
    assert report["sim"]["host_copy_s"] >= copies(6 * 16) > 0


def test_a_loading_sequence_waits_for_its_copies_while_others_step():
    from kvrelay.ranks.engine.scheduler import Scheduler

    host = HostTier(8)
    kv = make_kv(8, host)
    sched = Scheduler(kv, max_batch_tokens=64, max_seqs=4)
    run_prompt(kv, make_seq("a", list(range(13))))
    run_prompt(kv, make_seq("b", list(range(100, 129))))  # 8 blocks: a's 3 go to the host
    host.done(kv.batches[-1].number)
    other = make_seq("r", list(range(200, 205)))
    sched.add(other)

    def step() -> list[tuple[Sequence, int]]:  # schedule, and compute as the engine would
        batch = sched.schedule()
        for item in batch:
            samples = item.samples
            sched.on_computed(item)
            if samples:
                item.seq.token_ids.append(9)
        return [(i.seq, i.num_new_tokens) for i in batch]

    assert step() == [(other, 5)]
    c = make_seq("c", list(range(13)) + [7, 7])
    sched.add(c)
    assert step() == [(other, 1)] and sched.loading == [c] and sched.has_work()
    copies = host.take_batch()
    assert len(copies.inn) == 3
    for _ in range(2):  # the copy stream has not finished: c waits, the other sequence steps
        assert step() == [(other, 1)] and sched.loading == [c]
    host.done(copies.number)
    assert step() == [(other, 1), (c, 3)]  # 12 of its 15 tokens came from the host
    assert c.num_cached_tokens == 12 and kv.host_hit_blocks == 3 and not sched.loading


def test_greedy_outputs_with_host_and_disk_tiers_equal_transformers_and_a_corrupt_file_is_recomputed(
        tiny_models, tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    model_dir = tiny_models["llama"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(2)
    vocab = hf.config.vocab_size
    shared = [torch.randint(3, vocab, (41,), generator=g).tolist() for _ in range(2)]  # two chats, 5 blocks + 1
    # Each chat's first turn; unrelated prompts that push them out of the GPU cache and then out of a
    # host tier of a few blocks (onto disk); each chat's second turn, read back from disk.
    waves = [[s + torch.randint(3, vocab, (9,), generator=g).tolist() for s in shared],
             [torch.randint(3, vocab, (60,), generator=g).tolist() for _ in range(8)],
             [shared[0] + torch.randint(3, vocab, (12,), generator=g).tolist()],
             [torch.randint(3, vocab, (60,), generator=g).tolist() for _ in range(4)],
             [shared[1] + torch.randint(3, vocab, (12,), generator=g).tolist()]]
    expected = transformers_outputs(hf, waves)
    probe = make_engine(model_dir, 0.0)
    host_gib = 16 * probe.runner.block_bytes() / (1 << 30)  # a host tier of 16 blocks
    cfg = {"cache.disk_kv_path": str(tmp_path / "kv"), "cache.disk_kv_gib": 0.01}
    engine = make_engine(model_dir, host_gib, **cfg)
    got = run_waves(engine, waves[:3])
    report = engine.report()
    assert report["disk_hit_tokens"] >= 40 and report["disk_read_bytes"] > 0 and report["disk_write_bytes"] > 0
    assert report["disk_failed_reads"] == 0
    got |= run_waves(engine, waves[3:4], first=11)
    files = list((tmp_path / "kv").glob("*/*.kv"))
    assert files
    for f in files:  # flip one byte of every block's payload: the checksums must catch it
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        got |= run_waves(engine, waves[4:], first=15)
    assert got == expected
    report = engine.report()
    assert report["disk_failed_reads"] > 0 and "failed its checksum" in caplog.text
    failed = {int(r.getMessage().split("/")[-1].split(".kv")[0], 16) for r in caplog.records if "checksum" in r.getMessage()}
    assert failed and not any(h in engine.disk for h in failed)  # a failed block leaves the tier, its file goes too
    assert failed <= {h for op, h, _ in engine.kv.disk_jobs if op == "d"} | {
        int(f.stem, 16) for f in files if not f.exists()}
    assert report["disk_hit_tokens"] == 40 + 0  # the second chat's disk hits failed and were taken back


def test_disk_tier_needs_a_path_and_a_host_tier():
    with pytest.raises(Exception, match="needs cache.disk_kv_path"):
        load_config(**{"cache.disk_kv_gib": 1.0, "cache.host_kv_gib": 1.0})
    with pytest.raises(Exception, match="needs cache.host_kv_gib"):
        load_config(**{"cache.disk_kv_gib": 1.0, "cache.disk_kv_path": "/tmp"})


def test_simulated_worker_runs_the_disk_tier(tmp_path):
    engine = Engine.from_config(load_config(**{
        "sim.enabled": True, "sim.speed": 1000.0, "cache.block_size": 16, "cache.num_blocks": 24,
        "cache.host_kv_gib": 32 * 16 * 131072 / (1 << 30), "cache.disk_kv_gib": 1.0,
        "cache.disk_kv_path": str(tmp_path), "scheduler.max_batch_tokens": 256, "scheduler.max_seqs": 4,
    }))
    assert engine.host_blocks == 32 and engine.runner.block_bytes() == 16 * 131072
    shared = list(range(1000, 1100))  # 6 full blocks + 4 tokens
    # The shared prompt leaves the GPU cache, then the host tier (onto disk), then comes back.
    waves = [[shared + [1]], [list(range(i * 200 + 2000, i * 200 + 2150)) for i in range(8)], [shared + [2, 3]]]
    run_waves(engine, waves)
    report = engine.report()
    assert report["disk_hit_tokens"] >= 16 and report["disk_read_bytes"] > 0 and report["disk_write_bytes"] > 0, report
    assert report["gpu_hit_tokens"] + report["host_hit_tokens"] + report["disk_hit_tokens"] == 6 * 16


def test_a_step_waits_for_the_last_copy_batch_that_moves_a_block_it_uses():
    # (batch, blocks copied out, blocks copied in): what another rank of a tensor-parallel group
    # has in flight on its copy stream when the leader's step arrives (group_tiers.py).
    def ids(*xs: int) -> np.ndarray:
        return np.array(xs, np.int64)

    batches = [(3, ids(1, 2), ids()), (4, ids(5), ids(7)), (5, ids(), ids(9))]
    assert last_conflict(batches, read=ids(1, 2, 3), written=ids(3)) == -1  # reading a block being copied out is fine
    assert last_conflict(batches, read=ids(2), written=ids(2)) == 3  # writing it is not
    assert last_conflict(batches, read=ids(7, 1), written=ids(1)) == 4  # nor reading a block being copied in
    assert last_conflict(batches, read=ids(9), written=ids(5)) == 5  # the last one that conflicts
    assert last_conflict(batches, read=ids(), written=ids(7)) == 4  # nor writing one
