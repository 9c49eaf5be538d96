"""The host and disk KV tiers of a tensor-parallel group on real ranks: greedy outputs equal
transformers', and a block file that fails its checksum on a follower only is recomputed by the group.

    mpiexec -n 2 python tests/mpi/tp_tier_check.py MODEL_DIR DISK_DIR

Rank 0 is the leader's Engine (tp=2) on a 20-block cache with a host tier of 16 blocks and a disk
tier under DISK_DIR; rank 1 runs the leader's steps, copies and disk jobs on its shard
(ranks/follower.py `follow`). Waves of prompts: two chats' first turns; unrelated prompts that
push them out of the cache; chat 0's second turn (from the host tier); more unrelated prompts,
which push the chats out of the host tier onto disk; chat 1's second turn (read back from disk);
more; then the leader flips a byte in every file of rank 1's disk directory (its own stay whole)
before chat 0's third turn, whose reads must fail on rank 1 and be recomputed by both. Prints "tp_tier_check OK tp=2".
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from mpi4py import MPI

from abort_on_failure import run_or_abort
from kvrelay.configs.schema import load_config
from kvrelay.core.request import Request, SamplingParams
from kvrelay.ranks.engine.engine import Engine, make_runner, tier_sizes
from kvrelay.ranks.engine.group_tiers import TierFollower
from kvrelay.ranks.engine.loader import read_model_dir
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.step_sync import StepSync
from kvrelay.ranks.follower import follow

CPU = torch.device("cpu")
BLOCK = 8


def waves(vocab: int) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(2)
    shared = [torch.randint(3, vocab, (41,), generator=g).tolist() for _ in range(2)]  # 5 blocks + 1 each
    def other(n: int) -> list[list[int]]:
        return [torch.randint(3, vocab, (60,), generator=g).tolist() for _ in range(n)]

    def turn(chat: int) -> list[list[int]]:
        return [shared[chat] + torch.randint(3, vocab, (12,), generator=g).tolist()]

    return [[s + torch.randint(3, vocab, (9,), generator=g).tolist() for s in shared],
            other(2), turn(0), other(8), turn(1), other(4), turn(0)]


def run_wave(engine: Engine, wave: list[list[int]], first: int) -> dict[str, list[int]]:
    got = {}
    for i, ids in enumerate(wave):
        engine.add_request(Request(f"r{first + i}", ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
    while engine.has_work():
        got |= {r.request_id: r.output_token_ids for r in engine.step().finished}
    while engine.disk_store.in_flight:  # this wave's spills are on every rank's disk before the next
        engine._poll_tiers(wait_s=1.0)
    return got


def transformers_outputs(model_dir: str, prompts: list[list[int]]) -> dict[str, list[int]]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    out = {}
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        out[f"r{i}"] = gen[0, len(ids):].tolist()
    return out


def lead(cfg, group: TPGroup, sync: StepSync, model_dir: str, disk_dir: Path, all_waves) -> None:
    engine = Engine.from_config(cfg, CPU, tp=group, sync=sync)
    assert engine.host.num_slots == 16 and engine.disk is not None
    got, first = {}, 0
    for w, wave in enumerate(all_waves):
        if w == len(all_waves) - 1:
            before = engine.report()
            assert before["host_hit_tokens"] >= 40 and before["disk_hit_tokens"] >= 40, before
            assert before["disk_failed_reads"] == 0, before
            mine = Path(engine.disk_store.store.dir)
            theirs = [f for f in disk_dir.glob("*/*.kv") if f.parent != mine]
            assert theirs and list(mine.glob("*.kv"))
            for f in theirs:  # the follower's shard of every block on disk fails its checksum
                data = bytearray(f.read_bytes())
                data[-1] ^= 0xFF
                f.write_bytes(bytes(data))
        got |= run_wave(engine, wave, first)
        first += len(wave)
    sync.stop()
    expected = transformers_outputs(model_dir, [p for wave in all_waves for p in wave])
    bad = sorted(k for k in expected if got.get(k) != expected[k])
    assert not bad, f"outputs differ from transformers on {bad}"
    report = engine.report()
    # The last turn matched its blocks on disk; each read failed on the follower, so the group
    # recomputed them: its disk hits were taken back.
    assert report["disk_failed_reads"] > 0 and report["disk_hit_tokens"] == before["disk_hit_tokens"], report
    print(f"tiers: {({k: v for k, v in report.items() if 'hit' in k or 'failed' in k})}", flush=True)


def main() -> None:
    world = MPI.COMM_WORLD
    torch.set_num_threads(1)
    model_dir, disk_dir = sys.argv[1], Path(sys.argv[2])
    spec, _ = read_model_dir(model_dir)
    whole_block = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * BLOCK * 4  # float32
    cfg = load_config(**{
        "model.path": model_dir, "job.device": "cpu", "model.dtype": "float32", "cache.block_size": BLOCK,
        "cache.num_blocks": 20, "model.max_model_len": 128, "scheduler.max_batch_tokens": 32, "scheduler.max_seqs": 2,
        "cache.host_kv_gib": 16 * whole_block / (1 << 30), "cache.disk_kv_gib": 0.01, "cache.disk_kv_path": str(disk_dir),
    })
    group = TPGroup.from_mpi(world, CPU)
    sync = StepSync(world)
    if sync.is_leader:
        lead(cfg, group, sync, model_dir, disk_dir, waves(spec.vocab_size))
    else:
        runner = make_runner(cfg, CPU, tp=group, sync=sync)[0]
        host_slots, disk_blocks = tier_sizes(cfg, runner.tier_block_bytes())
        assert disk_blocks
        follow(runner, sync, None, TierFollower(runner, sync, host_slots, cfg.cache.disk_kv_path))
    world.Barrier()
    if world.rank == 0:
        print(f"tp_tier_check OK tp={world.size}", flush=True)


if __name__ == "__main__":
    run_or_abort(main)
